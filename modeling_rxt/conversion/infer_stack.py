"""Inferring a decoder's or encoder's project config from its tensors (docs/conversion.md#order-of-authority): layers,
width, vocabulary, heads, feed-forward kind (dense / gated / MoE, stacked or legacy storage), norms, stateless layers;
config-only fields from the config or the 0.3.80 defaults, every disagreement recorded as a conflict."""

from __future__ import annotations

from .folders import ConversionError, View, count_indexed, count_layers, fmt_shape, is_rope
from .infer_attention import check_rope, config_heads, infer_head_dim, infer_site, report_head_conflict
from .reference_config import COMPONENT_DEFAULTS, Fields
from .report import Report


def classify_ff(view: View, prefix: str) -> dict | None:
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
                    f"{view.name}: MoE at '{view.prefix}{prefix}': w1 {fmt_shape(w1)} and w2 {fmt_shape(w2)} do "
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
            ns = count_indexed(keys, "shared_experts.")
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


def infer_stack(view: View, fields: Fields, role: str, report: Report, opts: dict) -> dict:
    """Infer the project component config of a decoder or encoder (docs/conversion.md#order-of-authority). Returns
    `{"config": …, "facts": …}`."""
    comp = role
    keys = view.keys()
    cfg = fields.config
    fact = report.fact

    # L
    L = count_layers(view, "layers.", "attention.q_proj.weight", comp)
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
                f"{comp}: head.weight {fmt_shape(view.shape('head.weight'))} does not match the vocabulary size "
                f"V={V} of embedding.weight."
            )

    # RoPE / NoPE, hd
    has_rope = any(is_rope(k) for k in list(view.stored) + list(view.alias))
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
    hd, H, _ = infer_head_dim(view, fields, comp, D, report)
    rope_base = fields.get("rope_base")
    if use_rope:
        check_rope(view, hd, rope_base, comp, report)

    # attention sites
    self_site = infer_site(view, [f"layers.{i}.attention." for i in range(L)], hd, D, "self-attention")
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
        cross_site = infer_site(view, cross_prefixes, hd, D, "memory cross-attention")
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
    ff_infos = [classify_ff(view, f"layers.{i}.ff.") for i in range(L)]
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
            n = count_indexed(keys, prefix)
            if n == 0:
                continue
            cfg_list = cfg.get(field) if isinstance(cfg.get(field), list) else None
            kinds = []
            for j in range(n):
                info = classify_ff(view, f"{prefix}{j}.ff.")
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
    structural = "structural fact taken from the tensors"
    for field, used in (
        ("num_layers", L),
        ("embed_dim", D),
        ("vocab_size", V),
        ("use_gated", use_gated),
        ("use_rms_norm", use_rms_norm),
        ("use_moe", use_moe),
        ("use_attention_output_bias", self_site["bias"]),
        ("use_gated_attention", self_site["gated"]),
        ("ff_dim", F),
    ):
        report.compare(comp, cfg, field, used, structural)
    if role == "decoder":
        report.compare(comp, cfg, "use_head_norm", use_head_norm, structural)
        if use_head_norm:
            report.compare(comp, cfg, "head_norm_type", head_norm_type, structural)
        gated_cross_cfg = cfg.get("use_gated_cross_attention")
        if gated_cross_cfg is None and "use_gated_attention" in cfg:
            gated_cross_cfg = cfg["use_gated_attention"]
        if gated_cross_cfg is not None and gated_cross_cfg != cross_site["gated"]:
            report.conflict(comp, "use_gated_cross_attention", gated_cross_cfg, cross_site["gated"], structural)
        for field in ("stateless_layers_config", "final_stateless_layers_config"):
            if field in cfg and (cfg[field] or None) != stateless[field]:  # [] states no stateless layers too
                report.conflict(comp, field, cfg[field], stateless[field], structural)
        if dense_widths:
            report.compare(comp, cfg, "dense_layer_dim", dense_layer_dim, structural)
    if use_moe:
        for field in ("num_experts", "num_shared_experts", "moe_bias_mode"):
            report.compare(comp, cfg, field, moe[field], structural)
        if "num_shared_experts" not in cfg and moe["num_shared_experts"] != COMPONENT_DEFAULTS["num_shared_experts"]:
            report.note(
                f"{comp}: num_shared_experts={moe['num_shared_experts']} from the keys (the 0.3.80 default "
                "of 1 would add a randomly initialised shared expert)."
            )
        if moe["num_shared_experts"]:
            stated = cfg.get("shared_expert_dim") or cfg.get("ff_dim")  # the reference's width when it is None
            if (cfg.get("shared_expert_dim") is not None or "ff_dim" in cfg) and stated != moe["shared_expert_dim"]:
                report.conflict(comp, "shared_expert_dim", stated, moe["shared_expert_dim"], structural)
            report.compare(comp, cfg, "moe_shared_experts_bias_mode", moe["moe_shared_experts_bias_mode"], structural)
    # heads
    if "self_att_type" in cfg:
        report_head_conflict(
            report,
            comp,
            {key: cfg.get(key) for key in ("self_att_type", "att_groups", "att_query_groups")},
            config_heads(
                cfg["self_att_type"], cfg.get("att_heads", H), cfg.get("att_groups", 1), cfg.get("att_query_groups")
            ),
            self_site,
            "head counts taken from the projection shapes",
        )
    if role == "decoder" and "cross_att_type" in cfg:
        groups = cfg.get("cross_att_groups") or cfg.get("att_groups", 1)
        qgroups = cfg.get("cross_att_query_groups") or cfg.get("att_query_groups")
        report_head_conflict(
            report,
            comp,
            {key: cfg.get(key) for key in ("cross_att_type", "cross_att_groups", "cross_att_query_groups")},
            config_heads(cfg["cross_att_type"], cfg.get("att_heads", H), groups, qgroups),
            cross_site,
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
