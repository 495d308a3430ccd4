"""The inputs of a conversion: the reference folders (three components or one whole-model folder, optional MLM
head), their configs' fields checked against the reference's (docs/conversion.md#reading-the-reference-folders,
docs/conversion.md#order-of-authority), and per component the config access (`Fields`) that fills omitted fields with
the 0.3.80 defaults."""

from __future__ import annotations

from dataclasses import dataclass

from .folders import ConversionError, Folder, View
from .reference_config import (
    COMPONENT_DEFAULTS,
    DROPPED_FIELDS,
    MEMORY_ATTENTION_DEFAULTS,
    WHOLE_MODEL_FIELDS,
    WHOLE_MODEL_MEMORY_ATTENTION_DEFAULTS,
    Fields,
    check_fields,
)
from .report import Report


@dataclass
class Inputs:
    """The folders read, a view of each component's keys, each component's config, the whole-model config (if the
    input is one whole-model folder) and the MLM head's view (if given)."""

    folders: list[Folder]
    views: dict[str, View]
    configs: dict[str, dict]
    whole_cfg: dict | None
    mlm_view: View | None


def read_inputs(decoder, encoder, memory_attention, mlm_head, whole_model, report: Report, opts: dict) -> Inputs:
    """Read the input folders and check every config field (unknown or out-of-scope fields are listed together)."""
    errors: list[str] = []
    folders: list[Folder] = []
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
    return Inputs(folders, views, configs, whole_cfg, mlm_view)


def component_fields(inputs: Inputs, report: Report) -> dict[str, Fields]:
    """Config access per component: the config's value, else the 0.3.80 default (a whole-model config's memory
    attention holds only the fields passed to it, so its own defaults apply there)."""
    configs = inputs.configs
    memattn_defaults = dict(MEMORY_ATTENTION_DEFAULTS)
    note_mem = None
    if inputs.whole_cfg is not None:
        memattn_defaults.update(WHOLE_MODEL_MEMORY_ATTENTION_DEFAULTS)
        note_mem = (
            "whole-model memory_attention_config holds only passed fields (docs/conversion.md#order-of-authority)"
        )
    return {
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
