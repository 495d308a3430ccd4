"""The RoPE layout of the checkpoint (docs/conversion.md#rope-layout): the flag, else the input configs' `rope_layout`,
else interleaved unless the inputs show a sign of an older reference release (then the flag is required)."""

from __future__ import annotations

from .folders import ConversionError
from .inputs import Inputs
from .legacy_moe import LEGACY_EXPERT_KEY
from .reference_config import MEMORY_ATTENTION_ALWAYS_WRITTEN, ROPE_LAYOUT_CHOICES
from .report import Report


def _old_era_signals(views: dict, configs: dict, component_memattn_config: bool) -> list[str]:
    """What marks the inputs as written by an older reference release (the RoPE layout must then be given)."""
    signals = []
    for role in ("decoder", "encoder"):
        view, cfg = views[role], configs[role]
        if any(LEGACY_EXPERT_KEY.match(k) and ".experts." in "." + k for k in view.stored):
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


def decide_rope_layout(inputs: Inputs, rope_layout: str | None, component_memattn_config: bool, report: Report) -> str:
    """The layout, recorded in the report with how it was decided and the old-era signals found."""
    views, configs, whole_cfg = inputs.views, inputs.configs, inputs.whole_cfg
    signals = _old_era_signals(views, configs, component_memattn_config)
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
    return layout
