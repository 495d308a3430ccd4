"""Inferring the memory attention's project config from its tensors (docs/conversion.md#order-of-authority,
docs/conversion.md#memory-attention-variant): the variant from the module families (with the flag / config resolving
the ungated interlayer ambiguity), heads of every attention site, memory-norm type, residual gates and the slot
count."""

from __future__ import annotations

from .folders import ConversionError, View, count_layers
from .infer_attention import check_rope, config_heads, infer_head_dim, infer_site, report_head_conflict
from .reference_config import SELF_INTERLAYER_FAMILY, Fields
from .report import Report

# Memory-attention module families (first key component) by variant.
_MEMATTN_SELF = {"self_attention_layers", "self_memory_norm_layers", "self_residual_gate_layers"}
_MEMATTN_MEAN = {"mean_attention_layers", "mean_memory_norm_layers", "mean_stm_norm", "mean_residual_gate_layers"}


def _norm_kind(view: View, prefix: str, dim: int) -> dict | None:
    """Memory-norm type from its keys (docs/conversion.md#state-dict-keys)."""
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


def _gate_kind(view: View, prefix: str) -> dict:
    """Residual-gate type from its keys (docs/conversion.md#order-of-authority): ungated, 'param' (static/elementwise)
    or linear."""
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


def _classify_variant(view: View) -> tuple[str | None, str]:
    """Variant from the module families (docs/conversion.md#memory-attention-variant). Returns (variant or 'ambiguous'
    family, reason)."""
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


def infer_memory_attention(view: View, fields: Fields, report: Report, opts: dict) -> dict:
    comp = "memory_attention"
    cfg = fields.config
    fact = report.fact
    L = count_layers(view, "attention_layers.", "q_proj.weight", comp)
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
    hd, H, _ = infer_head_dim(view, fields, comp, D, report)
    rope_base = fields.get("rope_base")
    check_rope(view, hd, rope_base, comp, report)

    main = infer_site(view, [f"attention_layers.{i}." for i in range(L)], hd, D, "main memory attention")
    fact(comp, "attention_heads", {"Hq": main["hq"], "Hkv": main["hkv"]}, "shape", main["from"] + "{q,k}_proj.weight")

    # ---- variant (docs/conversion.md#memory-attention-variant) ----
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
        s = infer_site(view, [prefix_fmt.format(i) for i in range(L)], hd, D, name)
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
    fact(comp, "norm_type", norm_type, "key", "memory_norm_layers.{i} keys (docs/conversion.md#state-dict-keys)")
    report.compare(comp, cfg, "norm_type", norm_type, "norm type taken from the norm keys")
    if norm_type == "positional":
        norm_per_dim_scale = norm_info["per_dim_scale"]
        fact(comp, "norm_per_dim_scale", norm_per_dim_scale, "shape", "positional scale [D] vs [S, 1]")
        report.compare(comp, cfg, "norm_per_dim_scale", norm_per_dim_scale, "taken from the positional scale shape")
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
    report.compare(comp, cfg, "use_gated_residual", use_gated_residual, "taken from the gate keys")
    self_gate = gate_infos.get("self_residual_gate_layers")
    use_gate_for_self = bool(self_gate and self_gate["gated"]) if variant == "self" else False
    if variant == "self":
        fact(comp, "use_gate_for_self_attention", use_gate_for_self, "key", "gate keys in self_residual_gate_layers")
        report.compare(comp, cfg, "use_gate_for_self_attention", use_gate_for_self, "taken from the self gate keys")
    elif cfg.get("use_gate_for_self_attention"):
        report.note(
            f"{comp}: use_gate_for_self_attention=true has no effect in the {variant!r} variant; written as false."
        )
    gated_ref = next((g for g in (gate_infos.get(f) for f in gate_families) if g and g["gated"]), None)
    if gated_ref is not None:
        if gated_ref["kind"] == "linear":
            gate_type = "linear"
            fact(comp, "residual_gate_type", gate_type, "key", "gate.weight ⇒ linear")
            report.compare(comp, cfg, "residual_gate_type", "linear", "gate.weight keys ⇒ linear gate")
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
        report.compare(comp, cfg, "residual_per_slot_gate", per_slot, "taken from the gate shapes")
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
    report.compare(comp, cfg, "residual_gate_slot_status_type", slot_status_type, "taken from the slot_status keys")

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
        report_head_conflict(
            report,
            comp,
            {prefix + name: cfg.get(prefix + name) for name in ("type", "groups", "query_groups")},
            config_heads(
                cfg[prefix + "type"],
                cfg.get("att_heads", H),
                cfg.get(prefix + "groups", 1),
                cfg.get(prefix + "query_groups"),
            ),
            s,
            "head counts taken from the projection shapes",
        )
    for field, used in (("num_layers", L), ("embed_dim", D)):
        report.compare(comp, cfg, field, used, "structural fact taken from the tensors")

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
