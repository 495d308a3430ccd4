"""The reference's config fields: the rxlm 0.3.80 defaults, the fields the converter drops, and config access that
records where every value came from (docs/spec.md#configuration; docs/conversion.md#order-of-authority)."""

from __future__ import annotations

from ..configuration_rxt import OUT_OF_SCOPE_ATTENTION_TYPES, OUT_OF_SCOPE_FIELDS
from .report import Report

COMPONENT_DEFAULTS = {
    "num_layers": 12,
    "vocab_size": 20000,
    "embed_dim": 512,
    "ff_dim": 1536,
    "att_heads": 16,
    "seq_len": 1024,
    "stm_size": 1024,
    "use_gated": True,
    "ff_activation": "swish",
    "ff_dropout": 0.0,
    "att_dropout": 0.0,
    "use_rms_norm": True,
    "self_att_type": "sqa",
    "att_groups": 1,
    "att_query_groups": None,
    "cross_att_type": "sqa",
    "cross_att_groups": None,
    "cross_att_query_groups": None,
    "use_gated_attention": False,
    "gated_attention_activation": "sigmoid",
    "use_gated_cross_attention": None,
    "use_attention_output_bias": True,
    "rope_base": 10000,
    "use_nope": False,
    "use_moe": False,
    "num_experts": 1,
    "moe_top_k": 1,
    "num_shared_experts": 1,
    "shared_expert_dim": None,
    "moe_bias_mode": "global",
    "moe_shared_experts_bias_mode": "local",
    "moe_use_weighted_shared_experts": False,
    "router_amp": False,
    "router_dtype": "float32",
    "use_vectorized_moe": True,
    "vectorized_moe_from_legacy": False,
    "moe_grouped_gemm": True,
    "moe_use_cutlass_grouped_gemm": True,
    "use_head_norm": False,
    "head_norm_type": "layer_norm",
    "init_identity_norm": False,
    "skip_memory_cross_attention": False,
    "stateless_layers_config": None,
    "final_stateless_layers_config": None,
    "dense_layer_dim": 1536,
    "use_flash_attention": False,
    "legacy_stm_in_encoder": False,
}

MEMORY_ATTENTION_DEFAULTS = {
    "num_layers": 12,
    "embed_dim": 512,
    "att_heads": 16,
    "seq_len": 1024,
    "stm_size": 1024,
    "att_type": "sqa",
    "att_groups": 1,
    "att_query_groups": None,
    "att_dropout": 0.0,
    "interlayer_att_type": "sqa",
    "interlayer_att_groups": 1,
    "interlayer_att_query_groups": None,
    "interlayer_att_dropout": 0.0,
    "self_att_type": "sqa",
    "self_att_groups": 1,
    "self_att_query_groups": None,
    "self_att_dropout": 0.0,
    "use_gate_for_self_attention": False,
    "num_groups": 1,
    "disable_residual": False,
    "norm_type": "classic-rms",
    "norm_init_gate": -2.0,
    "norm_per_dim_scale": False,
    "norm_decay": 0.9,
    "use_gated_residual": False,
    "residual_gate_type": "static",
    "residual_per_slot_gate": True,
    "residual_gate_init": 3.0,
    "residual_gate_slot_status_type": "mean",
    "use_tanh_residual_gate": True,
    "rope_base": 10000,
    "use_flash_attention": False,
    "debug_mode": False,
    "debug_interval": 10,
    "init_identity_norm": False,
}

# Fields the converter accepts and drops (docs/conversion.md#order-of-authority); they are recorded in the report.
DROPPED_FIELDS = {
    "moe_grouped_gemm",
    "moe_use_cutlass_grouped_gemm",
    "vectorized_moe_from_legacy",
    "use_vectorized_moe",
    "legacy_stm_in_encoder",
}
# (memory attention: also `init_identity_norm`, which has no project field there)

# Fields every memory-attention config written by rxlm 0.3.80 contains (a component config lacking one of them was
# written by an older release: an old-era signal for the RoPE layout, docs/conversion.md#rope-layout).
MEMORY_ATTENTION_ALWAYS_WRITTEN = (
    "rope_base",
    "residual_gate_slot_status_type",
    "use_tanh_residual_gate",
    "residual_gate_type",
    "residual_per_slot_gate",
    "residual_gate_init",
    "use_gated_residual",
    "norm_type",
    "norm_init_gate",
    "norm_decay",
    "norm_per_dim_scale",
    "att_type",
    "att_groups",
    "att_query_groups",
    "num_layers",
    "embed_dim",
    "att_heads",
    "seq_len",
    "stm_size",
)

# Memory-attention defaults that matter when a whole-model config omits them (docs/conversion.md#order-of-authority).
WHOLE_MODEL_MEMORY_ATTENTION_DEFAULTS = {
    "use_gated_residual": False,
    "residual_gate_type": "static",
    "residual_per_slot_gate": True,
    "residual_gate_init": 3.0,
    "use_tanh_residual_gate": True,
    "residual_gate_slot_status_type": "mean",
    "norm_type": "classic-rms",
    "norm_init_gate": -2.0,
    "norm_decay": 0.9,
    "norm_per_dim_scale": False,
    "att_type": "sqa",
    "att_groups": 1,
    "interlayer_att_type": "sqa",
    "num_groups": 1,
    "rope_base": 10000,
}

WHOLE_MODEL_FIELDS = {
    "decoder_config",
    "encoder_config",
    "memory_attention_config",
    "tokenizer_config",
    "memory_attention_variant",
    "tokenizer",
    "system_prompt_title",
    "rope_layout",
}
ROPE_LAYOUT_CHOICES = ("interleaved", "split_concat")
VARIANT_CHOICES = ("simple", "self", "interlayer", "self-interlayer", "grouped-self-interlayer")
SELF_INTERLAYER_FAMILY = ("self-interlayer", "grouped-self-interlayer")


class Fields:
    """Config access that records where every value came from (config or default)."""

    def __init__(self, component: str, config: dict, defaults: dict, report: Report, default_note: str | None):
        self.component, self.config, self.defaults, self.report = component, config, defaults, report
        self.default_note = default_note

    def given(self, field: str) -> bool:
        return field in self.config

    def get(self, field: str, record: bool = True):
        """Config value, else the 0.3.80 default (recorded as a filled default)."""
        if field in self.config:
            value = self.config[field]
            if record:
                self.report.fact(self.component, field, value, "config")
            return value
        value = self.defaults[field]
        if record:
            self.report.fact(self.component, field, value, "default")
            self.report.default(self.component, field, value, self.default_note)
        return value


def check_fields(component: str, config: dict, allowed, errors: list[str]) -> None:
    """Unknown fields are fatal; out-of-scope fields must be null (docs/conversion.md#order-of-authority)."""
    for field, value in config.items():
        if field in OUT_OF_SCOPE_FIELDS or field.startswith("linear_attn_"):
            if value is not None:
                errors.append(
                    f"{component} config field '{field}'={value!r} requests an out-of-scope feature "
                    "(GMA/DMA experts, hybrid/linear attention, fp8); expected null."
                )
        elif field not in allowed:
            errors.append(
                f"{component} config field '{field}' is unknown (value {value!r}); expected one of the "
                "reference fields (a reference release would reject it too)."
            )
        elif field.endswith("att_type") and value in OUT_OF_SCOPE_ATTENTION_TYPES:
            errors.append(
                f"{component} config field '{field}'={value!r} is out of scope (hybrid/GMA/DMA attention); "
                "expected one of 'mha', 'gqa', 'mqa', 'sqa'."
            )


# ----------------------------------------------------------------------------------------------------------------
# Shape inference helpers
# ----------------------------------------------------------------------------------------------------------------
