"""Conversion of reference (rxlm) RxT checkpoints into one project folder (docs/conversion.md).

The converter

* reads the reference component folders (decoder, encoder, memory attention, optional MLM head) or one whole-model
  folder, resolving the safetensors alias metadata, and checks every config field (`folders`, `inputs`;
  docs/conversion.md#reading-the-reference-folders, docs/conversion.md#order-of-authority);
* infers every structural fact from tensor names and shapes, takes config-only facts from the configs and fills
  omitted fields with the 0.3.80 defaults, listing every config/shape conflict and every default used
  (`infer_stack`, `infer_memory_attention`, `infer_attention`, `reference_config`, `report`;
  docs/conversion.md#order-of-authority);
* classifies the memory-attention variant from the keys (docs/conversion.md#memory-attention-variant), decides the RoPE
  layout (`rope_layout`, docs/conversion.md#rope-layout), converts legacy per-expert MoE storage to stacked storage
  (`legacy_moe`, docs/conversion.md#legacy-moe-storage), takes the encoder's embedding (docs/conversion.md#embedding),
  finds the token ids (`tokens`, docs/conversion.md#token-ids);
* is strict (docs/conversion.md#strictness-and-the-report): every stored tensor is consumed or explicitly ignored,
  every parameter of the model (its shapes read from the model built on the meta device, `shapes`) is filled with its
  exact shape, every weight is finite — otherwise a `ConversionError` (a `ValueError`) lists every offending key before
  anything is written (`builder`, `key_mapping`);
* writes the folder through `RxTForCausalLM.save_pretrained` (`writing`), refusing a non-empty output unless
  `overwrite`; converts an MRL critic (`critic`).

`convert` runs these steps in order. Command line: `scripts/convert_rxlm_checkpoint.py`.
"""

from .convert import convert_rxlm_checkpoint
from .critic import CRITIC_ACTIVATIONS, CRITIC_FIELDS, convert_rxlm_critic
from .folders import ConversionError, read_safetensors
from .reference_config import (
    COMPONENT_DEFAULTS,
    MEMORY_ATTENTION_DEFAULTS,
    ROPE_LAYOUT_CHOICES,
    VARIANT_CHOICES,
)
from .report import REPORT_NAME
from .shapes import expected_state_dict_shapes
from .writing import check_output_folder, write_converted_folder

__all__ = [
    "COMPONENT_DEFAULTS",
    "CRITIC_ACTIVATIONS",
    "CRITIC_FIELDS",
    "ConversionError",
    "MEMORY_ATTENTION_DEFAULTS",
    "REPORT_NAME",
    "ROPE_LAYOUT_CHOICES",
    "VARIANT_CHOICES",
    "check_output_folder",
    "convert_rxlm_checkpoint",
    "convert_rxlm_critic",
    "expected_state_dict_shapes",
    "read_safetensors",
    "write_converted_folder",
]
