"""Argument dataclasses and loading helpers shared by the stage scripts (`scripts/train_*.py`)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed

from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.tokenization_rxt import check_rxt_tokenizer

from .data import cut_validation, load_rows, mix_sources, source_weights, validate_rows
from .model_card import write_model_card

OUTPUT_MARKER = ".rxt-output-dir"  # written into a folder a script creates: only such a folder is ever cleared
TOKEN_ID_FIELDS = ("pad_token_id", "unk_token_id", "bos_token_id", "eos_token_id", "mask_token_id", "query_token_id",
                   "answer_token_id", "think_token_id", "tool_call_token_id", "tool_use_token_id",
                   "internal_token_id")  # fmt: skip


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "RxT folder to continue from."})
    model_config: str | None = field(default=None, metadata={"help": "JSON file of RxTConfig fields (new model)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model)."})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager | sdpa | flex_attention | ..."})


@dataclass
class DataArguments:
    train_file: list[str] = field(
        metadata={"help": "One or more sources: local .json/.jsonl/.parquet files, save_to_disk folders or hub dataset "
                  "ids, each optionally with a mixing weight SOURCE:WEIGHT (e.g. a.jsonl:0.7 b.jsonl:0.3; without "
                  "weights all rows of every source are used)."})  # fmt: skip
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation rows (same format)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset subset (e.g. steps-6)."})
    on_error: str = field(default="error", metadata={"help": "Bad rows: 'error' (default) or 'skip' (logged)."})
    train_file_weights: list[float] | None = field(
        default=None, metadata={"help": "Mixing weights, one per --train_file source (instead of SOURCE:WEIGHT)."})
    validation_split_percentage: float = field(
        default=0.0, metadata={"help": "Without --validation_file: cut this share (percent) of each source's rows as "
                               "validation rows, deterministically by --data_seed (default --seed); 0: no cut."})
    mixing_stopping_strategy: str = field(
        default="first_exhausted", metadata={"help": "Weighted mixing: 'first_exhausted' (stop when a source runs "
                                             "out) or 'all_exhausted' (repeat rows until every source was seen)."})

    def __post_init__(self):
        if isinstance(self.train_file, str):  # a JSON / YAML config may give one source as a string
            self.train_file = [self.train_file]
        if self.mixing_stopping_strategy not in ("first_exhausted", "all_exhausted"):
            raise ValueError(f"--mixing_stopping_strategy {self.mixing_stopping_strategy!r}: expected "
                             "'first_exhausted' or 'all_exhausted'.")  # fmt: skip


def parse_arguments(types, argv=None):
    """Dataclasses from CLI flags, or from one JSON / YAML file given as the only argument."""
    parser = HfArgumentParser(types)
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    return parser.parse_args_into_dataclasses(argv)


def load_tokenizer(model_args: ModelArguments):
    source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if source is None:
        raise ValueError("Pass --tokenizer_name_or_path (or --model_name_or_path with a tokenizer inside).")
    tokenizer = AutoTokenizer.from_pretrained(source)
    check_rxt_tokenizer(tokenizer)
    return tokenizer


def load_model(model_args: ModelArguments, tokenizer, **config_overrides) -> RxTForCausalLM:
    """Continue from `model_name_or_path`, or build a new model from `model_config` with the tokenizer's ids."""
    kwargs = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    if model_args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, trust_remote_code=True, **kwargs)
    if not model_args.model_config:
        raise ValueError("Pass --model_name_or_path (existing RxT folder) or --model_config (JSON of RxTConfig fields).")
    fields = json.loads(Path(model_args.model_config).read_text())
    fields.update(config_overrides)
    ids = check_rxt_tokenizer(tokenizer)
    for name in ("decoder_config", "encoder_config"):
        fields.setdefault(name, {})["vocab_size"] = len(tokenizer)
    fields.update({k: v for k, v in ids.items() if k in TOKEN_ID_FIELDS})
    return RxTForCausalLM(RxTConfig(**fields, **kwargs))  # the config hands the implementation to its sub-configs


def load_split(data_args: DataArguments, path: str | None, validate, tokenizer, max_length: int):
    """Rows of `path` (local file or hub id), checked by `validate(rows, tokenizer=, max_length=, on_error=)`."""
    if path is None:
        return None
    kwargs = {"name": data_args.dataset_config} if data_args.dataset_config else {}
    rows = load_rows(path, **kwargs)
    try:
        return validate(rows, tokenizer=tokenizer, max_length=max_length, on_error=data_args.on_error)
    except ValueError as error:  # the validator numbers rows from 0; name the file they came from
        raise ValueError(f"{path}: {error}") from None


def load_train_and_validation(data_args: DataArguments, validate, tokenizer, max_length: int, seed: int):
    """`(train, validation)` datasets of every script: each `--train_file` source loaded and checked
    (`load_split`), a validation cut of `--validation_split_percentage` % from each source when no
    `--validation_file` is given (`cut_validation`, by `seed`), the sources mixed into one training set
    (`mix_sources`: concatenated, or interleaved by their weights). One source without weights or cut: its rows as
    they are."""
    sources, weights = source_weights(data_args.train_file, data_args.train_file_weights)
    parts = [load_split(data_args, source, validate, tokenizer, max_length) for source in sources]
    validation = load_split(data_args, data_args.validation_file, validate, tokenizer, max_length)
    if data_args.validation_split_percentage:
        if validation is not None:
            raise ValueError(f"--validation_split_percentage {data_args.validation_split_percentage} with "
                             f"--validation_file {data_args.validation_file!r}: expected one of them.")  # fmt: skip
        parts, cuts = cut_validation(parts, sources, data_args.validation_split_percentage, seed)
        validation = mix_sources(cuts, sources)
    train = mix_sources(parts, sources, weights, seed, data_args.mixing_stopping_strategy)
    return train, validation


def train_and_save(trainer, tokenizer, args) -> None:
    """Train (resuming if asked), then save a trust_remote_code folder with the tokenizer and a model card to
    `output_dir`."""
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)
        write_model_card(args.output_dir, trainer=trainer)  # README.md: Hub model card with usage code
    trainer.accelerator.wait_for_everyone()


def run_stage(trainer_cls, config_cls, kind, make_collator, argv=None, validate=None, **config_overrides):
    """Parse `(ModelArguments, DataArguments, config_cls)`, load tokenizer, model and data, train, save.

    `kind` is the row kind for `validate_rows` (`text`, `interaction`, `episode`, or `args -> kind`); `validate`
    replaces `validate_rows` for other row formats (e.g. DMPO preferences). `make_collator(tokenizer, args)` builds
    the batch collator. Returns the trainer."""
    if (kind is None) == (validate is None):
        raise ValueError(f"run_stage: pass either a row kind or a validate function (got kind={kind!r}, "
                         f"validate={validate!r}).")  # fmt: skip
    model_args, data_args, args = parse_arguments((ModelArguments, DataArguments, config_cls), argv)
    grouped = args.train_sampling_strategy in ("group_by_length", "batch_rebalance")
    if validate is None:
        validate = functools.partial(validate_rows, kind=kind(args) if callable(kind) else kind)
        if grouped:  # Trainer reads the lengths from this column: raw rows have no `input_ids` to measure
            validate = functools.partial(validate, length_column=args.length_column_name)
    elif grouped:
        raise ValueError(f"train_sampling_strategy={args.train_sampling_strategy!r} needs row lengths, which this "
                         "stage does not compute; expected 'random' or 'sequential'.")  # fmt: skip
    tokenizer = load_tokenizer(model_args)
    data_seed = args.data_seed if args.data_seed is not None else args.seed
    train_dataset, eval_dataset = load_train_and_validation(data_args, validate, tokenizer, args.max_length, data_seed)
    set_seed(args.seed)  # a new model's initial weights depend on the seed, not on what ran before in the process
    trainer = trainer_cls(
        model=load_model(model_args, tokenizer, **config_overrides),
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=make_collator(tokenizer, args),
        processing_class=tokenizer,
    )
    train_and_save(trainer, tokenizer, args)
    return trainer


def _protected_folders() -> dict[Path, str]:
    """Folders no script clears or writes its outputs into (nor into a folder that contains one of them)."""
    repo = Path(__file__).resolve().parents[1]
    return {Path("/").resolve(): "the filesystem root", Path.home().resolve(): "your home folder",
            Path.cwd().resolve(): "the working directory", repo: "the repository"}  # fmt: skip


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Raise the `ValueError` `claim_output_dir(path, flag)` would raise, changing nothing; return the resolved folder.
    A script calls it at start for a folder it clears later, so a refusal comes before any work."""
    given = Path(path).expanduser()
    if given.is_symlink():
        raise ValueError(f"{flag} {str(path)!r} is a symbolic link; expected a real folder (pass its target or a new "
                         "folder).")  # fmt: skip
    folder = given.resolve()
    for protected, name in _protected_folders().items():
        if folder == protected or folder in protected.parents:
            what = name if folder == protected else f"a folder containing {name}"
            raise ValueError(f"{flag} {str(path)!r} is {what} ({protected}); a script never clears it nor writes its "
                             "outputs there: expected a new folder, e.g. runs/quickstart.")  # fmt: skip
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file; expected a folder (new, empty, or written by an earlier run).")
    if folder.is_dir():
        entries = sorted(entry.name for entry in folder.iterdir())
        if entries and OUTPUT_MARKER not in entries:
            shown = ", ".join(repr(name) for name in entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ValueError(f"{flag} {str(path)!r} already holds {len(entries)} entries ({shown}) and was not created "
                             f"by an RxT script (no {OUTPUT_MARKER} file inside), so it is left untouched. Pass a new "
                             "or empty folder, or move its contents away yourself.")  # fmt: skip
    return folder


def claim_output_dir(path: str | os.PathLike, flag: str, clear: bool = True) -> Path:
    """Make `path` this script's output folder and return it (resolved).

    A missing folder is created with the marker file `OUTPUT_MARKER` inside; an empty one gets the marker. A folder
    that holds the marker (a script made it) is emptied when `clear` (its contents are an earlier run's outputs) and
    kept as is otherwise. Any other folder — one holding files the user put there — is refused with a `ValueError`
    naming it, as are the filesystem root, the home folder, the working directory, the repository, a folder containing
    one of them, a symbolic link and a file (`check_output_dir`). `flag` names the option in the error."""
    folder = check_output_dir(path, flag)
    if clear and folder.is_dir():
        for entry in folder.iterdir():  # only a marked folder gets here with entries
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / OUTPUT_MARKER
    if not marker.exists():
        marker.write_text("Created by an RxT script: a later run with this folder as its output clears it.\n")
    return folder
