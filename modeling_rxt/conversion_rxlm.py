"""Conversion of reference (rxlm) RxT checkpoints into one project folder.

Implements the rules of `docs/checkpoints.md` §3–§6:

* reads the reference component folders (decoder, encoder, memory attention, optional MLM head) or one whole-model
  folder, resolving the safetensors alias metadata (§3);
* infers every structural fact from tensor names and shapes, takes config-only facts from the configs and fills
  omitted fields with the 0.3.80 defaults (§6.2–§6.4), listing every config/shape conflict and every default used;
* classifies the memory-attention variant from the keys (§6.5), decides the RoPE layout (§6.6), converts legacy
  per-expert MoE storage to stacked storage (§6.7), takes the encoder's embedding (§6.8), finds the token ids (§6.9);
* is strict (§6.10): every stored tensor is consumed or explicitly ignored, every project parameter is filled, all
  shapes match — otherwise a `ValueError` lists every offending key before anything is written.

Public API:
    convert_rxlm_checkpoint(...) -> (RxTConfig, state_dict, report)
    convert_rxlm_critic(critic_dir, config) -> (critic state_dict, info)
    write_critic_folder(critic state_dict, activation, init_scale, output)
    write_converted_folder(config, state_dict, report, output, tokenizer_dir=None)
    expected_state_dict_shapes(config) -> {project key: shape}
    read_safetensors(path) -> (tensors, metadata)
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .configuration_rxt import OUT_OF_SCOPE_ATTENTION_TYPES, OUT_OF_SCOPE_FIELDS, RxTConfig

__all__ = [
    "ConversionError",
    "convert_rxlm_checkpoint",
    "convert_rxlm_critic",
    "write_critic_folder",
    "expected_state_dict_shapes",
    "read_safetensors",
    "write_converted_folder",
]

REPORT_NAME = "conversion_report.json"
CONVERTER_VERSION = "1"


class ConversionError(ValueError):
    """A reference checkpoint cannot be converted (the message says why and what to do)."""


# ----------------------------------------------------------------------------------------------------------------
# Reference config fields (rxlm 0.3.80 defaults; architecture.md §2.1, §2.2; checkpoints.md §6.4)
# ----------------------------------------------------------------------------------------------------------------

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

# Fields the converter accepts and drops (checkpoints.md §6.4); they are recorded in the report.
DROPPED_FIELDS = {
    "moe_grouped_gemm",
    "moe_use_cutlass_grouped_gemm",
    "vectorized_moe_from_legacy",
    "use_vectorized_moe",
    "legacy_stm_in_encoder",
}
# (memory attention: also `init_identity_norm`, which has no project field there)

# Fields every memory-attention config written by rxlm 0.3.80 contains (a component config lacking one of them was
# written by an older release: an old-era signal for the RoPE layout, §6.6).
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

# Memory-attention defaults that matter when a whole-model config omits them (checkpoints.md §6.4).
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
TOKEN_ID_FIELDS = (
    "pad_token_id",
    "unk_token_id",
    "bos_token_id",
    "eos_token_id",
    "mask_token_id",
    "query_token_id",
    "answer_token_id",
    "think_token_id",
    "tool_call_token_id",
    "tool_use_token_id",
    "internal_token_id",
)
TOKEN_STRINGS = {
    "pad_token_id": "[PAD]",
    "unk_token_id": "[UNK]",
    "bos_token_id": "[BOS]",
    "eos_token_id": "[EOS]",
    "mask_token_id": "[MASK]",
    "query_token_id": "[Q]",
    "answer_token_id": "[A]",
    "think_token_id": "[T]",
    "tool_call_token_id": "[C]",
    "tool_use_token_id": "[U]",
    "internal_token_id": "[I]",
}
REQUIRED_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id", "query_token_id", "answer_token_id")
# The reference tokenizer-trainer layout (architecture.md §13.1).
USUAL_TOKEN_IDS = {
    "pad_token_id": 0,
    "unk_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 3,
    "mask_token_id": 4,
    "query_token_id": 5,
    "answer_token_id": 6,
    "think_token_id": None,
    "tool_call_token_id": None,
    "tool_use_token_id": None,
    "internal_token_id": None,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
)

ROPE_LAYOUT_CHOICES = ("interleaved", "split_concat")
VARIANT_CHOICES = ("simple", "self", "interlayer", "self-interlayer", "grouped-self-interlayer")
SELF_INTERLAYER_FAMILY = ("self-interlayer", "grouped-self-interlayer")

# Memory-attention module families (first key component) by variant.
_MEMATTN_COMMON = {"attention_layers", "memory_norm_layers", "memory_input_norm_layers", "residual_gate_layers"}
_MEMATTN_SELF = {"self_attention_layers", "self_memory_norm_layers", "self_residual_gate_layers"}
_MEMATTN_MEAN = {"mean_attention_layers", "mean_memory_norm_layers", "mean_stm_norm", "mean_residual_gate_layers"}


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every stored tensor and the header `__metadata__` (alias map and other entries) of a safetensors file."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    return tensors, metadata


class _Folder:
    """One input folder: its config and stored tensors, with a ledger of what happened to every stored tensor."""

    def __init__(self, role: str, path):
        self.role = role
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(f"{role} folder '{self.path}' does not exist or is not a folder.")
        missing = [name for name in ("config.json", "model.safetensors") if not (self.path / name).is_file()]
        if missing:
            raise ConversionError(
                f"{role} folder '{self.path}' has no {' and no '.join(missing)}; every input folder must contain "
                "config.json and model.safetensors."
            )
        raw = (self.path / "config.json").read_bytes()
        self.config_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            self.config = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ConversionError(f"{role} folder '{self.path}': config.json is not valid JSON ({error}).") from None
        if not isinstance(self.config, dict):
            raise ConversionError(f"{role} folder '{self.path}': config.json must hold a JSON object.")
        self.tensors, self.metadata = read_safetensors(self.path / "model.safetensors")
        # An entry is an alias only if its value names a stored tensor (§3).
        self.aliases = {
            name: kept
            for name, kept in self.metadata.items()
            if isinstance(kept, str) and kept in self.tensors and name != kept and name not in self.tensors
        }
        self.status: dict[str, tuple[str, str]] = {}  # stored name -> ("consumed" | "ignored", detail)

    def describe(self) -> dict:
        return {
            "path": str(self.path.resolve()),
            "config_sha256": self.config_sha256,
            "stored_tensors": len(self.tensors),
            "aliases": len(self.aliases),
        }


class _View:
    """The keys of one component inside a folder (prefix stripped), with alias resolution."""

    def __init__(self, folder: _Folder, prefix: str, name: str):
        self.folder, self.prefix, self.name = folder, prefix, name
        cut = len(prefix)
        self.stored = {k[cut:]: k for k in folder.tensors if k.startswith(prefix)}
        self.alias = {k[cut:]: v for k, v in folder.aliases.items() if k.startswith(prefix)}

    def keys(self) -> list[str]:
        return sorted(self.stored)

    def has(self, key: str) -> bool:
        return key in self.stored

    def has_any(self, key: str) -> bool:
        return key in self.stored or key in self.alias

    def full(self, key: str) -> str:
        return self.stored.get(key) or self.alias[key]

    def get(self, key: str) -> torch.Tensor:
        return self.folder.tensors[self.full(key)]

    def shape(self, key: str):
        return tuple(self.get(key).shape) if self.has_any(key) else None

    def src(self, key: str) -> str:
        return f"{self.folder.role}:{self.full(key)}"

    def consume(self, key: str, target: str) -> None:
        self.folder.status[self.full(key)] = ("consumed", target)

    def ignore(self, key: str, reason: str) -> None:
        self.folder.status[self.full(key)] = ("ignored", reason)


def _indices(keys, prefix: str) -> list[int]:
    """Sorted indices `i` of keys `prefix{i}.…`."""
    found = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _count(keys, prefix: str) -> int:
    found = _indices(keys, prefix)
    return found[-1] + 1 if found else 0


def _is_rope(key: str) -> bool:
    return key.endswith("rope.inv_freq") or key.endswith("rope.cache")


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


class _Report:
    def __init__(self):
        self.data = {
            "converter": {"name": "modeling_rxt.conversion_rxlm", "version": CONVERTER_VERSION},
            "inputs": {},
            "options": {},
            "inferred": {},
            "conflicts": [],
            "defaults_filled": [],
            "dropped_config_fields": [],
            "ignored_keys": [],
            "dropped_keys": [],
            "dtype_conversions": [],
            "rope_layout": {},
            "memory_attention_variant": {},
            "embedding": {},
            "token_ids": {},
            "stm_import": None,
            "notes": [],
        }

    def fact(self, component: str, field: str, value, source: str, detail: str | None = None) -> None:
        entry = {"value": value, "source": source}
        if detail:
            entry["detail"] = detail
        self.data["inferred"].setdefault(component, {})[field] = entry

    def default(self, component: str, field: str, value, note: str | None = None) -> None:
        entry = {"component": component, "field": field, "value": value}
        if note:
            entry["note"] = note
        self.data["defaults_filled"].append(entry)

    def conflict(self, component: str, field: str, config_value, used_value, note: str) -> None:
        self.data["conflicts"].append(
            {"component": component, "field": field, "config": config_value, "used": used_value, "note": note}
        )

    def note(self, text: str) -> None:
        self.data["notes"].append(text)


class _Fields:
    """Config access that records where every value came from (config or default)."""

    def __init__(self, component: str, config: dict, defaults: dict, report: _Report, default_note: str | None):
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


def _check_fields(component: str, config: dict, allowed, errors: list[str]) -> None:
    """Unknown fields are fatal; out-of-scope fields must be null (checkpoints.md §6.4)."""
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


def _infer_site(view: _View, prefixes: list[str], hd: int, dim: int, site: str) -> dict:
    """`(Hq, Hkv)`, output bias and gating of one attention site from the first layer that has it (§6.3)."""
    present = [p for p in prefixes if view.has(p + "q_proj.weight")]
    if not present:
        raise ConversionError(
            f"{view.name}: cannot infer the {site} heads: no '{view.prefix}{prefixes[0]}q_proj.weight' in any layer."
        )
    p = present[0]
    shapes = {n: view.shape(p + n + ".weight") for n in ("q_proj", "k_proj", "v_proj", "out_proj")}
    missing = [n for n, s in shapes.items() if s is None]
    if missing:
        raise ConversionError(
            f"{view.name}: cannot infer the {site} heads: missing "
            + ", ".join(f"'{view.prefix}{p}{n}.weight'" for n in missing)
        )
    q, k, v, o = shapes["q_proj"], shapes["k_proj"], shapes["v_proj"], shapes["out_proj"]
    problems = []
    for n, s in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
        if len(s) != 2 or s[1] != dim or s[0] % hd != 0 or s[0] == 0:
            problems.append(f"{n}.weight {_fmt_shape(s)} (expected [n*{hd}, {dim}])")
    if problems:
        raise ConversionError(f"{view.name}: {site} at '{view.prefix}{p}': " + "; ".join(problems))
    hq, hkv = q[0] // hd, k[0] // hd
    if v != k:
        raise ConversionError(
            f"{view.name}: {site} at '{view.prefix}{p}': v_proj.weight {_fmt_shape(v)} must equal k_proj.weight "
            f"{_fmt_shape(k)}."
        )
    if hq % hkv != 0 and hkv % hq != 0:
        raise ConversionError(
            f"{view.name}: {site} at '{view.prefix}{p}': Hq={hq}, Hkv={hkv}; one must divide the other."
        )
    hout = max(hq, hkv)
    if tuple(o) != (dim, hout * hd):
        raise ConversionError(
            f"{view.name}: {site} at '{view.prefix}{p}': out_proj.weight {_fmt_shape(o)}; expected "
            f"[{dim}, {hout * hd}] (max(Hq={hq}, Hkv={hkv}) * hd={hd})."
        )
    return {
        "hq": hq,
        "hkv": hkv,
        "bias": any(view.has(x + "out_proj.bias") for x in prefixes),
        "gated": any(view.has(x + "gate_proj.weight") for x in prefixes),
        "from": view.prefix + p,
    }


def _classify_ff(view: _View, prefix: str) -> dict | None:
    """Kind and widths of the FF module at `prefix` (e.g. 'layers.0.ff.')."""
    keys = [k[len(prefix) :] for k in view.stored if k.startswith(prefix)]
    if not keys:
        return None
    ks = set(keys)
    if "router.gate.weight" in ks:
        info = {"kind": "moe", "E": view.shape(prefix + "router.gate.weight")[0]}
        legacy = any(k.startswith("experts.") for k in keys)
        stacked = "w1" in ks or "w2" in ks
        info["storage"] = "both" if legacy and stacked else ("legacy" if legacy else "stacked")
        if stacked:
            w1, w2 = view.shape(prefix + "w1"), view.shape(prefix + "w2")
            if w1 is None or w2 is None or len(w1) != 3 or len(w2) != 3:
                raise ConversionError(
                    f"{view.name}: MoE at '{view.prefix}{prefix}' needs w1 [E, D, F or 2F] and w2 [E, F, D]; found "
                    f"w1 {w1}, w2 {w2}."
                )
            info["F"] = w2[1]
            info["gated"] = w1[2] == 2 * w2[1]
            if not info["gated"] and w1[2] != w2[1]:
                raise ConversionError(
                    f"{view.name}: MoE at '{view.prefix}{prefix}': w1 {_fmt_shape(w1)} and w2 {_fmt_shape(w2)} do "
                    "not fit (w1 last dim must be F or 2F with F = w2.shape[1])."
                )
            info["bias_mode"] = "global" if "global_bias" in ks else ("local" if "b1" in ks or "b2" in ks else "off")
        else:
            if prefix + "experts.0.fc2.weight" not in view.stored:
                raise ConversionError(
                    f"{view.name}: legacy MoE at '{view.prefix}{prefix}' has no experts.0.fc2.weight."
                )
            info["F"] = view.shape(prefix + "experts.0.fc2.weight")[1]
            info["gated"] = "experts.0.fc1.linear.weight" in ks
            has_bias = "experts.0.fc2.bias" in ks or "experts.0.fc1.bias" in ks or "experts.0.fc1.linear.bias" in ks
            info["bias_mode"] = "local" if has_bias else "off"
            if "global_bias" in ks:
                info["legacy_global_bias"] = True
        # shared experts
        if any(k.startswith("shared_experts.") for k in keys):  # legacy ModuleList
            ns = _count(keys, "shared_experts.")
            g = "shared_experts.0.fc1.linear.weight" in ks
            fs = view.shape(prefix + "shared_experts.0.fc2.weight")
            info.update(Ns=ns, Fs=fs[1] if fs else None, shared_gated=g)
            info["shared_bias_mode"] = "local" if "shared_experts.0.fc2.bias" in ks else "off"
        elif any(k.startswith("shared_expert.") for k in keys):
            fs = view.shape(prefix + "shared_expert.fc2.weight")
            info.update(Ns=1, Fs=fs[1] if fs else None, shared_gated="shared_expert.fc1.linear.weight" in ks)
            info["shared_bias_mode"] = (
                "local" if "shared_expert.fc2.bias" in ks else ("global" if "shared_experts_bias" in ks else "off")
            )
        elif "shared_w2" in ks:
            sw1, sw2 = view.shape(prefix + "shared_w1"), view.shape(prefix + "shared_w2")
            info.update(Ns=sw2[0], Fs=sw2[1], shared_gated=bool(sw1 and sw1[-1] == 2 * sw2[1]))
            info["shared_bias_mode"] = (
                "local"
                if "shared_b2" in ks or "shared_b1" in ks
                else ("global" if "shared_experts_bias" in ks else "off")
            )
        else:
            info.update(Ns=0, Fs=None, shared_gated=None, shared_bias_mode=None)
        return info
    if "fc1.linear.weight" in ks:
        fc2 = view.shape(prefix + "fc2.weight")
        if fc2 is None:
            raise ConversionError(f"{view.name}: FF at '{view.prefix}{prefix}' has no fc2.weight.")
        return {"kind": "ff", "gated": True, "F": fc2[1]}
    if "fc1.weight" in ks:
        fc2 = view.shape(prefix + "fc2.weight")
        if fc2 is None:
            raise ConversionError(f"{view.name}: FF at '{view.prefix}{prefix}' has no fc2.weight.")
        return {"kind": "ff", "gated": False, "F": fc2[1]}
    return {"kind": "unknown", "keys": sorted(ks)}


def _check_rope(view: _View, hd: int, base, component: str, report: _Report) -> None:
    """Validate the stored RoPE table against `rope_base` and `hd` (§6.3; mismatch fatal)."""
    inv_keys = sorted(k for k in view.stored if k.endswith("rope.inv_freq"))
    if not inv_keys:
        return
    inv = view.get(inv_keys[0]).to(torch.float64)
    expected = 1.0 / (float(base) ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if inv.shape != expected.shape:
        raise ConversionError(
            f"{component}: '{view.prefix}{inv_keys[0]}' has {inv.shape[0]} frequencies; expected hd/2={hd // 2}."
        )
    rel = ((inv - expected).abs() / expected).max().item()
    implied = inv[1].item() ** (-hd / 2) if inv.numel() > 1 and inv[1] > 0 else None
    report.fact(
        component,
        "rope_inv_freq_check",
        {"max_rel_diff": rel, "implied_base": implied},
        "shape",
        f"{view.prefix}{inv_keys[0]}",
    )
    if rel > 1e-4:
        raise ConversionError(
            f"{component}: RoPE inv_freq in '{view.prefix}{inv_keys[0]}' implies rope_base≈{implied:.6g}, but the "
            f"config gives rope_base={base} (max relative difference {rel:.3g} > 1e-4). Fix rope_base in config.json."
        )


def _config_heads(att_type, att_heads, groups, query_groups):
    """(Hq, Hkv) a config states for a site under 0.3.80 semantics, or None if it cannot be resolved."""
    if att_type == "mha":
        return att_heads, att_heads
    if att_type == "mqa":
        return att_heads, 1
    if att_type == "gqa":
        return att_heads, groups
    if att_type == "sqa":
        return (query_groups, groups) if query_groups is not None else None
    return None


# ----------------------------------------------------------------------------------------------------------------
# Decoder / encoder
# ----------------------------------------------------------------------------------------------------------------


def _infer_stack(view: _View, fields: _Fields, role: str, report: _Report, opts: dict) -> dict:
    """Infer the project component config of a decoder or encoder (§6.3). Returns `{"config": …, "facts": …}`."""
    comp = role
    keys = view.keys()
    cfg = fields.config
    fact = report.fact

    # L
    L = _count(keys, "layers.")
    if L == 0:
        raise ConversionError(f"{comp}: no 'model.layers.{{i}}.*' keys; this is not an RxT {role} checkpoint.")
    fact(comp, "num_layers", L, "key", "count of layers.{i}")
    # D, V
    if view.has_any("embedding.weight"):
        V, D = view.shape("embedding.weight")
        fact(comp, "vocab_size", V, "shape", "embedding.weight.shape[0]")
        fact(comp, "embed_dim", D, "shape", "embedding.weight.shape[1]")
    elif role == "decoder" and view.has("head.weight"):
        V, D = view.shape("head.weight")
        fact(comp, "vocab_size", V, "shape", "head.weight.shape[0] (no decoder embedding stored)")
        fact(comp, "embed_dim", D, "shape", "head.weight.shape[1]")
    else:
        raise ConversionError(f"{comp}: no 'model.embedding.weight'; cannot infer the vocabulary size and width.")
    if role == "decoder":
        if not view.has("head.weight"):
            raise ConversionError(f"{comp}: no 'model.head.weight' (the LM head).")
        if view.shape("head.weight")[0] != V:
            raise ConversionError(
                f"{comp}: head.weight {_fmt_shape(view.shape('head.weight'))} does not match the vocabulary size "
                f"V={V} of embedding.weight."
            )

    # RoPE / NoPE, hd
    has_rope = any(_is_rope(k) for k in list(view.stored) + list(view.alias))
    use_nope = cfg.get("use_nope")
    if use_nope and has_rope:
        raise ConversionError(f"{comp}: config says use_nope=true but the checkpoint has RoPE buffers (rope.*).")
    if not use_nope and not has_rope:
        raise ConversionError(
            f"{comp}: the checkpoint has no RoPE buffers (rope.*), i.e. it is NoPE, but the config "
            f"{'says use_nope=false' if 'use_nope' in cfg else 'omits use_nope (default false: RoPE)'}."
        )
    use_rope = has_rope
    fact(comp, "use_rope", use_rope, "key", "presence of rope.* keys (stored or aliased)")
    inv_keys = sorted(k for k in view.stored if k.endswith("rope.inv_freq"))
    cache_keys = sorted(k for k in view.stored if k.endswith("rope.cache"))
    if inv_keys:
        hd = 2 * view.shape(inv_keys[0])[0]
        fact(comp, "head_dim", hd, "shape", f"2 * {inv_keys[0]}.shape[0]")
    elif cache_keys:
        hd = 2 * view.shape(cache_keys[0])[-1]
        fact(comp, "head_dim", hd, "shape", f"2 * {cache_keys[0]}.shape[-1]")
    else:
        heads_cfg = fields.get("att_heads")
        if not isinstance(heads_cfg, int) or heads_cfg < 1 or D % heads_cfg:
            raise ConversionError(f"{comp}: embed_dim {D} is not divisible by att_heads={heads_cfg}.")
        hd = D // heads_cfg
        fact(comp, "head_dim", hd, "config", "embed_dim / att_heads (NoPE: no RoPE buffer)")
    if hd < 1 or D % hd:
        raise ConversionError(f"{comp}: embed_dim {D} is not divisible by the head dim {hd} (from the RoPE buffer).")
    H = D // hd
    if fields.given("att_heads") and cfg["att_heads"] != H:
        raise ConversionError(
            f"{comp}: config att_heads={cfg['att_heads']} gives head dim {D}/{cfg['att_heads']}, but the RoPE buffer "
            f"has {hd // 2} frequencies (head dim {hd}, att_heads {H}); they must agree."
        )
    fact(comp, "att_heads", H, "shape" if use_rope else "config", f"embed_dim / head_dim = {D}/{hd}")
    rope_base = fields.get("rope_base")
    if use_rope:
        _check_rope(view, hd, rope_base, comp, report)

    # attention sites
    self_site = _infer_site(view, [f"layers.{i}.attention." for i in range(L)], hd, D, "self-attention")
    fact(
        comp,
        "self_attention_heads",
        {"Hq": self_site["hq"], "Hkv": self_site["hkv"]},
        "shape",
        self_site["from"] + "{q,k}_proj.weight",
    )
    fact(comp, "use_attention_output_bias", self_site["bias"], "key", "attention.out_proj.bias presence")
    fact(comp, "use_gated_attention", self_site["gated"], "key", "attention.gate_proj.weight presence")
    cross_prefixes = [f"layers.{i}.memory_cross_attention." for i in range(L)]
    has_cross = any(".memory_cross_attention." in k for k in keys)
    cross_site = None
    dropped_cross = False
    if role == "decoder":
        if not has_cross:
            raise ConversionError(
                f"{comp}: no memory cross-attention keys (model.layers.{{i}}.memory_cross_attention"
                ".*); an RxT decoder reads the STM."
            )
        if cfg.get("skip_memory_cross_attention"):
            raise ConversionError(
                f"{comp}: config says skip_memory_cross_attention=true but the checkpoint has memory cross-attention "
                "keys; expected false for a decoder."
            )
        cross_site = _infer_site(view, cross_prefixes, hd, D, "memory cross-attention")
        fact(
            comp,
            "cross_attention_heads",
            {"Hq": cross_site["hq"], "Hkv": cross_site["hkv"]},
            "shape",
            cross_site["from"] + "{q,k}_proj.weight",
        )
        fact(
            comp,
            "use_gated_cross_attention",
            cross_site["gated"],
            "key",
            "memory_cross_attention.gate_proj.weight presence",
        )
    elif has_cross:
        if not opts.get("drop_encoder_cross_attention"):
            raise ConversionError(
                f"{comp}: the encoder has memory cross-attention keys (model.layers.{{i}}.memory_cross_attention.*, "
                "norm2, stm_norm): a predecessor-framework (RxNN) encoder. The project's encoder has no "
                "cross-attention; pass --drop-encoder-cross-attention to drop these keys (equal to rxlm 0.3.80 "
                "behaviour when the encoder has no STM)."
            )
        dropped_cross = True
    if role == "encoder" and cfg.get("skip_memory_cross_attention") is False and not has_cross:
        raise ConversionError(
            f"{comp}: config says skip_memory_cross_attention=false but the checkpoint has no memory cross-attention "
            "keys."
        )

    # norms
    use_rms_norm = not any(view.has(f"layers.{i}.norm1.bias") for i in range(L))
    fact(comp, "use_rms_norm", use_rms_norm, "key", "norm1.bias absent ⇒ RMSNorm")
    use_head_norm, head_norm_type = False, None
    if role == "decoder":
        use_head_norm = view.has("head_norm.weight") or view.has("head_norm.bias")
        fact(comp, "use_head_norm", use_head_norm, "key", "head_norm.weight presence")
        if use_head_norm:
            head_norm_type = "layer_norm" if view.has("head_norm.bias") else "rms_norm"
            fact(comp, "head_norm_type", head_norm_type, "key", "head_norm.bias presence ⇒ layer_norm")

    # feed-forward of memory layers
    ff_infos = [_classify_ff(view, f"layers.{i}.ff.") for i in range(L)]
    ff0 = next((f for f in ff_infos if f and f["kind"] != "unknown"), None)
    if ff0 is None:
        raise ConversionError(
            f"{comp}: cannot recognise the feed-forward of any memory layer (no ff.fc1.*, "
            "ff.fc1.linear.* or ff.router.gate.weight)."
        )
    use_moe = ff0["kind"] == "moe"
    fact(comp, "use_moe", use_moe, "key", "ff.router.gate.weight presence")
    use_gated = ff0["gated"]
    fact(
        comp,
        "use_gated",
        use_gated,
        "key" if not use_moe else "shape",
        "ff.fc1.linear.* ⇒ gated" if not use_moe else "w1 last dim = 2F ⇒ gated experts",
    )
    F = ff0["F"]
    fact(comp, "ff_dim", F, "shape", "fc2.weight.shape[1]" if not use_moe else "w2.shape[1] (per-expert width)")

    # stateless layers (decoder only; in an encoder they are flagged as unexpected)
    stateless = {"stateless_layers_config": None, "final_stateless_layers_config": None}
    dense_widths = []
    moe_info = ff0 if use_moe else None
    if role == "decoder":
        for field, prefix in (
            ("stateless_layers_config", "stateless_layers."),
            ("final_stateless_layers_config", "final_stateless_layers."),
        ):
            n = _count(keys, prefix)
            if n == 0:
                continue
            cfg_list = cfg.get(field) if isinstance(cfg.get(field), list) else None
            kinds = []
            for j in range(n):
                info = _classify_ff(view, f"{prefix}{j}.ff.")
                if info is None or info["kind"] == "unknown":
                    raise ConversionError(f"{comp}: cannot recognise the feed-forward of '{view.prefix}{prefix}{j}'.")
                if info["kind"] == "moe":
                    if not use_moe:
                        raise ConversionError(
                            f"{comp}: '{view.prefix}{prefix}{j}.ff' is MoE but the memory layers are dense; the "
                            "reference uses MoE in 'moe' stateless layers only when the memory layers use it."
                        )
                    kinds.append("moe")
                    continue
                width = info["F"]
                named = cfg_list[j] if cfg_list and j < len(cfg_list) else None
                if use_moe:
                    kinds.append("dense")
                    dense_widths.append(width)
                elif width != F:
                    kinds.append("dense")
                    dense_widths.append(width)
                elif named in ("dense", "moe"):
                    kinds.append(named)  # same maths either way; the config list names it
                    if named == "dense":
                        dense_widths.append(width)
                else:
                    kinds.append("dense")
                    dense_widths.append(width)
            stateless[field] = kinds
            fact(comp, field, kinds, "key", f"count and FF kind of {prefix}{{j}}")
    if dense_widths:
        dense_layer_dim = dense_widths[0]
        fact(comp, "dense_layer_dim", dense_layer_dim, "shape", "fc2.weight.shape[1] of the 'dense' stateless layers")
    else:
        dense_layer_dim = fields.get("dense_layer_dim")

    # MoE facts
    moe = {
        "num_experts": None,
        "num_shared_experts": None,
        "shared_expert_dim": None,
        "moe_bias_mode": None,
        "moe_shared_experts_bias_mode": None,
    }
    if use_moe:
        info = moe_info
        if info.get("legacy_global_bias"):
            raise ConversionError(
                f"{comp}: a legacy per-expert MoE layer also has ff.global_bias; this combination is unexpected "
                "(legacy experts carry their own biases)."
            )
        moe["num_experts"] = info["E"]
        fact(comp, "num_experts", info["E"], "shape", "router.gate.weight.shape[0]")
        fact(comp, "moe_storage", info["storage"], "key", "w1 (stacked) vs experts.{e}.* (legacy)")
        moe["moe_bias_mode"] = info["bias_mode"]
        fact(comp, "moe_bias_mode", info["bias_mode"], "key", "global_bias / b1,b2 (or legacy expert biases) / none")
        moe["num_shared_experts"] = info["Ns"]
        fact(comp, "num_shared_experts", info["Ns"], "key", "shared_expert.* / shared_w* / shared_experts.{s}.*")
        if info["Ns"]:
            moe["shared_expert_dim"] = info["Fs"]
            fact(comp, "shared_expert_dim", info["Fs"], "shape", "shared fc2 / shared_w2 width")
            moe["moe_shared_experts_bias_mode"] = info["shared_bias_mode"]
            fact(
                comp,
                "moe_shared_experts_bias_mode",
                info["shared_bias_mode"],
                "key",
                "shared biases / shared_experts_bias / none",
            )
            if info["shared_gated"] is not None and info["shared_gated"] != use_gated:
                raise ConversionError(
                    f"{comp}: the shared expert is {'gated' if info['shared_gated'] else 'dense'} but the routed "
                    f"experts are {'gated' if use_gated else 'dense'}; the reference uses one use_gated for both."
                )
        for i, f in enumerate(ff_infos):
            if f and f["kind"] == "moe" and f["storage"] != "stacked":
                opts.setdefault("legacy_moe_layers", []).append(f"{comp}.layers.{i}")

    # ---- config conflicts (structural facts come from the shapes) ----
    def cmp(field, used, config_value=None, note="structural fact taken from the tensors"):
        value = cfg[field] if config_value is None else config_value
        if value != used:
            report.conflict(comp, field, value, used, note)

    for field, used in (
        ("num_layers", L),
        ("embed_dim", D),
        ("vocab_size", V),
        ("use_gated", use_gated),
        ("use_rms_norm", use_rms_norm),
        ("use_moe", use_moe),
        ("use_attention_output_bias", self_site["bias"]),
        ("use_gated_attention", self_site["gated"]),
    ):
        if field in cfg:
            cmp(field, used)
    if "ff_dim" in cfg and cfg["ff_dim"] != F:
        cmp("ff_dim", F)
    if role == "decoder":
        if "use_head_norm" in cfg:
            cmp("use_head_norm", use_head_norm)
        if use_head_norm and "head_norm_type" in cfg:
            cmp("head_norm_type", head_norm_type)
        gated_cross_cfg = cfg.get("use_gated_cross_attention")
        if gated_cross_cfg is None and "use_gated_attention" in cfg:
            gated_cross_cfg = cfg["use_gated_attention"]
        if gated_cross_cfg is not None and gated_cross_cfg != cross_site["gated"]:
            report.conflict(
                comp,
                "use_gated_cross_attention",
                gated_cross_cfg,
                cross_site["gated"],
                "structural fact taken from the tensors",
            )
        for field in ("stateless_layers_config", "final_stateless_layers_config"):
            if field in cfg and (cfg[field] or None) != stateless[field]:
                cmp(field, stateless[field])
        if dense_widths and "dense_layer_dim" in cfg and cfg["dense_layer_dim"] != dense_layer_dim:
            cmp("dense_layer_dim", dense_layer_dim)
    if use_moe:
        if "num_experts" in cfg:
            cmp("num_experts", moe["num_experts"])
        if "num_shared_experts" in cfg:
            cmp("num_shared_experts", moe["num_shared_experts"])
        elif moe["num_shared_experts"] != COMPONENT_DEFAULTS["num_shared_experts"]:
            report.note(
                f"{comp}: num_shared_experts={moe['num_shared_experts']} from the keys (the 0.3.80 default "
                "of 1 would add a randomly initialised shared expert)."
            )
        if "moe_bias_mode" in cfg:
            cmp("moe_bias_mode", moe["moe_bias_mode"])
        if moe["num_shared_experts"]:
            if cfg.get("shared_expert_dim") is not None or "ff_dim" in cfg:
                cmp("shared_expert_dim", moe["shared_expert_dim"], cfg.get("shared_expert_dim") or cfg.get("ff_dim"))
            if "moe_shared_experts_bias_mode" in cfg:
                cmp("moe_shared_experts_bias_mode", moe["moe_shared_experts_bias_mode"])
    # heads
    if "self_att_type" in cfg:
        stated = _config_heads(
            cfg["self_att_type"], cfg.get("att_heads", H), cfg.get("att_groups", 1), cfg.get("att_query_groups")
        )
        used = (self_site["hq"], self_site["hkv"])
        if stated != used:
            report.conflict(
                comp,
                "self_att_type/att_groups/att_query_groups",
                {
                    "self_att_type": cfg["self_att_type"],
                    "att_groups": cfg.get("att_groups"),
                    "att_query_groups": cfg.get("att_query_groups"),
                    "Hq_Hkv": stated,
                },
                {"Hq": used[0], "Hkv": used[1]},
                "head counts taken from the projection shapes",
            )
    if role == "decoder" and "cross_att_type" in cfg:
        groups = cfg.get("cross_att_groups") or cfg.get("att_groups", 1)
        qgroups = cfg.get("cross_att_query_groups") or cfg.get("att_query_groups")
        stated = _config_heads(cfg["cross_att_type"], cfg.get("att_heads", H), groups, qgroups)
        used = (cross_site["hq"], cross_site["hkv"])
        if stated != used:
            report.conflict(
                comp,
                "cross_att_type/cross_att_groups/cross_att_query_groups",
                {
                    "cross_att_type": cfg["cross_att_type"],
                    "cross_att_groups": cfg.get("cross_att_groups"),
                    "cross_att_query_groups": cfg.get("cross_att_query_groups"),
                    "Hq_Hkv": stated,
                },
                {"Hq": used[0], "Hkv": used[1]},
                "head counts taken from the projection shapes (before rxlm 0.3.34 cross_att_groups was "
                "ignored for standard types)",
            )

    # ---- config-only fields ----
    ff_activation = fields.get("ff_activation")
    moe_top_k = fields.get("moe_top_k")
    project = {
        "num_layers": L,
        "vocab_size": V,
        "embed_dim": D,
        "ff_dim": F,
        "att_heads": H,
        "seq_len": fields.get("seq_len"),
        "stm_size": fields.get("stm_size"),
        "use_gated": use_gated,
        "ff_activation": ff_activation,
        "ff_dropout": fields.get("ff_dropout"),
        "att_dropout": fields.get("att_dropout"),
        "use_rms_norm": use_rms_norm,
        "self_att_type": "sqa",
        "att_groups": self_site["hkv"],
        "att_query_groups": self_site["hq"],
        "cross_att_type": "sqa",
        "cross_att_groups": (cross_site or self_site)["hkv"],
        "cross_att_query_groups": (cross_site or self_site)["hq"],
        "use_gated_attention": self_site["gated"],
        "gated_attention_activation": fields.get("gated_attention_activation"),
        "use_gated_cross_attention": bool(cross_site["gated"]) if cross_site else self_site["gated"],
        "use_attention_output_bias": self_site["bias"],
        "rope_base": rope_base,
        "use_rope": use_rope,
        "use_moe": use_moe,
        "num_experts": moe["num_experts"] if use_moe else fields.get("num_experts"),
        "moe_top_k": moe_top_k,
        "num_shared_experts": moe["num_shared_experts"] if use_moe else fields.get("num_shared_experts"),
        "shared_expert_dim": (
            moe["shared_expert_dim"] if use_moe and moe["num_shared_experts"] else fields.get("shared_expert_dim")
        ),
        "moe_bias_mode": moe["moe_bias_mode"] if use_moe else fields.get("moe_bias_mode"),
        "moe_shared_experts_bias_mode": (
            moe["moe_shared_experts_bias_mode"]
            if use_moe and moe["num_shared_experts"]
            else fields.get("moe_shared_experts_bias_mode")
        ),
        "moe_use_weighted_shared_experts": fields.get("moe_use_weighted_shared_experts"),
        "router_amp": fields.get("router_amp"),
        "router_dtype": fields.get("router_dtype"),
        "use_head_norm": use_head_norm,
        "head_norm_type": head_norm_type if use_head_norm else fields.get("head_norm_type"),
        "init_identity_norm": fields.get("init_identity_norm"),
        "skip_memory_cross_attention": role == "encoder",
        "stateless_layers_config": stateless["stateless_layers_config"],
        "final_stateless_layers_config": stateless["final_stateless_layers_config"],
        "dense_layer_dim": dense_layer_dim,
        "use_flash_attention": fields.get("use_flash_attention"),
        "is_decoder": role == "decoder",
    }
    if project["router_amp"]:
        report.note(
            f"{comp}: router_amp=true (router under autocast to {project['router_dtype']}); parity is defined "
            "with an fp32 router."
        )
    if isinstance(moe_top_k, int) and use_moe and moe_top_k > moe["num_experts"]:
        raise ConversionError(
            f"{comp}: moe_top_k={moe_top_k} exceeds the {moe['num_experts']} experts in the tensors."
        )
    # scalar config fields that must be valid for the project
    for field in ("stm_size", "seq_len"):
        if not isinstance(project[field], int) or project[field] < 1:
            raise ConversionError(f"{comp}: config {field}={project[field]!r}; expected a positive integer.")
    return {
        "config": project,
        "facts": {"L": L, "D": D, "V": V, "hd": hd, "dropped_cross": dropped_cross, "use_moe": use_moe},
    }


# ----------------------------------------------------------------------------------------------------------------
# Memory attention
# ----------------------------------------------------------------------------------------------------------------


def _norm_kind(view: _View, prefix: str, dim: int) -> dict | None:
    """Memory-norm type from its keys (checkpoints.md §4.6)."""
    ks = {k[len(prefix) :] for k in view.stored if k.startswith(prefix)}
    if not ks:
        return None
    if "norm.weight" in ks:
        return {"type": "layer"}
    if "scale" in ks or "gate" in ks:
        if "ema_rms" in ks:
            ema = view.shape(prefix + "ema_rms")
            gate = view.shape(prefix + "gate")
            if len(ema) == 2 or (gate is not None and len(gate) == 2):
                scale = view.shape(prefix + "scale")
                return {
                    "type": "positional",
                    "S": ema[0],
                    "per_dim_scale": scale is not None and tuple(scale) == (dim,),
                }
            return {"type": "adaptive"}
        return {"type": "rms"}
    if "weight" in ks:
        return {"type": "classic-rms"}
    return {"type": "unknown", "keys": sorted(ks)}


def _gate_kind(view: _View, prefix: str) -> dict:
    """Residual-gate type from its keys (§6.3): ungated, 'param' (static/elementwise) or linear."""
    ks = {k[len(prefix) :] for k in view.stored if k.startswith(prefix)}
    info = {"present": bool(ks), "slot_status": "slot_status.weight" in ks or "slot_status.bias" in ks}
    if "gate" in ks:
        shape = view.shape(prefix + "gate")
        info.update(gated=True, kind="param", per_slot=len(shape) == 2, S=shape[0] if len(shape) == 2 else None)
    elif "gate.weight" in ks:
        shape = view.shape(prefix + "gate.weight")
        per_slot = shape[0] != 1 or shape[1] == 1
        info.update(gated=True, kind="linear", per_slot=per_slot, S=shape[1])
    else:
        info.update(gated=False, kind=None, per_slot=None, S=None)
    return info


def _classify_variant(view: _View) -> tuple[str | None, str]:
    """Variant from the module families (§6.5). Returns (variant or 'ambiguous' family, reason)."""
    families = {k.split(".", 1)[0] for k in view.stored}
    has_self = bool(families & _MEMATTN_SELF)
    has_mean = bool(families & _MEMATTN_MEAN)
    has_inter = "interlayer_gate_layers" in families
    if has_self and (has_mean or has_inter):
        raise ConversionError(
            f"{view.name}: both self-attention (self_*) and interlayer (mean_* / interlayer_gate_layers) module "
            "families are present; no reference variant has both."
        )
    if has_self:
        return "self", "self_attention_layers.* present"
    if has_inter and not has_mean:
        raise ConversionError(
            f"{view.name}: interlayer_gate_layers.* present without mean_attention_layers.*; not a reference variant."
        )
    if has_mean:
        if has_inter:
            return "self-interlayer", "mean_attention_layers.* and interlayer_gate_layers.* present"
        gate_keys = [
            k
            for k in view.stored
            if k.startswith("residual_gate_layers.") or k.startswith("mean_residual_gate_layers.")
        ]
        if gate_keys:
            return (
                "interlayer",
                "mean_attention_layers.* present, no interlayer_gate_layers.*, residual gate keys present",
            )
        return "ambiguous", "mean_attention_layers.* present and no gate keys at all (ungated)"
    return "simple", "no self_* and no mean_* modules"


def _infer_memory_attention(view: _View, fields: _Fields, report: _Report, opts: dict) -> dict:
    comp = "memory_attention"
    keys = view.keys()
    cfg = fields.config
    fact = report.fact
    L = _count(keys, "attention_layers.")
    if L == 0:
        raise ConversionError(f"{comp}: no 'model.attention_layers.{{i}}.*' keys; not a memory-attention checkpoint.")
    fact(comp, "num_layers", L, "key", "count of attention_layers.{i}")
    first_in = next(
        (f"memory_input_norm_layers.{i}.weight" for i in range(L) if view.has(f"memory_input_norm_layers.{i}.weight")),
        None,
    )
    if first_in is not None:
        D = view.shape(first_in)[0]
        fact(comp, "embed_dim", D, "shape", f"{first_in}.shape[0]")
    else:
        q = next(
            (
                f"attention_layers.{i}.q_proj.weight"
                for i in range(L)
                if view.has(f"attention_layers.{i}.q_proj.weight")
            ),
            None,
        )  # noqa: E501
        if q is None:
            raise ConversionError(
                f"{comp}: no memory_input_norm_layers.{{i}}.weight or attention q_proj; cannot infer D."
            )
        D = view.shape(q)[1]
        fact(comp, "embed_dim", D, "shape", f"{q}.shape[1]")
    inv_keys = sorted(k for k in view.stored if k.endswith("rope.inv_freq"))
    if inv_keys:
        hd = 2 * view.shape(inv_keys[0])[0]
        fact(comp, "head_dim", hd, "shape", f"2 * {inv_keys[0]}.shape[0]")
    else:
        heads_cfg = fields.get("att_heads")
        if not isinstance(heads_cfg, int) or heads_cfg < 1 or D % heads_cfg:
            raise ConversionError(f"{comp}: embed_dim {D} is not divisible by att_heads={heads_cfg}.")
        hd = D // heads_cfg
        fact(comp, "head_dim", hd, "config", "embed_dim / att_heads (no RoPE buffer stored)")
    if hd < 1 or D % hd:
        raise ConversionError(f"{comp}: embed_dim {D} is not divisible by the head dim {hd}.")
    H = D // hd
    if fields.given("att_heads") and cfg["att_heads"] != H:
        raise ConversionError(
            f"{comp}: config att_heads={cfg['att_heads']} disagrees with the RoPE buffer (head dim {hd}, "
            f"att_heads {H}); they must agree."
        )
    fact(comp, "att_heads", H, "shape" if inv_keys else "config", f"embed_dim / head_dim = {D}/{hd}")
    rope_base = fields.get("rope_base")
    _check_rope(view, hd, rope_base, comp, report)

    main = _infer_site(view, [f"attention_layers.{i}." for i in range(L)], hd, D, "main memory attention")
    fact(comp, "attention_heads", {"Hq": main["hq"], "Hkv": main["hkv"]}, "shape", main["from"] + "{q,k}_proj.weight")

    # ---- variant (§6.5) ----
    key_variant, reason = _classify_variant(view)
    flag = opts.get("memory_attention_variant")
    whole_name = opts.get("whole_model_variant_name")
    component_config = opts.get("memory_attention_component_config", True)
    num_groups_cfg = cfg.get("num_groups")
    decided_by = None
    if key_variant == "ambiguous":
        if flag is not None:
            if flag not in ("interlayer",) + SELF_INTERLAYER_FAMILY:
                raise ConversionError(
                    f"{comp}: --memory-attention-variant {flag!r} contradicts the keys ({reason}); expected "
                    "'interlayer', 'self-interlayer' or 'grouped-self-interlayer'."
                )
            variant, decided_by = flag, "flag --memory-attention-variant (keys ambiguous: " + reason + ")"
        elif component_config and "num_groups" in cfg:
            variant = "grouped-self-interlayer" if (num_groups_cfg or 1) > 1 else "self-interlayer"
            decided_by = "component config has num_groups (grouped self-interlayer class)" + (
                "; num_groups=1 is plain self-interlayer" if (num_groups_cfg or 1) == 1 else ""
            )
        elif not component_config and whole_name in SELF_INTERLAYER_FAMILY:
            variant = whole_name
            if variant == "grouped-self-interlayer" and (num_groups_cfg or 1) == 1:
                variant = "self-interlayer"
            decided_by = f"whole-model config memory_attention_variant={whole_name!r} (keys ambiguous)"
        else:
            if not component_config and whole_name == "interlayer":
                detail = (
                    "the whole-model config names 'interlayer', which the reference builds as self-interlayer "
                    "from rxlm 0.3.65 on and as interlayer before (the checkpoint's date decides)"
                )
            else:
                detail = "the memory-attention config does not record the class"
            raise ConversionError(
                f"{comp}: the memory-attention variant is ambiguous: {reason}, so it is either 'interlayer' "
                f"(K=V=M) or an ungated 'self-interlayer' (K=V=P+M), and {detail}. Pass "
                "--memory-attention-variant interlayer|self-interlayer|grouped-self-interlayer."
            )
    else:
        variant = key_variant
        decided_by = "keys: " + reason
        if variant == "self-interlayer" and (num_groups_cfg or 1) > 1:
            variant = "grouped-self-interlayer"
            decided_by += f"; num_groups={num_groups_cfg} > 1 in the config"
        if flag is not None:
            compatible = flag == variant or (flag in SELF_INTERLAYER_FAMILY and variant in SELF_INTERLAYER_FAMILY)
            if not compatible:
                raise ConversionError(
                    f"{comp}: --memory-attention-variant {flag!r} contradicts the keys, which show {variant!r} "
                    f"({reason})."
                )
            if flag != variant:
                if flag == "self-interlayer" and (num_groups_cfg or 1) > 1:
                    raise ConversionError(
                        f"{comp}: --memory-attention-variant 'self-interlayer' but the config has "
                        f"num_groups={num_groups_cfg} (grouped); pass 'grouped-self-interlayer' or fix num_groups."
                    )
                variant = flag
                decided_by += f"; flag --memory-attention-variant {flag!r}"
        if (
            whole_name is not None
            and whole_name != variant
            and not (whole_name in SELF_INTERLAYER_FAMILY and variant in SELF_INTERLAYER_FAMILY)
        ):
            report.conflict(
                comp,
                "memory_attention_variant",
                whole_name,
                variant,
                "the keys decide the variant (the reference's 'interlayer' name builds self-interlayer "
                "from 0.3.65 on)",
            )
    report.data["memory_attention_variant"] = {"value": variant, "decided_by": decided_by, "keys": reason}
    if flag is not None:
        report.data["memory_attention_variant"]["flag"] = flag
    if whole_name is not None:
        report.data["memory_attention_variant"]["whole_model_name"] = whole_name
    # class fields in a component config that contradict the keys
    if component_config:
        class_field_variant = None
        if "num_groups" in cfg:
            class_field_variant = "grouped-self-interlayer"
        elif "self_att_type" in cfg or "use_gate_for_self_attention" in cfg:
            class_field_variant = "self"
        elif "interlayer_att_type" in cfg:
            class_field_variant = "interlayer/self-interlayer"
        elif "disable_residual" in cfg:
            class_field_variant = "simple"
        if class_field_variant is not None:
            ok = (
                (class_field_variant == "grouped-self-interlayer" and variant in SELF_INTERLAYER_FAMILY)
                or (
                    class_field_variant == "interlayer/self-interlayer"
                    and variant in ("interlayer",) + SELF_INTERLAYER_FAMILY
                )
                or class_field_variant == variant
            )
            if not ok:
                report.conflict(
                    comp,
                    "class fields",
                    class_field_variant,
                    variant,
                    "the config's class-specific fields suggest another class; the keys decide",
                )

    num_groups = num_groups_cfg if variant == "grouped-self-interlayer" and num_groups_cfg else 1
    if variant == "grouped-self-interlayer":
        fact(comp, "num_groups", num_groups, "config" if "num_groups" in cfg else "default")
        if "num_groups" not in cfg:
            report.default(comp, "num_groups", 1)
    elif "num_groups" in cfg and num_groups_cfg not in (None, 1):
        report.conflict(comp, "num_groups", num_groups_cfg, 1, f"variant {variant!r} has no groups")

    # extra sites
    def site(prefix_fmt, name, field):
        if not any(view.has(prefix_fmt.format(i) + "q_proj.weight") for i in range(L)):
            return None
        s = _infer_site(view, [prefix_fmt.format(i) for i in range(L)], hd, D, name)
        fact(comp, field, {"Hq": s["hq"], "Hkv": s["hkv"]}, "shape", s["from"] + "{q,k}_proj.weight")
        return s

    inter_site = site("mean_attention_layers.{}.", "interlayer attention", "interlayer_attention_heads")
    self_site = site("self_attention_layers.{}.", "memory self-attention", "self_attention_heads")
    for name, s in (("main", main), ("interlayer", inter_site), ("self", self_site)):
        if s is not None and not s["bias"]:
            report.note(
                f"{comp}: the {name} attention has no out_proj.bias (always present in the reference); the "
                "strict check lists the missing keys."
            )

    # ---- norm type ----
    norm_prefixes = [f"memory_norm_layers.{i}." for i in range(L)]
    norm_info = next((n for n in (_norm_kind(view, p, D) for p in norm_prefixes) if n is not None), None)
    if norm_info is None or norm_info["type"] == "unknown":
        raise ConversionError(f"{comp}: cannot recognise the memory norms (memory_norm_layers.{{i}}.*): {norm_info}.")
    norm_type = norm_info["type"]
    fact(comp, "norm_type", norm_type, "key", "memory_norm_layers.{i} keys (§4.6 table)")
    if "norm_type" in cfg and cfg["norm_type"] != norm_type:
        report.conflict(comp, "norm_type", cfg["norm_type"], norm_type, "norm type taken from the norm keys")
    if norm_type == "positional":
        norm_per_dim_scale = norm_info["per_dim_scale"]
        fact(comp, "norm_per_dim_scale", norm_per_dim_scale, "shape", "positional scale [D] vs [S, 1]")
        if "norm_per_dim_scale" in cfg and cfg["norm_per_dim_scale"] != norm_per_dim_scale:
            report.conflict(
                comp,
                "norm_per_dim_scale",
                cfg["norm_per_dim_scale"],
                norm_per_dim_scale,
                "taken from the positional scale shape",
            )
    else:
        norm_per_dim_scale = fields.get("norm_per_dim_scale")

    # ---- gates ----
    gate_families = {
        "residual_gate_layers": "main",
        "mean_residual_gate_layers": "main",
        "interlayer_gate_layers": "main",
        "self_residual_gate_layers": "self",
    }
    gate_infos = {}
    for family in gate_families:
        for i in range(L):
            g = _gate_kind(view, f"{family}.{i}.")
            if g["present"]:
                gate_infos.setdefault(family, g)
                if g["gated"]:
                    gate_infos[family] = g
                    break
    disable_residual = bool(fields.get("disable_residual")) if variant == "simple" else False
    if variant != "simple" and cfg.get("disable_residual"):
        report.conflict(comp, "disable_residual", True, False, "disable_residual exists only in the simple variant")
    main_gate = gate_infos.get("residual_gate_layers") or gate_infos.get("mean_residual_gate_layers")
    use_gated_residual = bool(main_gate and main_gate["gated"])
    fact(comp, "use_gated_residual", use_gated_residual, "key", "gate / gate.weight in residual_gate_layers.{i}")
    if "use_gated_residual" in cfg and cfg["use_gated_residual"] != use_gated_residual:
        report.conflict(
            comp, "use_gated_residual", cfg["use_gated_residual"], use_gated_residual, "taken from the gate keys"
        )
    self_gate = gate_infos.get("self_residual_gate_layers")
    use_gate_for_self = bool(self_gate and self_gate["gated"]) if variant == "self" else False
    if variant == "self":
        fact(comp, "use_gate_for_self_attention", use_gate_for_self, "key", "gate keys in self_residual_gate_layers")
        if "use_gate_for_self_attention" in cfg and cfg["use_gate_for_self_attention"] != use_gate_for_self:
            report.conflict(
                comp,
                "use_gate_for_self_attention",
                cfg["use_gate_for_self_attention"],
                use_gate_for_self,
                "taken from the self gate keys",
            )
    elif cfg.get("use_gate_for_self_attention"):
        report.note(
            f"{comp}: use_gate_for_self_attention=true has no effect in the {variant!r} variant; written as false."
        )
    gated_ref = next((g for g in (gate_infos.get(f) for f in gate_families) if g and g["gated"]), None)
    if gated_ref is not None:
        if gated_ref["kind"] == "linear":
            gate_type = "linear"
            fact(comp, "residual_gate_type", gate_type, "key", "gate.weight ⇒ linear")
            if "residual_gate_type" in cfg and cfg["residual_gate_type"] != "linear":
                report.conflict(
                    comp, "residual_gate_type", cfg["residual_gate_type"], "linear", "gate.weight keys ⇒ linear gate"
                )
        else:
            cfg_type = fields.get("residual_gate_type")
            if cfg_type in ("static", "elementwise"):
                gate_type = cfg_type
            else:
                gate_type = "static"
                report.conflict(
                    comp,
                    "residual_gate_type",
                    cfg_type,
                    gate_type,
                    "a 'gate' parameter means static or elementwise; the config names neither, so the "
                    "default 'static' is used",
                )
        per_slot = gated_ref["per_slot"]
        fact(comp, "residual_per_slot_gate", per_slot, "shape", "gate shape [S, 1] / [S, S] ⇒ per-slot")
        if "residual_per_slot_gate" in cfg and cfg["residual_per_slot_gate"] != per_slot:
            report.conflict(
                comp, "residual_per_slot_gate", cfg["residual_per_slot_gate"], per_slot, "taken from the gate shapes"
            )
    else:
        gate_type = fields.get("residual_gate_type")
        per_slot = fields.get("residual_per_slot_gate")
    slot_status_present = any(g["slot_status"] for g in gate_infos.values())
    # The reference creates slot_status whenever the type is 'linear', so the keys decide it.
    if slot_status_present:
        slot_status_type = "linear"
        fact(comp, "residual_gate_slot_status_type", "linear", "key", "slot_status.* present")
        if gate_type != "linear" and not per_slot:
            slot_status_type = "mean"
            report.note(f"{comp}: slot_status.* keys exist but no gate can use them; written as 'mean' (unused).")
    else:
        slot_status_type = "mean"
        fact(comp, "residual_gate_slot_status_type", "mean", "key", "no slot_status.* keys")
    if "residual_gate_slot_status_type" in cfg and cfg["residual_gate_slot_status_type"] != slot_status_type:
        report.conflict(
            comp,
            "residual_gate_slot_status_type",
            cfg["residual_gate_slot_status_type"],
            slot_status_type,
            "taken from the slot_status keys",
        )

    # ---- S ----
    S = fields.get("stm_size")
    s_shapes = [
        g["S"]
        for g in gate_infos.values()
        if g.get("gated") and g.get("S") and (g["per_slot"] or g["kind"] == "linear")
    ]  # noqa: E501
    if norm_type == "positional":
        s_shapes.append(norm_info["S"])
    if s_shapes:
        if s_shapes[0] != S:
            report.conflict(comp, "stm_size", S, s_shapes[0], "slot count taken from per-slot gate / norm shapes")
        S = s_shapes[0]
        fact(comp, "stm_size", S, "shape", "per-slot gate / positional norm shape")
    if not isinstance(S, int) or S < 1:
        raise ConversionError(f"{comp}: stm_size={S!r}; expected a positive integer.")

    # ---- conflicts for head fields ----
    for s, prefix in ((main, "att_"), (inter_site, "interlayer_att_"), (self_site, "self_att_")):
        if s is None or prefix + "type" not in cfg:
            continue
        stated = _config_heads(
            cfg[prefix + "type"],
            cfg.get("att_heads", H),
            cfg.get(prefix + "groups", 1),
            cfg.get(prefix + "query_groups"),
        )
        if stated != (s["hq"], s["hkv"]):
            report.conflict(
                comp,
                f"{prefix}type/{prefix}groups/{prefix}query_groups",
                {
                    "type": cfg[prefix + "type"],
                    "groups": cfg.get(prefix + "groups"),
                    "query_groups": cfg.get(prefix + "query_groups"),
                    "Hq_Hkv": stated,
                },
                {"Hq": s["hq"], "Hkv": s["hkv"]},
                "head counts taken from the projection shapes",
            )
    for field, used in (("num_layers", L), ("embed_dim", D)):
        if field in cfg and cfg[field] != used:
            report.conflict(comp, field, cfg[field], used, "structural fact taken from the tensors")

    def heads_of(s):
        return (s or main)["hkv"], (s or main)["hq"]

    inter_g, inter_q = heads_of(inter_site)
    self_g, self_q = heads_of(self_site)
    if inter_site is None:
        report.fact(comp, "interlayer_attention_heads", "unused: written as the main attention's heads", "derived")
    if self_site is None:
        report.fact(comp, "self_attention_heads", "unused: written as the main attention's heads", "derived")
    project = {
        "num_layers": L,
        "embed_dim": D,
        "att_heads": H,
        "seq_len": fields.get("seq_len"),
        "stm_size": S,
        "att_type": "sqa",
        "att_groups": main["hkv"],
        "att_query_groups": main["hq"],
        "att_dropout": fields.get("att_dropout"),
        "interlayer_att_type": "sqa",
        "interlayer_att_groups": inter_g,
        "interlayer_att_query_groups": inter_q,
        "interlayer_att_dropout": fields.get("interlayer_att_dropout"),
        "self_att_type": "sqa",
        "self_att_groups": self_g,
        "self_att_query_groups": self_q,
        "self_att_dropout": fields.get("self_att_dropout"),
        "use_gate_for_self_attention": use_gate_for_self,
        "num_groups": num_groups,
        "disable_residual": disable_residual,
        "norm_type": norm_type,
        "norm_init_gate": fields.get("norm_init_gate"),
        "norm_per_dim_scale": norm_per_dim_scale,
        "norm_decay": fields.get("norm_decay"),
        "use_gated_residual": use_gated_residual,
        "residual_gate_type": gate_type,
        "residual_per_slot_gate": per_slot,
        "residual_gate_init": fields.get("residual_gate_init"),
        "residual_gate_slot_status_type": slot_status_type,
        "use_tanh_residual_gate": fields.get("use_tanh_residual_gate"),
        "rope_base": rope_base,
        "use_flash_attention": fields.get("use_flash_attention"),
        "debug_mode": fields.get("debug_mode", record=False),
        "debug_interval": fields.get("debug_interval", record=False),
    }
    if gated_ref is not None or use_gate_for_self:
        report.fact(
            comp,
            "gate_activation",
            "tanh" if project["use_tanh_residual_gate"] else "sigmoid",
            "config" if "use_tanh_residual_gate" in cfg else "default",
        )
    return {"config": project, "variant": variant, "facts": {"L": L, "D": D, "S": S, "hd": hd}}


# ----------------------------------------------------------------------------------------------------------------
# Expected project state dict (the contract with modeling_rxt.py)
# ----------------------------------------------------------------------------------------------------------------


def _attention_shapes(prefix: str, dim: int, hd: int, hq: int, hkv: int, bias: bool, gated: bool) -> dict:
    hout = max(hq, hkv)
    shapes = {
        prefix + "q_proj.weight": (hq * hd, dim),
        prefix + "k_proj.weight": (hkv * hd, dim),
        prefix + "v_proj.weight": (hkv * hd, dim),
        prefix + "out_proj.weight": (dim, hout * hd),
    }
    if bias:
        shapes[prefix + "out_proj.bias"] = (dim,)
    if gated:
        shapes[prefix + "gate_proj.weight"] = (hout * hd, dim)
    return shapes


def _norm_shapes(prefix: str, dim: int, layer_norm: bool) -> dict:
    shapes = {prefix + "weight": (dim,)}
    if layer_norm:
        shapes[prefix + "bias"] = (dim,)
    return shapes


def _ff_shapes(prefix: str, dim: int, width: int, gated: bool) -> dict:
    inner = 2 * width if gated else width
    return {
        prefix + "fc1.weight": (inner, dim),
        prefix + "fc1.bias": (inner,),
        prefix + "fc2.weight": (dim, width),
        prefix + "fc2.bias": (dim,),
    }


def _moe_shapes(prefix: str, c) -> dict:
    dim, F, E, gated = c.embed_dim, c.ff_dim, c.num_experts, c.use_gated
    inner = 2 * F if gated else F
    shapes = {prefix + "router.weight": (E, dim), prefix + "w1": (E, dim, inner), prefix + "w2": (E, F, dim)}
    if c.moe_bias_mode == "local":
        shapes[prefix + "b1"] = (E, inner)
        shapes[prefix + "b2"] = (E, dim)
    elif c.moe_bias_mode == "global":
        shapes[prefix + "global_bias"] = (dim,)
    ns = c.num_shared_experts
    if ns:
        fs = c.shared_expert_dim or F
        s_inner = 2 * fs if gated else fs
        local = c.moe_shared_experts_bias_mode == "local"
        if ns == 1:
            shapes[prefix + "shared_expert.fc1.weight"] = (s_inner, dim)
            shapes[prefix + "shared_expert.fc2.weight"] = (dim, fs)
            if local:
                shapes[prefix + "shared_expert.fc1.bias"] = (s_inner,)
                shapes[prefix + "shared_expert.fc2.bias"] = (dim,)
        else:
            shapes[prefix + "shared_w1"] = (ns, dim, s_inner)
            shapes[prefix + "shared_w2"] = (ns, fs, dim)
            shapes[prefix + "shared_expert_gate.weight"] = (ns, dim)
            if local:
                shapes[prefix + "shared_b1"] = (ns, s_inner)
                shapes[prefix + "shared_b2"] = (ns, dim)
        if c.moe_shared_experts_bias_mode == "global":
            shapes[prefix + "shared_experts_bias"] = (dim,)
    return shapes


def _stack_shapes(prefix: str, c, decoder: bool) -> dict:
    dim, hd = c.embed_dim, c.embed_dim // c.att_heads
    layer_norm = not c.use_rms_norm
    hq, hkv = c.self_attention_heads
    shapes = {}

    def block(p, cross: bool, ff_kind: str):
        shapes.update(
            _attention_shapes(p + "attention.", dim, hd, hq, hkv, c.use_attention_output_bias, c.use_gated_attention)
        )
        names = ("norm1", "norm2", "norm3", "stm_norm") if cross else ("norm1", "norm3")
        for n in names:
            shapes.update(_norm_shapes(f"{p}{n}.", dim, layer_norm))
        if cross:
            cq, ckv = c.cross_attention_heads
            shapes.update(
                _attention_shapes(
                    p + "memory_cross_attention.",
                    dim,
                    hd,
                    cq,
                    ckv,
                    c.use_attention_output_bias,
                    c.gated_cross_attention,
                )
            )
        if ff_kind == "moe" and c.use_moe:
            shapes.update(_moe_shapes(p + "ff.", c))
        elif ff_kind == "moe":
            shapes.update(_ff_shapes(p + "ff.", dim, c.ff_dim, c.use_gated))
        else:  # "dense" stateless layer
            shapes.update(_ff_shapes(p + "ff.", dim, c.dense_layer_dim, c.use_gated))

    for i in range(c.num_layers):
        block(f"{prefix}layers.{i}.", cross=decoder, ff_kind="moe")
    if decoder:
        for j, kind in enumerate(c.stateless_layers_config or []):
            block(f"{prefix}stateless_layers.{j}.", cross=False, ff_kind=kind)
        for j, kind in enumerate(c.final_stateless_layers_config or []):
            block(f"{prefix}final_stateless_layers.{j}.", cross=False, ff_kind=kind)
        if c.use_head_norm:
            shapes.update(_norm_shapes(prefix + "head_norm.", dim, c.head_norm_type == "layer_norm"))
    return shapes


def _memory_norm_shapes(prefix: str, m) -> dict:
    dim, S = m.embed_dim, m.stm_size
    t = m.norm_type
    if t == "classic-rms":
        return {prefix + "weight": (dim,)}
    if t == "rms":
        return {prefix + "scale": (dim,), prefix + "gate": (1,)}
    if t == "adaptive":
        return {prefix + "scale": (dim,), prefix + "gate": (1,), prefix + "ema_rms": (1,)}
    if t == "positional":
        scale = (dim,) if m.norm_per_dim_scale else (S, 1)
        return {prefix + "scale": scale, prefix + "gate": (S, 1), prefix + "ema_rms": (S, 1)}
    if t == "layer":
        return {
            prefix + "norm.weight": (dim,),
            prefix + "norm.bias": (dim,),
            prefix + "scale": (dim,),
            prefix + "gate": (1,),
        }
    raise ValueError(f"unknown norm_type {t!r}")


def _gate_uses_slot_status(m) -> bool:
    return m.residual_gate_slot_status_type == "linear" and (
        m.residual_gate_type == "linear" or (m.residual_gate_type == "elementwise" and m.residual_per_slot_gate)
    )


def _gate_shapes(prefix: str, m, gated: bool) -> dict:
    if not gated:
        return {}
    S, dim = m.stm_size, m.embed_dim
    if m.residual_gate_type == "linear":
        shapes = {
            prefix + "gate.weight": (S, S) if m.residual_per_slot_gate else (1, S),
            prefix + "gate.bias": (S,) if m.residual_per_slot_gate else (1,),
        }
    else:
        shapes = {prefix + "gate": (S, 1) if m.residual_per_slot_gate else (1,)}
    if _gate_uses_slot_status(m):
        shapes[prefix + "slot_status.weight"] = (1, dim)
        shapes[prefix + "slot_status.bias"] = (1,)
    return shapes


def _memory_attention_shapes(prefix: str, m, variant: str) -> dict:
    dim, hd = m.embed_dim, m.embed_dim // m.att_heads
    shapes = {}
    hq, hkv = m.heads("att_")
    for i in range(m.num_layers):
        shapes.update(_attention_shapes(f"{prefix}attention_layers.{i}.", dim, hd, hq, hkv, True, False))
        shapes.update(_memory_norm_shapes(f"{prefix}memory_norm_layers.{i}.", m))
        shapes[f"{prefix}memory_input_norm_layers.{i}.weight"] = (dim,)
        if not (variant == "simple" and m.disable_residual):
            shapes.update(_gate_shapes(f"{prefix}residual_gate_layers.{i}.", m, m.use_gated_residual))
    if variant == "self":
        sq, skv = m.heads("self_att_")
        for i in range(m.num_layers):
            shapes.update(_attention_shapes(f"{prefix}self_attention_layers.{i}.", dim, hd, sq, skv, True, False))
            shapes.update(_memory_norm_shapes(f"{prefix}self_memory_norm_layers.{i}.", m))
            shapes.update(_gate_shapes(f"{prefix}self_residual_gate_layers.{i}.", m, m.use_gate_for_self_attention))
    if variant in ("interlayer",) + SELF_INTERLAYER_FAMILY:
        iq, ikv = m.heads("interlayer_att_")
        shapes.update(_memory_norm_shapes(f"{prefix}mean_stm_norm.", m))
        for i in range(m.num_layers):
            shapes.update(_attention_shapes(f"{prefix}mean_attention_layers.{i}.", dim, hd, iq, ikv, True, False))
            shapes.update(_memory_norm_shapes(f"{prefix}mean_memory_norm_layers.{i}.", m))
            shapes.update(_gate_shapes(f"{prefix}mean_residual_gate_layers.{i}.", m, m.use_gated_residual))
            if variant in SELF_INTERLAYER_FAMILY:
                shapes.update(_gate_shapes(f"{prefix}interlayer_gate_layers.{i}.", m, m.use_gated_residual))
    return shapes


def expected_state_dict_shapes(config: RxTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter / persistent buffer of `RxTForCausalLM(config)` with its shape (the key contract)."""
    dec, enc, mem = config.decoder_config, config.encoder_config, config.memory_attention_config
    shapes = {"model.embed_tokens.weight": (dec.vocab_size, dec.embed_dim)}
    shapes.update(_stack_shapes("model.decoder.", dec, decoder=True))
    shapes["lm_head.weight"] = (dec.vocab_size, dec.embed_dim)
    shapes["lm_head.bias"] = (dec.vocab_size,)
    shapes.update(_stack_shapes("model.encoder.", enc, decoder=False))
    shapes.update(_memory_attention_shapes("model.memory_attention.", mem, config.memory_attention_variant))
    if config.learned_stm_init:
        shapes["model.stm_init.stm"] = (dec.num_layers, 1, mem.stm_size, dec.embed_dim)
    if config.use_mlm_head:
        d, v = enc.embed_dim, enc.vocab_size
        shapes.update(
            {
                "mlm_head.dense.weight": (d, d),
                "mlm_head.dense.bias": (d,),
                "mlm_head.layer_norm.weight": (d,),
                "mlm_head.layer_norm.bias": (d,),
                "mlm_head.decoder.weight": (v, d),
                "mlm_head.decoder.bias": (v,),
            }
        )
    return shapes


# ----------------------------------------------------------------------------------------------------------------
# Key mapping
# ----------------------------------------------------------------------------------------------------------------

_RENAMES = (
    (".ff.shared_expert.fc1.linear.", ".ff.shared_expert.fc1."),
    (".ff.fc1.linear.", ".ff.fc1."),
    (".ff.router.gate.weight", ".ff.router.weight"),
)
_LEGACY_RE = re.compile(r"^(.*\.ff\.)(experts|shared_experts)\.(\d+)\.(.+)$")


def _rename(key: str) -> str:
    key = "." + key
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key[1:]


class _Builder:
    """Collects the project state dict and the provenance of every entry."""

    def __init__(self, report: _Report):
        self.sd: dict[str, torch.Tensor] = {}
        self.src: dict[str, str] = {}
        self.report = report
        self.errors: list[str] = []

    def tensor(self, view: _View, key: str) -> torch.Tensor:
        return self._fp32(view.get(key), view.src(key))

    def _fp32(self, t: torch.Tensor, src: str) -> torch.Tensor:
        if t.dtype == torch.float32:
            return t
        if t.dtype in (torch.bfloat16, torch.float16):
            self.report.data["dtype_conversions"].append(
                {"key": src, "from": str(t.dtype).replace("torch.", ""), "to": "float32"}
            )
            return t.to(torch.float32)
        if t.dtype == torch.float64:
            out = t.to(torch.float32)
            if not torch.equal(out.to(torch.float64), t):
                raise ConversionError(f"{src} is float64 and does not fit float32 exactly; refusing to truncate.")
            self.report.data["dtype_conversions"].append({"key": src, "from": "float64", "to": "float32 (exact)"})
            return out
        raise ConversionError(f"{src} has dtype {t.dtype}; expected a floating-point tensor.")

    def put(self, target: str, value: torch.Tensor, src: str) -> None:
        if target in self.sd:
            if self.sd[target].shape == value.shape and torch.equal(self.sd[target], value):
                self.src[target] += " == " + src
                return
            self.errors.append(
                f"{target}: filled from both {self.src[target]} and {src} with different values (legacy and stacked "
                "MoE storage disagree, or two inputs map to one parameter)."
            )
            return
        self.sd[target] = value
        self.src[target] = src

    def map(self, view: _View, key: str, target: str) -> None:
        self.put(target, self.tensor(view, key), view.src(key))
        view.consume(key, target)


def _convert_legacy_ff(view: _View, prefix: str, target_prefix: str, b: _Builder) -> None:
    """Legacy per-expert MoE → stacked (checkpoints.md §6.7) for the FF at `prefix` (e.g. 'layers.0.ff.')."""
    keys = [k for k in view.stored if k.startswith(prefix)]
    where = f"{view.folder.role}:{view.prefix}{prefix}"
    experts = _indices(keys, prefix + "experts.")
    if experts:
        if experts != list(range(len(experts))):
            b.errors.append(f"{where}experts: expert indices {experts} are not 0..E-1.")
            return
        gated = view.has(prefix + "experts.0.fc1.linear.weight")
        fc1 = "fc1.linear." if gated else "fc1."
        w1, w2, b1, b2 = [], [], [], []
        for e in experts:
            p = f"{prefix}experts.{e}."
            need = [p + fc1 + "weight", p + "fc2.weight"]
            absent = [n for n in need if not view.has(n)]
            if absent:
                b.errors.append("legacy MoE expert incomplete: missing " + ", ".join(view.prefix + n for n in absent))
                return
            w1.append(b.tensor(view, p + fc1 + "weight").t())
            w2.append(b.tensor(view, p + "fc2.weight").t())
            view.consume(p + fc1 + "weight", f"{target_prefix}w1[{e}] (transposed)")
            view.consume(p + "fc2.weight", f"{target_prefix}w2[{e}] (transposed)")
            for name, bucket in ((fc1 + "bias", b1), ("fc2.bias", b2)):
                if view.has(p + name):
                    bucket.append(b.tensor(view, p + name))
                    view.consume(p + name, f"{target_prefix}{'b1' if bucket is b1 else 'b2'}[{e}]")
        try:
            b.put(target_prefix + "w1", torch.stack(w1).contiguous(), f"{where}experts.*.{fc1}weight (transposed)")
            b.put(target_prefix + "w2", torch.stack(w2).contiguous(), f"{where}experts.*.fc2.weight (transposed)")
        except (RuntimeError, KeyError) as error:
            b.errors.append(f"legacy MoE experts at {view.prefix}{prefix} have inconsistent shapes ({error}).")
            return
        for name, bucket in (("b1", b1), ("b2", b2)):
            if bucket and len(bucket) != len(experts):
                b.errors.append(
                    f"legacy MoE at {view.prefix}{prefix}: only {len(bucket)} of {len(experts)} experts "
                    f"have the bias that becomes {name}."
                )
            elif bucket:
                src_name = f"{fc1}bias" if name == "b1" else "fc2.bias"
                b.put(target_prefix + name, torch.stack(bucket).contiguous(), f"{where}experts.*.{src_name}")
    shared = _indices(keys, prefix + "shared_experts.")
    if shared:
        gated = view.has(prefix + "shared_experts.0.fc1.linear.weight")
        fc1 = "fc1.linear." if gated else "fc1."
        if len(shared) == 1:
            p = prefix + "shared_experts.0."
            for src, dst in (
                (fc1 + "weight", "fc1.weight"),
                (fc1 + "bias", "fc1.bias"),
                ("fc2.weight", "fc2.weight"),
                ("fc2.bias", "fc2.bias"),
            ):
                if view.has(p + src):
                    b.map(view, p + src, f"{target_prefix}shared_expert.{dst}")
        else:
            sw1, sw2, sb1, sb2 = [], [], [], []
            for s in shared:
                p = f"{prefix}shared_experts.{s}."
                if not (view.has(p + fc1 + "weight") and view.has(p + "fc2.weight")):
                    b.errors.append(f"legacy shared expert {view.prefix}{p} incomplete.")
                    return
                sw1.append(b.tensor(view, p + fc1 + "weight").t())
                sw2.append(b.tensor(view, p + "fc2.weight").t())
                view.consume(p + fc1 + "weight", f"{target_prefix}shared_w1[{s}] (transposed)")
                view.consume(p + "fc2.weight", f"{target_prefix}shared_w2[{s}] (transposed)")
                for name, bucket, dst in ((fc1 + "bias", sb1, "shared_b1"), ("fc2.bias", sb2, "shared_b2")):
                    if view.has(p + name):
                        bucket.append(b.tensor(view, p + name))
                        view.consume(p + name, f"{target_prefix}{dst}[{s}]")
            try:
                b.put(target_prefix + "shared_w1", torch.stack(sw1).contiguous(), f"{where}shared_experts.*")
                b.put(target_prefix + "shared_w2", torch.stack(sw2).contiguous(), f"{where}shared_experts.*")
                if sb1:
                    b.put(target_prefix + "shared_b1", torch.stack(sb1).contiguous(), f"{where}shared_experts.*")  # noqa: E501
                if sb2:
                    b.put(target_prefix + "shared_b2", torch.stack(sb2).contiguous(), f"{where}shared_experts.*")  # noqa: E501
            except RuntimeError as error:
                b.errors.append(f"legacy shared experts at {view.prefix}{prefix} have inconsistent shapes ({error}).")


def _map_stack(
    view: _View, role: str, b: _Builder, report: _Report, dropped_cross: bool, target: str | None = None
) -> None:
    """Map decoder / encoder keys (everything except the embedding) to `target` + project name (default
    `model.decoder.` / `model.encoder.`)."""
    target = target or ("model.decoder." if role == "decoder" else "model.encoder.")
    legacy_prefixes = set()
    for key in view.keys():
        if key == "embedding.weight":
            continue
        if key == "stm.memory":
            reason = (
                "runtime STM buffer (ignored; the STM comes from stm_init or the caller)"
                if role == "decoder"
                else "encoder STM buffer (legacy; ignored)"
            )
            view.ignore(key, reason)
            continue
        if _is_rope(key):
            view.ignore(key, "RoPE buffer: recomputed from rope_base and the head dim (validated)")
            continue
        if (
            role == "encoder"
            and dropped_cross
            and (".memory_cross_attention." in key or re.match(r"^layers\.\d+\.(norm2|stm_norm)\.", key))
        ):
            view.ignore(key, "dropped: encoder memory cross-attention (--drop-encoder-cross-attention)")
            report.data["dropped_keys"].append(view.src(key))
            continue
        m = _LEGACY_RE.match(key)
        if m:
            legacy_prefixes.add(m.group(1))
            continue
        if role == "decoder" and key.startswith("head."):
            b.map(view, key, "lm_head." + key[len("head.") :])
            continue
        b.map(view, key, target + _rename(key))
    for prefix in sorted(legacy_prefixes):
        _convert_legacy_ff(view, prefix, target + prefix, b)


def _map_memory_attention(view: _View, config, variant: str, b: _Builder, import_stm: bool) -> None:
    m = config.memory_attention_config
    uses_status = _gate_uses_slot_status(m)
    for key in view.keys():
        if key == "stm.memory":
            if not import_stm:
                view.ignore(key, "runtime STM buffer (ignored; pass --import-stm to use it as a learned initial STM)")
            continue
        if _is_rope(key):
            view.ignore(key, "RoPE buffer: recomputed from rope_base and the head dim (validated)")
            continue
        family = key.split(".", 1)[0]
        if variant == "simple" and m.disable_residual and family == "residual_gate_layers":
            view.ignore(key, "residual gate of a simple memory attention with disable_residual=True (never used)")
            continue
        if ".slot_status." in key and family in (
            "residual_gate_layers",
            "mean_residual_gate_layers",
            "interlayer_gate_layers",
            "self_residual_gate_layers",
        ):
            gated = m.use_gate_for_self_attention if family == "self_residual_gate_layers" else m.use_gated_residual
            if not gated or m.residual_gate_type == "static":
                view.ignore(key, "slot_status of an ungated or static gate (never used)")
                continue
            if not uses_status:
                pass  # mapped; the strict check reports it as unexpected
        b.map(view, key, "model.memory_attention." + key)


# ----------------------------------------------------------------------------------------------------------------
# RoPE layout, token ids
# ----------------------------------------------------------------------------------------------------------------


def _old_era_signals(views: dict, configs: dict, component_memattn_config: bool) -> list[str]:
    signals = []
    for role in ("decoder", "encoder"):
        view, cfg = views[role], configs[role]
        if any(_LEGACY_RE.match(k) and ".experts." in "." + k for k in view.stored):
            signals.append(f"{role}: legacy per-expert MoE keys (ff.experts.*)")
        if role == "encoder" and any(".memory_cross_attention." in k for k in view.stored):
            signals.append("encoder: memory cross-attention keys (predecessor framework)")
        if cfg.get("self_att_type") is None and cfg.get("att_query_groups") is None:
            signals.append(
                f"{role} config: omits self_att_type and att_query_groups (written when the default type was gqa)"
            )
        if (
            role == "decoder"
            and cfg.get("cross_att_type") is None
            and cfg.get("cross_att_query_groups") is None
            and cfg.get("att_query_groups") is None
        ):
            signals.append(
                "decoder config: omits cross_att_type and every cross query-head field (written when the "
                "default type was mqa)"
            )
        if role == "encoder" and view.has("stm.memory") and not cfg.get("legacy_stm_in_encoder"):
            signals.append("encoder: model.stm.memory present without legacy_stm_in_encoder (older release)")
    if component_memattn_config:
        missing = [f for f in MEMORY_ATTENTION_ALWAYS_WRITTEN if f not in configs["memory_attention"]]
        if missing:
            signals.append(f"memory-attention config lacks fields rxlm 0.3.80 always writes: {missing}")
    return signals


def _tokenizer_json_ids(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = {}
    model_vocab = (data.get("model") or {}).get("vocab")
    if isinstance(model_vocab, dict):
        vocab.update(model_vocab)
    elif isinstance(model_vocab, list):  # Unigram: [[piece, score], ...]
        vocab.update({entry[0]: i for i, entry in enumerate(model_vocab) if isinstance(entry, (list, tuple))})
    for token in data.get("added_tokens") or []:
        if isinstance(token, dict) and "content" in token and "id" in token:
            vocab[token["content"]] = token["id"]
    return {field: vocab.get(string) for field, string in TOKEN_STRINGS.items()}


def _find_tokenizer(dirs: list[Path]) -> Path | None:
    for d in dirs:
        if d is not None and (Path(d) / "tokenizer.json").is_file():
            return Path(d)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Main entry
# ----------------------------------------------------------------------------------------------------------------


def _check_mlm(view: _View, cfg: dict, report: _Report, errors: list[str]) -> None:
    _check_fields("mlm_head", cfg, {"embed_dim", "vocab_size"}, errors)
    if view.has("decoder.weight"):
        V, D = view.shape("decoder.weight")
        report.fact("mlm_head", "vocab_size", V, "shape", "decoder.weight.shape[0]")
        report.fact("mlm_head", "embed_dim", D, "shape", "decoder.weight.shape[1]")
        for field, used in (("embed_dim", D), ("vocab_size", V)):
            if field in cfg and cfg[field] != used:
                report.conflict("mlm_head", field, cfg[field], used, "structural fact taken from the tensors")


def _check_strict(folders: list[_Folder], b: _Builder, expected: dict, against: str) -> None:
    """§6.10: every stored tensor consumed or ignored, every expected key filled with its exact shape; otherwise a
    `ConversionError` lists every unexpected, missing and mis-shaped key (`against` names the expected key set)."""
    problems_unexpected, problems_missing, problems_shape = [], [], []
    for folder in folders:
        for name in sorted(folder.tensors):
            if name not in folder.status:
                problems_unexpected.append(
                    f"{folder.role}:{name} {_fmt_shape(folder.tensors[name].shape)} "
                    "(no project parameter corresponds to it)"
                )
    for key in sorted(b.sd):
        if key not in expected:
            problems_unexpected.append(
                f"{b.src[key]} {_fmt_shape(b.sd[key].shape)} -> {key}: {against} has no such parameter"
            )
        elif tuple(b.sd[key].shape) != tuple(expected[key]):
            problems_shape.append(
                f"{key} from {b.src[key]}: shape {_fmt_shape(b.sd[key].shape)}, expected {_fmt_shape(expected[key])}"
            )
    for key, shape in expected.items():
        if key not in b.sd:
            problems_missing.append(f"{key} {_fmt_shape(shape)}")
    if b.errors or problems_unexpected or problems_missing or problems_shape:
        parts = []
        if b.errors:
            parts.append("conversion errors:\n    " + "\n    ".join(b.errors))
        if problems_unexpected:
            parts.append(f"unexpected keys ({len(problems_unexpected)}):\n    " + "\n    ".join(problems_unexpected))
        if problems_missing:
            parts.append(
                f"missing keys ({len(problems_missing)}) [expected shape]:\n    " + "\n    ".join(problems_missing)
            )
        if problems_shape:
            parts.append(f"shape mismatches ({len(problems_shape)}):\n    " + "\n    ".join(problems_shape))
        raise ConversionError(
            f"the checkpoint does not match {against}; nothing was written.\n  " + "\n  ".join(parts)
        )


def convert_rxlm_checkpoint(
    decoder=None,
    encoder=None,
    memory_attention=None,
    mlm_head=None,
    whole_model=None,
    rope_layout: str | None = None,
    memory_attention_variant: str | None = None,
    import_stm: bool = False,
    drop_encoder_cross_attention: bool = False,
    tokenizer=None,
    output=None,
):
    """Convert reference (rxlm) checkpoint folders into the project's config and state dict.

    Args:
        decoder, encoder, memory_attention: component folders (each with config.json and model.safetensors).
        mlm_head: optional MLM-head folder.
        whole_model: a whole-model folder (`RxTAlpha` / `RxTBeta`), instead of the three components.
        rope_layout: 'interleaved' or 'split_concat' (required when the inputs show an old-era signal).
        memory_attention_variant: resolves the ungated interlayer / self-interlayer ambiguity.
        import_stm: use the stored memory-attention STM as a learned initial STM.
        drop_encoder_cross_attention: accept a predecessor-framework encoder and drop its cross-attention.
        tokenizer: a folder with tokenizer.json (else the input folders are searched).
        output: if given, the converted folder is written there (`write_converted_folder`).

    Returns:
        `(RxTConfig, state_dict, report)`.

    Raises:
        `ValueError` (`ConversionError`): anything that prevents an exact, complete conversion; nothing is written.
    """
    report = _Report()
    opts = {
        "rope_layout": rope_layout,
        "memory_attention_variant": memory_attention_variant,
        "import_stm": bool(import_stm),
        "drop_encoder_cross_attention": bool(drop_encoder_cross_attention),
        "tokenizer": str(tokenizer) if tokenizer else None,
    }
    report.data["options"] = dict(opts)
    if rope_layout is not None and rope_layout not in ROPE_LAYOUT_CHOICES:
        raise ConversionError(f"--rope-layout {rope_layout!r}: expected one of {list(ROPE_LAYOUT_CHOICES)}.")
    if memory_attention_variant is not None and memory_attention_variant not in VARIANT_CHOICES:
        raise ConversionError(
            f"--memory-attention-variant {memory_attention_variant!r}: expected one of {list(VARIANT_CHOICES)}."
        )

    # ---- inputs ----
    folders: list[_Folder] = []
    errors: list[str] = []
    whole_cfg = None
    if whole_model is not None:
        if decoder is not None or encoder is not None or memory_attention is not None:
            raise ConversionError("give either --whole-model or --decoder/--encoder/--memory-attention, not both.")
        wm = _Folder("whole_model", whole_model)
        folders.append(wm)
        whole_cfg = wm.config
        _check_fields("whole-model", whole_cfg, WHOLE_MODEL_FIELDS, errors)
        views = {
            "decoder": _View(wm, "decoder.model.", "decoder"),
            "encoder": _View(wm, "encoder.model.", "encoder"),
            "memory_attention": _View(wm, "memory_attention.model.", "memory_attention"),
        }
        configs = {}
        for role, field in (
            ("decoder", "decoder_config"),
            ("encoder", "encoder_config"),
            ("memory_attention", "memory_attention_config"),
        ):
            sub = whole_cfg.get(field)
            if not isinstance(sub, dict):
                raise ConversionError(f"whole-model config.json: '{field}' is missing or not an object.")
            configs[role] = sub
        if whole_cfg.get("tokenizer") is not None:
            report.data["dropped_config_fields"].append(
                {"component": "whole-model", "field": "tokenizer", "value": whole_cfg["tokenizer"]}
            )
        opts["whole_model_variant_name"] = whole_cfg.get("memory_attention_variant")
        opts["memory_attention_component_config"] = False
        report.data["inputs"]["whole_model"] = wm.describe()
    else:
        missing = [
            n
            for n, v in (("--decoder", decoder), ("--encoder", encoder), ("--memory-attention", memory_attention))
            if v is None
        ]
        if missing:
            raise ConversionError(f"missing input folders: {', '.join(missing)} (or give --whole-model).")
        dec_f, enc_f, mem_f = (
            _Folder("decoder", decoder),
            _Folder("encoder", encoder),
            _Folder("memory_attention", memory_attention),
        )
        folders += [dec_f, enc_f, mem_f]
        views = {
            "decoder": _View(dec_f, "model.", "decoder"),
            "encoder": _View(enc_f, "model.", "encoder"),
            "memory_attention": _View(mem_f, "model.", "memory_attention"),
        }
        configs = {"decoder": dec_f.config, "encoder": enc_f.config, "memory_attention": mem_f.config}
        opts["memory_attention_component_config"] = True
        for f in (dec_f, enc_f, mem_f):
            report.data["inputs"][f.role] = f.describe()
    mlm_view = None
    if mlm_head is not None:
        mlm_f = _Folder("mlm_head", mlm_head)
        folders.append(mlm_f)
        mlm_view = _View(mlm_f, "", "mlm_head")
        report.data["inputs"]["mlm_head"] = mlm_f.describe()

    # ---- config fields ----
    component_allowed = set(COMPONENT_DEFAULTS) | {"rope_layout"}
    memattn_allowed = set(MEMORY_ATTENTION_DEFAULTS) | {"rope_layout"}
    _check_fields("decoder", configs["decoder"], component_allowed, errors)
    _check_fields("encoder", configs["encoder"], component_allowed, errors)
    _check_fields("memory_attention", configs["memory_attention"], memattn_allowed, errors)
    if mlm_view is not None:
        _check_mlm(mlm_view, mlm_view.folder.config, report, errors)
    if errors:
        raise ConversionError("unsupported config fields:\n  " + "\n  ".join(errors))
    for role in ("decoder", "encoder", "memory_attention"):
        dropped = DROPPED_FIELDS | ({"init_identity_norm"} if role == "memory_attention" else set())
        for field in sorted(configs[role]):
            if field in dropped:
                report.data["dropped_config_fields"].append(
                    {"component": role, "field": field, "value": configs[role][field]}
                )
    memattn_defaults = dict(MEMORY_ATTENTION_DEFAULTS)
    note_mem = None
    if whole_cfg is not None:
        memattn_defaults.update(WHOLE_MODEL_MEMORY_ATTENTION_DEFAULTS)
        note_mem = "whole-model memory_attention_config holds only passed fields (checkpoints.md §6.4)"
    fields = {
        "decoder": _Fields("decoder", configs["decoder"], COMPONENT_DEFAULTS, report, "rxlm 0.3.80 default"),
        "encoder": _Fields("encoder", configs["encoder"], COMPONENT_DEFAULTS, report, "rxlm 0.3.80 default"),
        "memory_attention": _Fields(
            "memory_attention",
            configs["memory_attention"],
            memattn_defaults,
            report,
            note_mem or "rxlm 0.3.80 default",
        ),
    }

    # ---- inference ----
    dec = _infer_stack(views["decoder"], fields["decoder"], "decoder", report, opts)
    enc = _infer_stack(views["encoder"], fields["encoder"], "encoder", report, opts)
    mem = _infer_memory_attention(views["memory_attention"], fields["memory_attention"], report, opts)
    dec_cfg, enc_cfg, mem_cfg = dec["config"], enc["config"], mem["config"]

    layers = {"decoder": dec["facts"]["L"], "encoder": enc["facts"]["L"], "memory_attention": mem["facts"]["L"]}
    if len(set(layers.values())) != 1:
        raise ConversionError(
            f"memory layer counts differ {layers}; decoder, encoder and memory attention must "
            "have the same number of layers (one STM layer each)."
        )
    dims = {"decoder": dec["facts"]["D"], "encoder": enc["facts"]["D"], "memory_attention": mem["facts"]["D"]}
    if len(set(dims.values())) != 1:
        raise ConversionError(f"embed_dim differs {dims}; expected one width D for all components.")
    if dec["facts"]["V"] != enc["facts"]["V"]:
        raise ConversionError(
            f"vocab_size differs (decoder {dec['facts']['V']}, encoder {enc['facts']['V']}); the embedding is shared."
        )
    S = mem["facts"]["S"]
    for role, c in (("decoder", dec_cfg), ("encoder", enc_cfg)):
        if c["stm_size"] != S:
            if role == "decoder":
                report.conflict(
                    role,
                    "stm_size",
                    c["stm_size"],
                    S,
                    "the memory-attention stm_size wins (the decoder reads its STM)",
                )
            c["stm_size"] = S

    # ---- RoPE layout (§6.6) ----
    signals = _old_era_signals(views, configs, opts["memory_attention_component_config"])
    config_layouts = {}
    if whole_cfg is not None and whole_cfg.get("rope_layout") is not None:
        config_layouts["whole_model"] = whole_cfg["rope_layout"]
    for role in ("decoder", "encoder", "memory_attention"):
        if configs[role].get("rope_layout") is not None:
            config_layouts[role] = configs[role]["rope_layout"]
    if rope_layout is not None:
        layout, how = rope_layout, "flag --rope-layout"
    elif config_layouts:
        values = set(config_layouts.values())
        if len(values) != 1 or not values <= set(ROPE_LAYOUT_CHOICES):
            raise ConversionError(
                f"input configs state different or invalid rope_layout values {config_layouts}; pass --rope-layout."
            )
        layout, how = values.pop(), f"input config rope_layout ({', '.join(config_layouts)})"
    elif signals:
        raise ConversionError(
            "cannot decide the RoPE layout: the inputs were written by an older reference release ("
            + "; ".join(signals)
            + "). Layout 'split_concat' applies to rxlm before commit a9bfd00 (mid-December 2025, ≈0.3.40) and the "
            "RxNN framework (RxT-Alpha era), 'interleaved' from then on. Pass --rope-layout interleaved|split_concat."
        )
    else:
        layout, how = "interleaved", "no old-era signal: rxlm ≥ 0.3.40 behaviour (interleaved)"
    report.data["rope_layout"] = {"value": layout, "decided_by": how, "old_era_signals": signals}

    # ---- token ids (§6.9) ----
    token_ids, tok_dir, tok_source = {}, None, None
    search_dirs = [Path(tokenizer)] if tokenizer else []
    search_dirs += [f.path for f in folders]
    if tokenizer and not (Path(tokenizer) / "tokenizer.json").is_file():
        raise ConversionError(f"--tokenizer folder '{tokenizer}' has no tokenizer.json.")
    tok_dir = _find_tokenizer(search_dirs)
    tok_ids = _tokenizer_json_ids(tok_dir / "tokenizer.json") if tok_dir else None
    if whole_cfg is not None and isinstance(whole_cfg.get("tokenizer_config"), dict):
        tc = whole_cfg["tokenizer_config"]
        unknown = [k for k in tc if k not in TOKEN_ID_FIELDS]
        if unknown:
            raise ConversionError(
                f"whole-model tokenizer_config has unknown fields {unknown}; expected {list(TOKEN_ID_FIELDS)}."
            )
        for field in TOKEN_ID_FIELDS:
            if field in tc:
                token_ids[field] = tc[field]
            elif tok_ids is not None:
                token_ids[field] = tok_ids[field]
            else:
                token_ids[field] = USUAL_TOKEN_IDS[field]
                if USUAL_TOKEN_IDS[field] is not None:
                    report.default("model", field, USUAL_TOKEN_IDS[field], "usual reference tokenizer id")
        tok_source = "whole-model tokenizer_config" + (f" (+ {tok_dir / 'tokenizer.json'})" if tok_ids else "")
    elif tok_ids is not None:
        absent = [TOKEN_STRINGS[f] for f in REQUIRED_TOKENS if tok_ids[f] is None]
        if absent:
            raise ConversionError(
                f"{tok_dir / 'tokenizer.json'} lacks the RxT special tokens {absent}; expected "
                f"{[TOKEN_STRINGS[f] for f in REQUIRED_TOKENS]}."
            )
        token_ids = dict(tok_ids)
        tok_source = str(tok_dir / "tokenizer.json")
    else:
        token_ids = dict(USUAL_TOKEN_IDS)
        tok_source = (
            "none: no tokenizer_config and no tokenizer.json found; the usual reference ids "
            "[PAD]=0 [UNK]=1 [BOS]=2 [EOS]=3 [MASK]=4 [Q]=5 [A]=6 are used"
        )
        report.note("token ids: " + tok_source)
    report.data["token_ids"] = {
        "values": token_ids,
        "source": tok_source,
        "tokenizer_dir": str(tok_dir.resolve()) if tok_dir else None,
    }

    # ---- config ----
    variant = mem["variant"]
    model_kwargs = {
        "memory_attention_variant": variant,
        "rope_layout": layout,
        "learned_stm_init": bool(import_stm),
        "use_mlm_head": mlm_view is not None,
        **token_ids,
    }
    if whole_cfg is not None and whole_cfg.get("system_prompt_title") is not None:
        model_kwargs["system_prompt_title"] = whole_cfg["system_prompt_title"]
    if "stm_init" not in model_kwargs:
        report.fact("model", "stm_init", "standard", "default", "runtime choice (rxlm 0.3.80 default N(0, 1))")
    try:
        config = RxTConfig(
            decoder_config=dict(dec_cfg),
            encoder_config=dict(enc_cfg),
            memory_attention_config=dict(mem_cfg),
            **model_kwargs,
        )
    except (ValueError, TypeError) as error:
        raise ConversionError(f"the inferred configuration is invalid for the project: {error}") from None

    # ---- state dict ----
    b = _Builder(report)
    # embedding (§6.8)
    dec_v, enc_v, mem_v = views["decoder"], views["encoder"], views["memory_attention"]
    if whole_cfg is not None and enc_v.has("embedding.weight") and dec_v.has("embedding.weight"):
        emb_from = "encoder (both names stored)"
    elif whole_cfg is not None:
        emb_from = "decoder.model.embedding.weight (kept copy; encoder name is an alias)"
    else:
        emb_from = "encoder"
    enc_emb = b.tensor(enc_v, "embedding.weight")
    b.put("model.embed_tokens.weight", enc_emb, enc_v.src("embedding.weight"))
    enc_v.consume("embedding.weight", "model.embed_tokens.weight")
    emb_report = {"taken_from": emb_from, "source_key": enc_v.src("embedding.weight")}
    same_tensor = (
        dec_v.has_any("embedding.weight")
        and (dec_v.folder is enc_v.folder)
        and (dec_v.full("embedding.weight") == enc_v.full("embedding.weight"))
    )
    if dec_v.has_any("embedding.weight") and not same_tensor:
        dec_emb = b.tensor(dec_v, "embedding.weight")
        if dec_emb.shape != enc_emb.shape:
            raise ConversionError(
                f"decoder embedding {_fmt_shape(dec_emb.shape)} and encoder embedding "
                f"{_fmt_shape(enc_emb.shape)} differ in shape."
            )
        diff = (dec_emb - enc_emb).abs().max().item()
        dec_v.consume("embedding.weight", f"compared with the encoder's table (max abs diff {diff:g}); not used")
        emb_report["decoder_max_abs_diff"] = diff
        if diff != 0:
            report.note(
                f"embedding: the decoder's table differs from the encoder's (max abs diff {diff:g}); the "
                "encoder's is used, as in the reference (the repos may come from different stages)."
            )
    elif dec_v.has_any("embedding.weight"):
        emb_report["decoder_max_abs_diff"] = 0.0
        emb_report["note"] = "decoder and encoder names resolve to one stored tensor"
    else:
        emb_report["decoder_max_abs_diff"] = None
        emb_report["note"] = "the decoder stores no embedding"
    report.data["embedding"] = emb_report

    _map_stack(dec_v, "decoder", b, report, False)
    _map_stack(enc_v, "encoder", b, report, enc["facts"]["dropped_cross"])
    _map_memory_attention(mem_v, config, variant, b, bool(import_stm))
    if mlm_view is not None:
        for key in mlm_view.keys():
            b.map(mlm_view, key, "mlm_head." + key)
    if import_stm:
        if not mem_v.has_any("stm.memory"):
            raise ConversionError("--import-stm: the memory attention stores no model.stm.memory.")
        stm = b.tensor(mem_v, "stm.memory")
        L, D = mem["facts"]["L"], mem["facts"]["D"]
        if tuple(stm.shape) != (L, 1, S, D):
            raise ConversionError(
                f"--import-stm: {mem_v.src('stm.memory')} has shape {_fmt_shape(stm.shape)}; "
                f"expected [L, 1, S, D] = {_fmt_shape((L, 1, S, D))}."
            )
        b.put("model.stm_init.stm", stm.clone(), mem_v.src("stm.memory"))
        mem_v.consume("stm.memory", "model.stm_init.stm")
        report.data["stm_import"] = {"source_key": mem_v.src("stm.memory"), "shape": list(stm.shape)}
    # other components' STM buffers in a whole-model file resolve to the same stored tensor: nothing else to do.

    # ---- strictness (§6.10) ----
    _check_strict(folders, b, expected_state_dict_shapes(config), "the inferred configuration")

    # ---- report ----
    for folder in folders:
        for name, (kind, detail) in sorted(folder.status.items()):
            if kind == "ignored" and not detail.startswith("dropped"):
                report.data["ignored_keys"].append({"key": f"{folder.role}:{name}", "reason": detail})
    report.data["key_map"] = {key: b.src[key] for key in sorted(b.sd)}
    report.data["consumed_keys"] = {
        f"{folder.role}:{name}": detail
        for folder in folders
        for name, (kind, detail) in sorted(folder.status.items())
        if kind == "consumed"
    }
    report.data["counts"] = {
        "stored_tensors": {f.role: len(f.tensors) for f in folders},
        "project_tensors": len(b.sd),
        "ignored": len(report.data["ignored_keys"]),
        "dropped": len(report.data["dropped_keys"]),
        "conflicts": len(report.data["conflicts"]),
    }
    report.data["config"] = {
        "memory_attention_variant": variant,
        "rope_layout": layout,
        "learned_stm_init": bool(import_stm),
        "use_mlm_head": mlm_view is not None,
    }
    state_dict = {k: v.contiguous() for k, v in b.sd.items()}
    result = (config, state_dict, report.data)
    if output is not None:
        write_converted_folder(config, state_dict, report.data, output, tokenizer_dir=tok_dir)
    return result


# ----------------------------------------------------------------------------------------------------------------
# MRL critic (checkpoints.md §4.8)
# ----------------------------------------------------------------------------------------------------------------

CRITIC_FIELDS = ("activation", "embed_dim", "init_scale")  # the reference always writes all three
CRITIC_ACTIVATIONS = ("sigmoid", "tanh", "linear")
# value head: reference prefix -> RxTCritic prefix
_CRITIC_HEAD = (("value_head.0.linear.", "glu."), ("value_head.1.", "norm."), ("value_head.2.", "value."))


def _critic_shapes(config: RxTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of `trainers.mrl.RxTCritic` for a policy with `config`, with its shape."""
    enc = config.encoder_config
    dim = enc.embed_dim
    shapes = {"encoder.embed_tokens.weight": (enc.vocab_size, dim)}
    shapes.update(_stack_shapes("encoder.encoder.", enc, decoder=False))
    shapes.update(
        {
            "glu.weight": (2 * dim, dim),  # GLU D -> D: first half linear, second half through SiLU
            "glu.bias": (2 * dim,),
            "norm.weight": (dim,),  # LayerNorm
            "norm.bias": (dim,),
            "value.weight": (1, dim),
            "value.bias": (1,),
            "scale": (),  # 0-dim
            "shift": (),
        }
    )
    return shapes


def convert_rxlm_critic(critic_dir, config: RxTConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """Convert a reference MRL critic folder (`MrlCriticModel`) into the state dict of `trainers.mrl.RxTCritic` for a
    policy with `config` (the converted model's config).

    `encoder.model.*` goes through the encoder mapping of the other inputs (RoPE and STM buffers ignored); the value
    head `value_head.{0.linear,1,2}.*` becomes `glu.*`, `norm.*`, `value.*`; `scale` and `shift` keep their names.

    Returns:
        `(state_dict, info)`; `info` holds the config's `activation` and `init_scale`, the input folder (with its
        config hash), the ignored keys and any dtype conversions.

    Raises:
        `ConversionError`: a config field is unknown, missing or invalid, or keys are missing, unexpected or mis-shaped
        (all of them listed, checkpoints.md §6.10).
    """
    folder = _Folder("critic", critic_dir)
    cfg, dim = folder.config, config.encoder_config.embed_dim
    errors = []
    _check_fields("critic", cfg, CRITIC_FIELDS, errors)
    errors += [f"critic config field '{field}' is missing" for field in CRITIC_FIELDS if field not in cfg]
    if "activation" in cfg and cfg["activation"] not in CRITIC_ACTIVATIONS:
        errors.append(f"critic activation={cfg['activation']!r}: expected one of {list(CRITIC_ACTIVATIONS)}")
    if "embed_dim" in cfg and cfg["embed_dim"] != dim:
        errors.append(f"critic embed_dim={cfg['embed_dim']}: the policy's is {dim}")
    if errors:
        raise ConversionError(f"critic folder '{folder.path}': invalid config.json:\n  " + "\n  ".join(errors))

    report = _Report()
    b = _Builder(report)
    encoder = _View(folder, "encoder.model.", "encoder")
    if encoder.has("embedding.weight"):
        b.map(encoder, "embedding.weight", "encoder.embed_tokens.weight")
    _map_stack(encoder, "encoder", b, report, False, target="encoder.encoder.")
    head = _View(folder, "", "critic")
    for key in head.keys():
        if key in ("scale", "shift"):
            b.map(head, key, key)
        for old, new in _CRITIC_HEAD:
            if key.startswith(old):
                b.map(head, key, new + key[len(old) :])
    _check_strict([folder], b, _critic_shapes(config), "the policy's critic")

    info = {
        "input": folder.describe(),
        "activation": cfg["activation"],
        "init_scale": cfg["init_scale"],
        "ignored_keys": [
            {"key": f"critic:{name}", "reason": detail}
            for name, (kind, detail) in sorted(folder.status.items())
            if kind == "ignored"
        ],
        "dtype_conversions": report.data["dtype_conversions"],
    }
    return {k: v.contiguous() for k, v in b.sd.items()}, info


def write_critic_folder(state_dict: dict, activation: str, init_scale: float, output) -> Path:
    """The MRL critic layout: `output/critic/model.safetensors` + `output/critic/config.json` (`activation`,
    `init_scale`), read back by MRL's `--critic_name_or_path`. Returns the critic folder."""
    folder = Path(output) / "critic"
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"activation": activation, "init_scale": init_scale}, indent=2))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _model_class():
    """`RxTForCausalLM` if the model module is available, else None."""
    try:
        from .modeling_rxt import RxTForCausalLM
    except ModuleNotFoundError as error:
        if error.name and error.name.endswith("modeling_rxt.modeling_rxt"):
            return None
        raise
    except ImportError:
        return None
    return RxTForCausalLM


def _compare_with_model(model, state_dict: dict) -> None:
    own = model.state_dict()
    unexpected = sorted(k for k in state_dict if k not in own)
    missing = sorted(k for k in own if k not in state_dict)
    shapes = sorted(
        f"{k}: converted {_fmt_shape(state_dict[k].shape)}, model {_fmt_shape(own[k].shape)}"
        for k in state_dict
        if k in own and tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    if unexpected or missing or shapes:
        parts = []
        if unexpected:
            parts.append(
                f"converted keys the model does not have ({len(unexpected)}):\n    " + "\n    ".join(unexpected)
            )
        if missing:
            parts.append(
                f"model keys not filled ({len(missing)}):\n    "
                + "\n    ".join(f"{k} {_fmt_shape(own[k].shape)}" for k in missing)
            )
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}):\n    " + "\n    ".join(shapes))
        raise ConversionError(
            "the converted state dict does not load strictly into RxTForCausalLM; nothing was "
            "written.\n  " + "\n  ".join(parts)
        )


def _write_tokenizer(tokenizer_dir: Path, output: Path, config: RxTConfig, report: dict) -> list[str]:
    written = []
    try:
        from transformers import PreTrainedTokenizerFast

        from .tokenization_rxt import RXT_CHAT_TEMPLATE
    except ImportError:
        PreTrainedTokenizerFast, RXT_CHAT_TEMPLATE = None, None  # noqa: N806
    if PreTrainedTokenizerFast is not None and RXT_CHAT_TEMPLATE is not None:
        try:
            if (tokenizer_dir / "tokenizer_config.json").is_file():
                tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
            else:
                tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
            specials = {}
            for attr, field in (
                ("pad_token", "pad_token_id"),
                ("unk_token", "unk_token_id"),
                ("bos_token", "bos_token_id"),
                ("eos_token", "eos_token_id"),
                ("mask_token", "mask_token_id"),
            ):
                if getattr(tok, attr, None) is None and getattr(config, field, None) is not None:
                    specials[attr] = TOKEN_STRINGS[field]
            if specials:
                tok.add_special_tokens(specials)
            tok.chat_template = RXT_CHAT_TEMPLATE
            tok.padding_side = "right"
            written = tok.save_pretrained(str(output))
            report.setdefault("tokenizer_output", {})["chat_template"] = (
                "RXT_CHAT_TEMPLATE (modeling_rxt.tokenization_rxt)"
            )
            return [Path(p).name for p in written]
        except Exception as error:  # noqa: BLE001 - fall back to copying the files
            report.setdefault("tokenizer_output", {})["warning"] = f"tokenizer could not be re-saved ({error}); copied"
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, output / name)
            written.append(name)
    return written


def write_converted_folder(
    config: RxTConfig, state_dict: dict, report: dict, output, tokenizer_dir=None, use_model: bool | None = None
) -> Path:
    """Write the converted folder: config, weights, tokenizer files and `conversion_report.json`.

    If `modeling_rxt.modeling_rxt.RxTForCausalLM` is importable (and `use_model` is not False), the state dict is
    loaded strictly into a fresh model (every difference is listed before anything is written) and the folder is
    written by `model.save_pretrained` (which adds the code files and `auto_map`). Otherwise config.json and
    model.safetensors are written directly.
    """
    output = Path(output)
    report = report if report is not None else {}
    model_cls = _model_class() if use_model is not False else None
    if use_model is True and model_cls is None:
        raise ConversionError("use_model=True but modeling_rxt.modeling_rxt.RxTForCausalLM is not importable.")
    model = None
    if model_cls is not None:
        model = model_cls(copy.deepcopy(config))
        _compare_with_model(model, state_dict)
        model.load_state_dict(state_dict, strict=True)
    if output.exists() and not output.is_dir():
        raise ConversionError(f"output '{output}' exists and is not a folder.")
    output.mkdir(parents=True, exist_ok=True)
    if model is not None:
        model.save_pretrained(str(output))
        report["output_writer"] = "RxTForCausalLM.save_pretrained"
    else:
        cfg = copy.deepcopy(config)
        cfg.architectures = ["RxTForCausalLM"]
        cfg.save_pretrained(str(output))
        save_file(
            {k: v.detach().contiguous() for k, v in state_dict.items()},
            str(output / "model.safetensors"),
            metadata={"format": "pt"},
        )
        report["output_writer"] = "config.save_pretrained + safetensors.save_file (model module not available)"
    if tokenizer_dir is None:
        tdir = (report.get("token_ids") or {}).get("tokenizer_dir")
        tokenizer_dir = Path(tdir) if tdir else None
    if tokenizer_dir is not None:
        report["tokenizer_files"] = _write_tokenizer(Path(tokenizer_dir), output, config, report)
    else:
        report["tokenizer_files"] = []
    report["output"] = str(output.resolve())
    (output / REPORT_NAME).write_text(
        json.dumps(report, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8"
    )
    return output
