"""The conversion entry point: `convert_rxlm_checkpoint` reads the reference folders, infers the project config,
decides the RoPE layout (§6.6) and token ids (§6.9), maps every key and checks the result strictly (§6.10)."""

from __future__ import annotations

from ..configuration_rxt import RxTConfig
from .builder import Builder
from .folders import ConversionError, Folder, View, fmt_shape
from .infer_memory_attention import infer_memory_attention
from .infer_stack import infer_stack
from .key_mapping import check_strict, map_memory_attention, map_stack
from .legacy_moe import LEGACY_EXPERT_KEY
from .reference_config import (
    COMPONENT_DEFAULTS,
    DROPPED_FIELDS,
    MEMORY_ATTENTION_ALWAYS_WRITTEN,
    MEMORY_ATTENTION_DEFAULTS,
    ROPE_LAYOUT_CHOICES,
    VARIANT_CHOICES,
    WHOLE_MODEL_FIELDS,
    WHOLE_MODEL_MEMORY_ATTENTION_DEFAULTS,
    Fields,
    check_fields,
)
from .report import Report
from .shapes import expected_state_dict_shapes
from .tokens import resolve_token_ids
from .writing import write_converted_folder


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


def _check_mlm(view: View, cfg: dict, report: Report, errors: list[str]) -> None:
    """The MLM head's config fields, and its width / vocabulary from `decoder.weight`."""
    check_fields("mlm_head", cfg, {"embed_dim", "vocab_size"}, errors)
    if view.has("decoder.weight"):
        V, D = view.shape("decoder.weight")
        report.fact("mlm_head", "vocab_size", V, "shape", "decoder.weight.shape[0]")
        report.fact("mlm_head", "embed_dim", D, "shape", "decoder.weight.shape[1]")
        for field, used in (("embed_dim", D), ("vocab_size", V)):
            if field in cfg and cfg[field] != used:
                report.conflict("mlm_head", field, cfg[field], used, "structural fact taken from the tensors")


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
    overwrite: bool = False,
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
        overwrite: replace the whole content of a non-empty `output` (otherwise it is refused).

    Returns:
        `(RxTConfig, state_dict, report)`.

    Raises:
        `ValueError` (`ConversionError`): anything that prevents an exact, complete conversion; nothing is written.
    """
    report = Report()
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
    folders: list[Folder] = []
    errors: list[str] = []
    whole_cfg = None
    if whole_model is not None:
        if decoder is not None or encoder is not None or memory_attention is not None:
            raise ConversionError("give either --whole-model or --decoder/--encoder/--memory-attention, not both.")
        wm = Folder("whole_model", whole_model)
        folders.append(wm)
        whole_cfg = wm.config
        check_fields("whole-model", whole_cfg, WHOLE_MODEL_FIELDS, errors)
        views = {
            "decoder": View(wm, "decoder.model.", "decoder"),
            "encoder": View(wm, "encoder.model.", "encoder"),
            "memory_attention": View(wm, "memory_attention.model.", "memory_attention"),
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
            Folder("decoder", decoder),
            Folder("encoder", encoder),
            Folder("memory_attention", memory_attention),
        )
        folders += [dec_f, enc_f, mem_f]
        views = {
            "decoder": View(dec_f, "model.", "decoder"),
            "encoder": View(enc_f, "model.", "encoder"),
            "memory_attention": View(mem_f, "model.", "memory_attention"),
        }
        configs = {"decoder": dec_f.config, "encoder": enc_f.config, "memory_attention": mem_f.config}
        opts["memory_attention_component_config"] = True
        for f in (dec_f, enc_f, mem_f):
            report.data["inputs"][f.role] = f.describe()
    mlm_view = None
    if mlm_head is not None:
        mlm_f = Folder("mlm_head", mlm_head)
        folders.append(mlm_f)
        mlm_view = View(mlm_f, "", "mlm_head")
        report.data["inputs"]["mlm_head"] = mlm_f.describe()

    # ---- config fields ----
    component_allowed = set(COMPONENT_DEFAULTS) | {"rope_layout"}
    memattn_allowed = set(MEMORY_ATTENTION_DEFAULTS) | {"rope_layout"}
    check_fields("decoder", configs["decoder"], component_allowed, errors)
    check_fields("encoder", configs["encoder"], component_allowed, errors)
    check_fields("memory_attention", configs["memory_attention"], memattn_allowed, errors)
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
        "decoder": Fields("decoder", configs["decoder"], COMPONENT_DEFAULTS, report, "rxlm 0.3.80 default"),
        "encoder": Fields("encoder", configs["encoder"], COMPONENT_DEFAULTS, report, "rxlm 0.3.80 default"),
        "memory_attention": Fields(
            "memory_attention",
            configs["memory_attention"],
            memattn_defaults,
            report,
            note_mem or "rxlm 0.3.80 default",
        ),
    }

    # ---- inference ----
    dec = infer_stack(views["decoder"], fields["decoder"], "decoder", report, opts)
    enc = infer_stack(views["encoder"], fields["encoder"], "encoder", report, opts)
    mem = infer_memory_attention(views["memory_attention"], fields["memory_attention"], report, opts)
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
    token_ids, tok_dir = resolve_token_ids(tokenizer, [f.path for f in folders], whole_cfg, report)

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
    b = Builder(report)
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
                f"decoder embedding {fmt_shape(dec_emb.shape)} and encoder embedding "
                f"{fmt_shape(enc_emb.shape)} differ in shape."
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

    map_stack(dec_v, "decoder", b, report, False)
    map_stack(enc_v, "encoder", b, report, enc["facts"]["dropped_cross"])
    map_memory_attention(mem_v, config, variant, b, bool(import_stm))
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
                f"--import-stm: {mem_v.src('stm.memory')} has shape {fmt_shape(stm.shape)}; "
                f"expected [L, 1, S, D] = {fmt_shape((L, 1, S, D))}."
            )
        b.put("model.stm_init.stm", stm.clone(), mem_v.src("stm.memory"))
        mem_v.consume("stm.memory", "model.stm_init.stm")
        report.data["stm_import"] = {"source_key": mem_v.src("stm.memory"), "shape": list(stm.shape)}
    # other components' STM buffers in a whole-model file resolve to the same stored tensor: nothing else to do.

    # ---- strictness (§6.10) ----
    check_strict(folders, b, expected_state_dict_shapes(config), "the inferred configuration")

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
        inputs = [decoder, encoder, memory_attention, mlm_head, whole_model, tokenizer]
        write_converted_folder(
            config, state_dict, report.data, output, tokenizer_dir=tok_dir, overwrite=overwrite, inputs=inputs
        )
    return result
