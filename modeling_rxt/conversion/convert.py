"""The conversion entry point: `convert_rxlm_checkpoint` reads the reference folders, infers the project config,
decides the RoPE layout (docs/conversion.md#rope-layout) and token ids (docs/conversion.md#token-ids), maps every key
and checks the result strictly (docs/conversion.md#strictness-and-the-report)."""

from __future__ import annotations

from ..configuration_rxt import RxTConfig
from .builder import Builder
from .folders import ConversionError, Folder, View, fmt_shape
from .infer_memory_attention import infer_memory_attention
from .infer_stack import infer_stack
from .inputs import component_fields, read_inputs
from .key_mapping import check_strict, map_memory_attention, map_stack
from .reference_config import (
    ROPE_LAYOUT_CHOICES,
    VARIANT_CHOICES,
)
from .report import Report
from .rope_layout import decide_rope_layout
from .shapes import expected_state_dict_shapes
from .tokens import resolve_token_ids
from .writing import write_converted_folder


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

    # ---- inputs and config fields ----
    inputs = read_inputs(decoder, encoder, memory_attention, mlm_head, whole_model, report, opts)
    folders, views, whole_cfg, mlm_view = inputs.folders, inputs.views, inputs.whole_cfg, inputs.mlm_view
    fields = component_fields(inputs, report)

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

    # ---- RoPE layout (docs/conversion.md#rope-layout) ----
    layout = decide_rope_layout(inputs, rope_layout, opts["memory_attention_component_config"], report)

    # ---- token ids (docs/conversion.md#token-ids) ----
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
    dec_v, enc_v, mem_v = views["decoder"], views["encoder"], views["memory_attention"]
    _map_embedding(dec_v, enc_v, whole_cfg is not None, b, report)
    map_stack(dec_v, "decoder", b, report, False)
    map_stack(enc_v, "encoder", b, report, enc["facts"]["dropped_cross"])
    map_memory_attention(mem_v, config, variant, b, bool(import_stm))
    if mlm_view is not None:
        for key in mlm_view.keys():
            b.map(mlm_view, key, "mlm_head." + key)
    if import_stm:
        _import_stm(mem_v, (mem["facts"]["L"], 1, S, mem["facts"]["D"]), b, report)
    # other components' STM buffers in a whole-model file resolve to the same stored tensor: nothing else to do.

    # ---- strictness (docs/conversion.md#strictness-and-the-report) ----
    check_strict(folders, b, expected_state_dict_shapes(config), "the inferred configuration")

    # ---- report ----
    _finish_report(report, folders, b)
    report.data["config"] = {
        "memory_attention_variant": variant,
        "rope_layout": layout,
        "learned_stm_init": bool(import_stm),
        "use_mlm_head": mlm_view is not None,
    }
    state_dict = {k: v.contiguous() for k, v in b.sd.items()}
    result = (config, state_dict, report.data)
    if output is not None:
        input_paths = [decoder, encoder, memory_attention, mlm_head, whole_model, tokenizer]
        write_converted_folder(
            config, state_dict, report.data, output, tokenizer_dir=tok_dir, overwrite=overwrite, inputs=input_paths
        )
    return result


def _map_embedding(dec_v: View, enc_v: View, whole_model: bool, b: Builder, report: Report) -> None:
    """The shared embedding is the encoder's (docs/conversion.md#embedding); the decoder's copy, if stored apart, is
    compared with it."""
    if whole_model and enc_v.has("embedding.weight") and dec_v.has("embedding.weight"):
        emb_from = "encoder (both names stored)"
    elif whole_model:
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


def _finish_report(report: Report, folders: list[Folder], b: Builder) -> None:
    """Ignored and consumed keys, the key map and the counts."""
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


def _import_stm(mem_v: View, shape: tuple[int, ...], b: Builder, report: Report) -> None:
    """`--import-stm`: the memory attention's stored STM `[L, 1, S, D]` becomes the learned initial STM."""
    if not mem_v.has_any("stm.memory"):
        raise ConversionError("--import-stm: the memory attention stores no model.stm.memory.")
    stm = b.tensor(mem_v, "stm.memory")
    if tuple(stm.shape) != shape:
        raise ConversionError(
            f"--import-stm: {mem_v.src('stm.memory')} has shape {fmt_shape(stm.shape)}; "
            f"expected [L, 1, S, D] = {fmt_shape(shape)}."
        )
    b.put("model.stm_init.stm", stm.clone(), mem_v.src("stm.memory"))
    mem_v.consume("stm.memory", "model.stm_init.stm")
    report.data["stm_import"] = {"source_key": mem_v.src("stm.memory"), "shape": list(stm.shape)}
