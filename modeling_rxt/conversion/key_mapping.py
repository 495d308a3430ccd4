"""Key mapping: every reference key of a component → its project name (docs/conversion.md#state-dict-keys,
docs/conversion.md#embedding, docs/conversion.md#strictness-and-the-report), legacy MoE storage through `legacy_moe`,
buffers ignored with the reason; and the strict check that every stored tensor was consumed or ignored and every
expected parameter filled with its exact shape."""

from __future__ import annotations

import re

from .builder import Builder
from .folders import ConversionError, Folder, View, fmt_shape, is_rope
from .legacy_moe import LEGACY_EXPERT_KEY, convert_legacy_ff
from .report import Report

_RENAMES = (
    (".ff.shared_expert.fc1.linear.", ".ff.shared_expert.fc1."),
    (".ff.fc1.linear.", ".ff.fc1."),
    (".ff.router.gate.weight", ".ff.router.weight"),
)


def _rename(key: str) -> str:
    key = "." + key
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key[1:]


def map_stack(
    view: View, role: str, b: Builder, report: Report, dropped_cross: bool, target: str | None = None
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
        if is_rope(key):
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
        m = LEGACY_EXPERT_KEY.match(key)
        if m:
            legacy_prefixes.add(m.group(1))
            continue
        if role == "decoder" and key.startswith("head."):
            b.map(view, key, "lm_head." + key[len("head.") :])
            continue
        b.map(view, key, target + _rename(key))
    for prefix in sorted(legacy_prefixes):
        convert_legacy_ff(view, prefix, target + prefix, b)


def map_memory_attention(view: View, config, variant: str, b: Builder, import_stm: bool) -> None:
    """Map memory-attention keys to `model.memory_attention.` + the same name (the project keeps the reference's)."""
    m = config.memory_attention_config
    for key in view.keys():
        if key == "stm.memory":
            if not import_stm:
                view.ignore(key, "runtime STM buffer (ignored; pass --import-stm to use it as a learned initial STM)")
            continue
        if is_rope(key):
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
            # otherwise mapped: if the gate cannot use it, the strict check reports it as unexpected
        b.map(view, key, "model.memory_attention." + key)


def check_strict(folders: list[Folder], b: Builder, expected: dict, against: str) -> None:
    """docs/conversion.md#strictness-and-the-report: every stored tensor consumed or ignored, every expected key filled
    with its exact shape; otherwise a `ConversionError` lists every unexpected, missing and mis-shaped key (`against`
    names the expected key set)."""
    problems_unexpected, problems_missing, problems_shape = [], [], []
    for folder in folders:
        for name in sorted(folder.tensors):
            if name not in folder.status:
                problems_unexpected.append(
                    f"{folder.role}:{name} {fmt_shape(folder.tensors[name].shape)} "
                    "(no project parameter corresponds to it)"
                )
    for key in sorted(b.sd):
        if key not in expected:
            problems_unexpected.append(
                f"{b.src[key]} {fmt_shape(b.sd[key].shape)} -> {key}: {against} has no such parameter"
            )
        elif tuple(b.sd[key].shape) != tuple(expected[key]):
            problems_shape.append(
                f"{key} from {b.src[key]}: shape {fmt_shape(b.sd[key].shape)}, expected {fmt_shape(expected[key])}"
            )
    for key, shape in expected.items():
        if key not in b.sd:
            problems_missing.append(f"{key} {fmt_shape(shape)}")
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
