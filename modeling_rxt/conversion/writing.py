"""Writing the converted folder: the state dict loaded strictly into `RxTForCausalLM` and saved by
`save_pretrained` (code files and `auto_map` included), the tokenizer with the RxT chat template, and
`conversion_report.json`. The folder is written beside the output and moved into place only when complete."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file
from transformers import PreTrainedTokenizerFast

from ..configuration_rxt import RxTConfig
from ..modeling_rxt import RxTForCausalLM
from ..tokenization_rxt import RXT_CHAT_TEMPLATE, RXT_TOKEN_ID_FIELDS
from .folders import ConversionError, fmt_shape
from .report import REPORT_NAME
from .tokens import TOKENIZER_FILES


def _compare_with_model(model, state_dict: dict) -> None:
    own = model.state_dict()
    unexpected = sorted(k for k in state_dict if k not in own)
    missing = sorted(k for k in own if k not in state_dict)
    shapes = sorted(
        f"{k}: converted {fmt_shape(state_dict[k].shape)}, model {fmt_shape(own[k].shape)}"
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
                + "\n    ".join(f"{k} {fmt_shape(own[k].shape)}" for k in missing)
            )
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}):\n    " + "\n    ".join(shapes))
        raise ConversionError(
            "the converted state dict does not load strictly into RxTForCausalLM; nothing was "
            "written.\n  " + "\n  ".join(parts)
        )


def _write_tokenizer(tokenizer_dir: Path, output: Path, config: RxTConfig, report: dict) -> list[str]:
    """Re-save the tokenizer with the RxT chat template (and any named special token it lacks) into `output`; if it
    cannot be loaded, copy its files. Returns the names written."""
    written = []
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
                specials[attr] = RXT_TOKEN_ID_FIELDS[field]
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


def check_output_folder(output, overwrite: bool = False, inputs=()) -> Path:
    """Refuse an output that is a file, or a non-empty folder unless `overwrite` (whose content the new folder then
    replaces entirely); refuse, even with `overwrite`, a folder that holds an input or the working directory."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ConversionError(f"output '{output}' exists and is not a folder.")
    if not output.is_dir() or not any(output.iterdir()):
        return output
    if not overwrite:
        entries = sorted(p.name for p in output.iterdir())
        shown = ", ".join(entries[:5]) + (f", … ({len(entries)} entries)" if len(entries) > 5 else "")
        raise ConversionError(
            f"output folder '{output}' is not empty ({shown}); expected an empty or new folder. Pass --overwrite "
            "(overwrite=True) to replace its whole content with the converted folder."
        )
    resolved = output.resolve()
    protected = [Path.cwd()] + [Path(p) for p in inputs if p is not None]
    for path in protected:
        path = path.resolve()
        if path == resolved or resolved in path.parents:
            raise ConversionError(
                f"--overwrite would replace '{output}', which holds '{path}' (an input or the working directory); "
                "choose another output folder."
            )
    return output


def write_converted_folder(
    config: RxTConfig,
    state_dict: dict,
    report: dict,
    output,
    tokenizer_dir=None,
    use_model: bool = True,
    overwrite: bool = False,
    inputs=(),
) -> Path:
    """Write the converted folder: config, weights, tokenizer files and `conversion_report.json`.

    With `use_model` (default) the state dict is loaded strictly into a fresh `RxTForCausalLM` (every difference is
    listed before anything is written) and the folder is written by `model.save_pretrained` (which adds the code
    files and `auto_map`); otherwise config.json and model.safetensors are written directly.

    An existing non-empty `output` is refused unless `overwrite`; then the new folder replaces its whole content
    (no file of an earlier conversion, such as a tokenizer or a shard index, is left behind). `inputs`: folders the
    output must not contain (`check_output_folder`). The folder is written beside `output` and moved into place
    only once complete.
    """
    output = check_output_folder(output, overwrite, inputs)
    report = report if report is not None else {}
    model = None
    if use_model:
        model = RxTForCausalLM(copy.deepcopy(config))
        _compare_with_model(model, state_dict)
        model.load_state_dict(state_dict, strict=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.converting-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)  # our own leftover of this process id
    staging.mkdir()
    try:
        _write_folder(config, state_dict, report, staging, output, model, tokenizer_dir)
        if output.is_dir():
            old = output.parent / f".{output.name}.replaced-{os.getpid()}"
            output.rename(old)
            staging.rename(output)
            shutil.rmtree(old)
        else:
            staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _write_folder(config, state_dict, report, folder: Path, output: Path, model, tokenizer_dir) -> None:
    if model is not None:
        model.save_pretrained(str(folder))
        report["output_writer"] = "RxTForCausalLM.save_pretrained"
    else:
        cfg = copy.deepcopy(config)
        cfg.architectures = ["RxTForCausalLM"]
        cfg.save_pretrained(str(folder))
        save_file(
            {k: v.detach().contiguous() for k, v in state_dict.items()},
            str(folder / "model.safetensors"),
            metadata={"format": "pt"},
        )
        report["output_writer"] = "config.save_pretrained + safetensors.save_file"
    if tokenizer_dir is None:
        tdir = (report.get("token_ids") or {}).get("tokenizer_dir")
        tokenizer_dir = Path(tdir) if tdir else None
    if tokenizer_dir is not None:
        report["tokenizer_files"] = _write_tokenizer(Path(tokenizer_dir), folder, config, report)
    else:
        report["tokenizer_files"] = []
    report["output"] = str(output.resolve())
    (folder / REPORT_NAME).write_text(
        json.dumps(report, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8"
    )
