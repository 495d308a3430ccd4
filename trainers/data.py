"""Data loading, validation, tokenization templates and collators for the RxT training stages.

Templates (docs/spec.md#tokenizer): segments are tokenized **separately** with `add_special_tokens=False` and the ids
concatenated, so BPE merges never cross a special token and training sees exactly the ids inference produces:

    pre-training (stage 1)            [BOS] {text} [EOS]
    interaction (stage 2, episodes)   [BOS] [Q] {query}   +   [A] {answer} [EOS]

Special ids come from the tokenizer (`check_rxt_tokenizer`), never hard-coded.

Targets (labels are aligned with `input_ids`; the model shifts them internally; `IGNORE_INDEX` = -100 is ignored):
    - pre-training: every real token; pads -100 (`train_on_padding=True`: pads too, reference parity,
      docs/spec.md#reference-training-behaviours);
    - supervised turns, `label_mode="project"` (default, one rule for every supervised stage,
      docs/spec.md#interaction-sft): the tokens after `[A]` up to and including `[EOS]`; `[BOS]`, `[Q]`, the query,
      `[A]` itself and pads are -100;
    - `label_mode="reference"`: SFT (`JointLMCollator(sft=True)`) trains only the answer body (no `[EOS]`), episodes
      (`EpisodeCollator`, SMAT) train `[A]`, the answer and `[EOS]` (docs/spec.md#interaction-sft).

MLM (stage 1/2 encoder, docs/spec.md#joint-lm-pre-training): every non-pad position (special tokens included) is
selected with probability `mask_prob`; a selected token becomes `[MASK]` (no 80/10/10); `mlm_labels` hold the original
id where selected and -100 elsewhere. The decoder gets the unmasked `input_ids`. A batch can have no selected position
(the MLM loss of such a batch is the trainer's concern).

Length policy (docs/spec.md#tokenizer): a sequence longer than `max_length` raises `ValueError` (default,
`overflow="error"`) or, with `overflow="truncate"`, loses the end of its text / answer body while keeping `[EOS]`. To
drop over-long or broken rows before training use `validate_rows(..., on_error="skip")` (logged, never silent).

Collators tokenize raw rows (strings) and pad dynamically (right padding with the pad id) to the longest sequence of
the batch. With `transformers.Trainer` set `remove_unused_columns=False` (docs/spec.md#trainer-subclasses), otherwise
the `text` / `query` / `answer` / `interactions` columns are dropped before they reach the collator. Collators hold
state (`torch.Generator`, `max_turns`) that a `DataLoader` with `num_workers > 0` copies into its workers: the workers
then repeat the same masks and do not see `set_max_turns`; use `num_workers=0` (or seed per worker) where that matters.
Their `state_dict()` / `load_state_dict()` let `RxTTrainer` store that state in checkpoints, so a resumed run builds
the batches of the uninterrupted one.

Reading (`read_lines`, `iter_json_rows`, `check_data_file`, used by `load_rows`, the scripts and the tokenizer
trainer): a file that is not UTF-8, empty or blank, a line that is not a JSON object, a truncated Parquet file or an
unsupported extension (`.csv`, ...) stops with a `ValueError` naming the file, the line and the expected form.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from modeling_rxt.tokenization_rxt import check_rxt_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "EpisodeCollator",
    "InteractionCollator",
    "JointLMCollator",
    "check_data_file",
    "check_rows",
    "cut_validation",
    "encode_interaction",
    "encode_text",
    "episode_turns",
    "iter_json_rows",
    "load_rows",
    "mix_sources",
    "parse_source",
    "read_lines",
    "row_problem",
    "source_weights",
    "truncate_episode",
    "validate_rows",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_KINDS = ("text", "interaction", "episode", "evaluation")
FILE_FORMATS = "a .jsonl file (one JSON object per line), a .json file (JSON lines or an array of objects) or a .parquet file"
ROW_EXAMPLES = {
    "text": '{"text": "..."}',
    "interaction": '{"query": "...", "answer": "..."}',
    "episode": '{"query": "...", "answer": "...", "interactions": [{"query": "...", "answer": "..."}, ...]}',
    "evaluation": '{"query": "...", "answer": "...", "interactions": [...], "probes": [{"turn": 3, "distance": 2, '
    '"expected": "..."}, ...]}',
}


# --------------------------------------------------------------------------------------------------------------------
# Reading files: every reader of local data (load_rows, the scripts, the tokenizer trainer) goes through these checks,
# so a bad file stops with its name, the line and what was expected, before any training or evaluation starts.


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """`(line number, line)` of a UTF-8 text file (a leading byte-order mark is dropped). A byte sequence that is not
    UTF-8 raises `ValueError` naming the file, the line and the column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r}: no such file.")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                    "expected a UTF-8 encoded file (re-save it as UTF-8)."
                ) from None


def _empty_file_error(path: Path, what: str, example: str) -> ValueError:
    content = "is empty (0 bytes)" if path.stat().st_size == 0 else "holds only blank lines"
    return ValueError(f"{path} {content}; expected {what}, e.g. {example}.")


def iter_json_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """`(location, row)` of every JSON object of a `.jsonl` / `.json` file: one object per line (blank lines are
    skipped; location `file:line`), or for a `.json` file whose text starts with `[`, an array of objects (location
    `file item i`). A file that is empty or blank, not UTF-8, or holds a line / item that is not a JSON object raises
    `ValueError` naming the file, the line and the problem."""
    path = Path(path)
    lines = read_lines(path)
    expected = "one JSON object per line"
    found = False
    for number, line in lines:
        text = line.strip()
        if not text:
            continue
        if not found and text.startswith("[") and path.suffix.lower() == ".json":
            yield from _json_array_rows(path, line + "".join(rest for _, rest in lines), number)
            return
        found = True
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno}); expected {expected}, e.g. "
                f"{ROW_EXAMPLES['interaction']}."
            ) from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: a JSON {type(row).__name__}, expected a JSON object ({expected}).")
        yield f"{path}:{number}", row
    if not found:
        raise _empty_file_error(path, expected, ROW_EXAMPLES["interaction"])


def _json_array_rows(path: Path, text: str, first_line: int) -> Iterator[tuple[str, dict]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}:{first_line + error.lineno - 1}: not valid JSON ({error.msg} at column {error.colno}); expected "
            "a JSON array of objects or one JSON object per line."
        ) from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: holds {'an empty array' if items == [] else 'no array'}; expected a JSON array of "
                         "row objects or one JSON object per line.")  # fmt: skip
    for index, row in enumerate(items):
        if not isinstance(row, dict):
            raise ValueError(f"{path} item {index}: a JSON {type(row).__name__}, expected a JSON object per row.")
        yield f"{path} item {index}", row


def check_data_file(path: str | os.PathLike) -> int:
    """Check a local data file before it is loaded; returns its number of rows (Parquet: -1, counted on loading).

    `.json` / `.jsonl`: `iter_json_rows`. `.parquet`: the file starts and ends with Parquet's magic bytes (a truncated
    or renamed file fails here, by name). Any other extension (`.csv`, `.tsv`, `.txt`, ...) is refused by name: rows
    hold nested lists (`interactions`, `probes`) that CSV cannot carry."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _FILE_BUILDERS:
        raise ValueError(f"{path}: {suffix or 'extensionless'} files are not read as rows; expected {FILE_FORMATS} "
                         "(or a save_to_disk folder, or a hub dataset id). CSV cannot carry the nested 'interactions' "
                         "and 'probes' lists of episode rows: convert it to JSON lines.")  # fmt: skip
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r}: no such file.")
    if suffix == ".parquet":
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(4)
            handle.seek(max(size - 4, 0))
            tail = handle.read(4)
        if size < 12 or head != b"PAR1" or tail != b"PAR1":
            raise ValueError(f"{path}: not a Parquet file ({size} bytes, {'empty' if size == 0 else 'truncated or another format'}"
                             f"); expected {FILE_FORMATS}.")  # fmt: skip
        return -1
    return sum(1 for _ in iter_json_rows(path))


# --------------------------------------------------------------------------------------------------------------------
# Loading


def load_rows(path_or_id: str | os.PathLike, split: str = "train", **kwargs: Any):
    """Load rows as a `datasets.Dataset`.

    Args:
        path_or_id: a local `.json` / `.jsonl` / `.parquet` file (builder chosen by the extension; the file is one
            split, so `split` is not used; checked first by `check_data_file`, so a bad file fails with its name and
            line), a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a hub dataset id /
            local dataset script directory (`datasets.load_dataset(path_or_id, split=split)`). Another local file
            (`.csv`, `.txt`, ...) is refused by name.
        split: split to load from a hub dataset or a saved `DatasetDict`.
        **kwargs: passed to `datasets.load_dataset` (e.g. `name="steps-6"` for a hub subset, `revision`).

    Returns:
        `datasets.Dataset` with at least one row.
    """
    import datasets

    path = Path(path_or_id)
    if path.is_file() or path.suffix.lower() in _FILE_BUILDERS:
        check_data_file(path)
        try:
            loaded = datasets.load_dataset(_FILE_BUILDERS[path.suffix.lower()], data_files={"train": str(path)},
                                           split="train", **kwargs)  # fmt: skip
        except Exception as error:  # an Arrow / datasets error deep inside: name the file and the likely cause
            raise ValueError(f"{path}: could not be read as a table ({type(error).__name__}: {error}); expected rows "
                             "with the same fields, each field of one type in every row.") from error  # fmt: skip
    elif path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        loaded = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        loaded = datasets.load_dataset(str(path_or_id), split=split, **kwargs)
    if len(loaded) == 0:
        raise ValueError(f"{path_or_id}: no rows (split {split!r}); expected at least one row.")
    return loaded


# --------------------------------------------------------------------------------------------------------------------
# Several sources: `SOURCE[:WEIGHT]` specs, a validation cut of the same share from each, one training set mixed from
# all of them (`datasets.train_test_split` / `concatenate_datasets` / `interleave_datasets`).


def parse_source(spec: str) -> tuple[str, float | None]:
    """`"a.jsonl:0.7"` -> `("a.jsonl", 0.7)`; `"a.jsonl"` or a hub id -> `(spec, None)`. A suffix after the last `:`
    that is a number is the mixing weight (> 0); anything else is part of the source."""
    source, colon, tail = str(spec).rpartition(":")
    if not colon or not source:
        return str(spec), None
    try:
        weight = float(tail)
    except ValueError:
        return str(spec), None
    if not (weight > 0 and math.isfinite(weight)):
        raise ValueError(f"--train_file {spec!r}: mixing weight {tail}; expected a positive number (e.g. a.jsonl:0.7).")
    return source, weight


def source_weights(specs: Sequence[str], weights: Sequence[float] | None = None) -> tuple[list[str], list[float] | None]:
    """Sources and their mixing weights from `SOURCE[:WEIGHT]` specs or a separate list `weights` (one per source,
    not both); `None` when no weight is given (the sources are concatenated)."""
    parsed = [parse_source(spec) for spec in specs]
    sources = [source for source, _ in parsed]
    inline = [weight for _, weight in parsed]
    given = [weight is not None for weight in inline]
    if any(given) and weights is not None:
        raise ValueError("mixing weights given both as SOURCE:WEIGHT and as --train_file_weights; expected one of them.")
    if any(given) and not all(given):
        missing = [spec for spec, has in zip(specs, given) if not has]
        raise ValueError(f"--train_file: weights for some sources only (none for {missing}); expected SOURCE:WEIGHT for "
                         "every source or for none.")  # fmt: skip
    if weights is not None:
        if len(weights) != len(sources):
            raise ValueError(f"--train_file_weights: {len(weights)} weights for {len(sources)} sources; expected one "
                             "per --train_file source, in the same order.")  # fmt: skip
        if not all(w > 0 and math.isfinite(w) for w in weights):
            raise ValueError(f"--train_file_weights {list(weights)}: expected positive numbers.")
        return sources, [float(w) for w in weights]
    return sources, (inline if all(given) else None)


def cut_validation(datasets_by_source: Sequence, names: Sequence[str], percentage: float, seed: int):
    """`(train parts, validation parts)`: from each dataset the same share, `percentage` % of its rows (rounded up,
    at least 1), cut by `Dataset.train_test_split(seed=seed)` (deterministic by seed)."""
    if not 0 < percentage < 100:
        raise ValueError(f"--validation_split_percentage {percentage}: expected a share in (0, 100).")
    trains, validations = [], []
    for dataset, name in zip(datasets_by_source, names):
        cut = math.ceil(len(dataset) * percentage / 100)
        if cut >= len(dataset):
            raise ValueError(f"{name}: {len(dataset)} rows; cutting {percentage} % as validation would leave no "
                             "training row; expected more rows or a smaller --validation_split_percentage.")  # fmt: skip
        parts = dataset.train_test_split(test_size=cut, seed=seed)
        trains.append(parts["train"])
        validations.append(parts["test"])
    return trains, validations


def _same_columns(datasets_by_source: Sequence, names: Sequence[str]) -> None:
    first = datasets_by_source[0].column_names
    for dataset, name in zip(datasets_by_source[1:], names[1:]):
        if sorted(dataset.column_names) != sorted(first):
            raise ValueError(f"{name}: columns {sorted(dataset.column_names)} differ from {names[0]}'s "
                             f"{sorted(first)}; expected sources with the same columns (rows of the same kind).")


def mix_sources(datasets_by_source: Sequence, names: Sequence[str], weights: Sequence[float] | None = None,
                seed: int = 0, stopping_strategy: str = "first_exhausted"):  # fmt: skip
    """One dataset from several sources: all rows of every source one after the other (`weights=None`;
    `concatenate_datasets`; a single source comes back as it is), or rows drawn source by source with probabilities
    `weights / sum(weights)` (`interleave_datasets(seed=seed, stopping_strategy=...)`: `"first_exhausted"` stops when
    a source runs out, `"all_exhausted"` repeats the others' rows until every source was seen once)."""
    import datasets

    if weights is None and len(datasets_by_source) == 1:
        return datasets_by_source[0]
    _same_columns(datasets_by_source, names)
    try:
        if weights is None:
            return datasets.concatenate_datasets(list(datasets_by_source))
        total = sum(weights)
        return datasets.interleave_datasets(list(datasets_by_source), probabilities=[w / total for w in weights],
                                            seed=seed, stopping_strategy=stopping_strategy)  # fmt: skip
    except (ValueError, TypeError) as error:  # differing column types deep inside datasets: name the sources
        raise ValueError(f"sources {list(names)} could not be mixed ({error}); expected the same columns with the same "
                         "types in every source.") from error  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Tokenization


def _special_ids(tokenizer) -> dict[str, int | None]:
    return check_rxt_tokenizer(tokenizer)


def tokenize_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each string, without special tokens (one batched call).

    A fast tokenizer whose backend neither truncates nor pads is called directly: the same ids as
    `tokenizer(texts)`, without building a `BatchEncoding` (half the time).
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [encoding.ids for encoding in backend.encode_batch(list(texts), add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _overflow_error(kind: str, length: int, max_length: int, text: str) -> ValueError:
    preview = text if len(text) <= 60 else text[:57] + "..."
    return ValueError(
        f"{kind} of {length} tokens exceeds max_length={max_length} ({preview!r}); drop such rows with "
        "validate_rows(..., on_error='skip') or pass overflow='truncate'."
    )


def _check_overflow(overflow: str) -> None:
    if overflow not in ("error", "truncate"):
        raise ValueError(f"overflow={overflow!r}: expected 'error' or 'truncate'.")


def _build_text(ids: dict, body: list[int], max_length: int | None, overflow: str, text: str = "") -> list[int]:
    if max_length is not None and len(body) + 2 > max_length:
        if overflow != "truncate" or max_length < 2:
            raise _overflow_error("text", len(body) + 2, max_length, text)
        body = body[: max_length - 2]
    return [ids["bos_token_id"], *body, ids["eos_token_id"]]


def build_interaction(
    ids: dict,
    query_body: list[int],
    answer_body: list[int],
    max_length: int | None,
    overflow: str,
    train_answer_token: bool,
    train_eos: bool,
    query: str = "",
) -> tuple[list[int], list[int]]:
    query_segment = [ids["bos_token_id"], ids["query_token_id"], *query_body]
    length = len(query_segment) + len(answer_body) + 2
    if max_length is not None and length > max_length:
        room = max_length - len(query_segment) - 2
        if overflow != "truncate" or room < 0:
            raise _overflow_error("interaction", length, max_length, query)
        answer_body = answer_body[:room]
    answer_segment = [ids["answer_token_id"], *answer_body, ids["eos_token_id"]]
    labels = [IGNORE_INDEX] * len(query_segment)
    labels.append(ids["answer_token_id"] if train_answer_token else IGNORE_INDEX)
    labels.extend(answer_body)
    labels.append(ids["eos_token_id"] if train_eos else IGNORE_INDEX)
    return query_segment + answer_segment, labels


def encode_text(tokenizer, text: str, max_length: int | None = None, overflow: str = "error") -> list[int]:
    """Pre-training template `[BOS]{text}[EOS]` as a list of ids (length `len(tokens(text)) + 2`)."""
    _check_overflow(overflow)
    return _build_text(_special_ids(tokenizer), tokenize_texts(tokenizer, [text])[0], max_length, overflow, text)


def encode_interaction(
    tokenizer,
    query: str,
    answer: str,
    max_length: int | None = None,
    overflow: str = "error",
    train_answer_token: bool = False,
    train_eos: bool = True,
) -> tuple[list[int], list[int]]:
    """Interaction template `[BOS][Q]{query}` + `[A]{answer}[EOS]` (query and answer tokenized separately).

    Returns:
        `(input_ids, labels)`, equal lengths. Labels are -100 on `[BOS] [Q]`, the query and (unless
        `train_answer_token`) `[A]`; the answer ids; then `[EOS]` (or -100 if not `train_eos`). The defaults are the
        project rule; `train_eos=False` is the reference SFT mask, `train_answer_token=True` the reference SMAT mask.
    """
    _check_overflow(overflow)
    query_body, answer_body = tokenize_texts(tokenizer, [query, answer])
    return build_interaction(
        _special_ids(tokenizer), query_body, answer_body, max_length, overflow, train_answer_token, train_eos, query
    )


def pad_to_multiple(length: int, multiple: int | None) -> int:
    if multiple:
        length = -(-length // multiple) * multiple
    return length


def fill_row(target: torch.Tensor, values: list[int]) -> None:
    if values:
        target[: len(values)] = torch.tensor(values, dtype=target.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Validation


def text_problem(row: dict, field: str) -> str | None:
    if field not in row or row[field] is None:
        return "missing"
    if not isinstance(row[field], str):
        return f"expected a string, got {type(row[field]).__name__}"
    if not row[field].strip():
        return "empty"
    return None


def _probe_problem(probe, num_turns: int, need_expected: bool) -> tuple[str, str] | None:
    """First problem of one probe `{"turn", "distance", "expected"}` as `(field, reason)`, or None."""
    if not isinstance(probe, dict):
        return "", f"expected an object {{turn, distance, expected}}, got {type(probe).__name__}"
    turn, distance = probe.get("turn"), probe.get("distance")
    if not isinstance(turn, int) or isinstance(turn, bool) or not 0 <= turn < num_turns:
        return ".turn", f"expected a turn index in [0, {num_turns}), got {turn!r}"
    if not isinstance(distance, int) or isinstance(distance, bool) or not 1 <= distance <= turn:
        what = "missing" if distance is None else f"got {distance!r}"
        return ".distance", (f"{what}; expected the turns between the fact and this question, an integer in "
                             f"[1, turn={turn}]")  # fmt: skip
    if need_expected:
        reason = text_problem(probe, "expected")
        if reason:
            return ".expected", f"{reason}; expected the value the answer must contain"
    return None


def row_problem(row: dict, kind: str, text_field: str = "text") -> tuple[str, str] | None:
    """First structural problem of a row of `kind` (see `validate_rows`) as `(field, reason)`, or None."""
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {_KINDS}.")
    if not isinstance(row, dict):
        return "", f"expected an object such as {ROW_EXAMPLES[kind]}, got {type(row).__name__}"
    if kind == "text":
        reason = text_problem(row, text_field)
        return (text_field, reason) if reason else None
    for field in ("query", "answer"):
        reason = text_problem(row, field)
        if reason:
            return field, reason
    if kind == "interaction":
        return None
    interactions = row.get("interactions")
    if interactions is None:
        return "interactions", "missing"
    if not isinstance(interactions, list):
        return "interactions", f"expected a list, got {type(interactions).__name__}"
    for k, turn in enumerate(interactions):
        if not isinstance(turn, dict):
            return f"interactions[{k}]", f"expected an object with query/answer, got {type(turn).__name__}"
        for field in ("query", "answer"):
            reason = text_problem(turn, field)
            if reason:
                return f"interactions[{k}].{field}", reason
    probes = row.get("probes")
    if probes is None and kind == "evaluation":
        return "probes", "missing; expected a list of {turn, distance, expected}"
    if probes is not None:
        if not isinstance(probes, list):
            return "probes", f"expected a list of {{turn, distance, expected}}, got {type(probes).__name__}"
        for j, probe in enumerate(probes):
            problem = _probe_problem(probe, 1 + len(interactions), need_expected=kind == "evaluation")
            if problem:
                return f"probes[{j}]{problem[0]}", problem[1]
    return None


def check_rows(rows, kind: str, source: str) -> list[dict]:
    """`rows` (`(location, row)` pairs, e.g. `iter_json_rows(path)`) as a list, or a `ValueError` naming the first
    invalid row's location, field and problem and the expected form of a `kind` row."""
    checked = []
    for location, row in rows:
        problem = row_problem(row, kind)
        if problem:
            raise ValueError(f"{location}: field {problem[0]!r}: {problem[1]}; expected {kind} rows such as "
                             f"{ROW_EXAMPLES[kind]}.")  # fmt: skip
        checked.append(row)
    if not checked:
        raise ValueError(f"{source}: no rows; expected {kind} rows such as {ROW_EXAMPLES[kind]}.")
    return checked


def _row_segments(row: dict, kind: str, text_field: str) -> list[tuple[str, str, str | None]]:
    """`(field, first string, second string or None)` per sequence the row produces."""
    if kind == "text":
        return [(text_field, row[text_field], None)]
    segments = [("query/answer", row["query"], row["answer"])]
    if kind == "episode":
        segments += [(f"interactions[{k}]", t["query"], t["answer"]) for k, t in enumerate(row["interactions"])]
    return segments


def validate_rows(
    dataset,
    kind: str,
    tokenizer=None,
    max_length: int | None = None,
    on_error: str = "error",
    text_field: str = "text",
    length_column: str | None = None,
):
    """Check rows before training and return the valid ones.

    Checks per `kind`:
        - `"text"`: `text_field` present, a string, not empty/whitespace; `[BOS]{text}[EOS]` at most `max_length`.
        - `"interaction"`: `query` and `answer` present, strings, not empty; `[BOS][Q]{query}[A]{answer}[EOS]` at most
          `max_length` tokens.
        - `"episode"`: as `"interaction"` for the top-level turn and every item of `interactions` (a list; may be
          empty); when probes are present, each `probes[j]` has a `turn` indexing an existing turn and a `distance`
          in `[1, turn]` (the `"probe"` episode window reads both); every turn at most `max_length`.
        - `"evaluation"`: an episode whose `probes` are present and each also has its `expected` value (memory
          evaluation).

    Args:
        dataset: a `datasets.Dataset` (or a list of dicts, converted).
        kind: `"text"`, `"interaction"`, `"episode"` or `"evaluation"`.
        tokenizer: RxT tokenizer; required when `max_length` is given.
        max_length: longest allowed tokenized sequence (None: no length check).
        on_error: `"error"` raises `ValueError("row {i}: field {field!r}: {reason} ...")` for the first invalid row;
            `"skip"` drops invalid rows and logs a warning with their number. An all-invalid dataset raises anyway.
        text_field: the text column for `kind="text"`.
        length_column: add this column: the size of each row once padded by its collator, in tokens: a text's or
            an interaction's length; an episode's turns x its longest interaction (its `[N, T]` block, which is what
            a SMAT step's cost scales with). `Trainer` groups batches by it (`train_sampling_strategy=
            "group_by_length"`, `length_column_name`), so episodes of similar turns and widths share a batch. Needs the
            tokenizer. A column of that name already in the rows is kept.

    Returns:
        `datasets.Dataset`: the valid rows (the input object itself when nothing was dropped and no column was added).
    """
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {_KINDS}.")
    dataset = validation_input(dataset, "validate_rows", on_error, max_length, tokenizer)
    if length_column is not None and tokenizer is None:
        raise ValueError(f"validate_rows: a tokenizer is needed for length_column={length_column!r}.")
    problems: dict[int, tuple[str, str]] = {}
    sequences = [1] * len(dataset)  # sequences per row: an episode's turns
    pending: list[tuple[int, str, str, str | None]] = []  # rows to length-check: (row, field, text, answer)
    for index, row in enumerate(dataset):
        problem = row_problem(row, kind, text_field)
        if problem:
            problems[index] = problem
        elif max_length is not None or length_column is not None:
            segments = _row_segments(row, kind, text_field)
            sequences[index] = len(segments)
            pending.extend((index, *segment) for segment in segments)

    longest = [0] * len(dataset)
    if pending:
        check_rxt_tokenizer(tokenizer)  # the +2 / +4 below assume the RxT special tokens
        chunk = 1024
        for start in range(0, len(pending), chunk):
            part = pending[start : start + chunk]
            firsts = tokenize_texts(tokenizer, [p[2] for p in part])
            seconds = tokenize_texts(tokenizer, [p[3] for p in part if p[3] is not None])
            second_iter = iter(seconds)
            for (index, field, _, second), first_ids in zip(part, firsts):
                # [BOS] text [EOS] = +2; [BOS] [Q] query [A] answer [EOS] = +4
                length = len(first_ids) + 2 if second is None else len(first_ids) + len(next(second_iter)) + 4
                longest[index] = max(longest[index], length)
                if max_length is not None and length > max_length and index not in problems:
                    problems[index] = (field, f"{length} tokens exceed max_length={max_length}")

    if length_column is not None and length_column not in dataset.column_names:  # lengths given with the rows win
        dataset = dataset.add_column(length_column, [n * t for n, t in zip(sequences, longest)])
    return drop_or_raise(dataset, problems, kind, "validate_rows", on_error)


def validation_input(dataset, caller: str, on_error: str, max_length: int | None, tokenizer):
    """Check a row validator's arguments; a list of dicts becomes a `datasets.Dataset`."""
    import datasets

    if on_error not in ("error", "skip"):
        raise ValueError(f"on_error={on_error!r}: expected 'error' or 'skip'.")
    if max_length is not None and tokenizer is None:
        raise ValueError(f"{caller}: a tokenizer is needed to check max_length.")
    return datasets.Dataset.from_list(dataset) if isinstance(dataset, list) else dataset


def drop_or_raise(dataset, problems: dict[int, tuple[str, str]], kind: str, caller: str, on_error: str):
    """`problems` (row index -> (field, reason)) → the dataset unchanged when empty; else a `ValueError` naming the
    first bad row (`on_error="error"`, or when every row is bad), or the dataset without the bad rows (logged)."""
    if not problems:
        return dataset
    total = len(dataset)
    first = min(problems)
    field, reason = problems[first]
    detail = f"row {first}: field {field!r}: {reason}"
    example = f" Expected {kind} rows such as {ROW_EXAMPLES[kind]}." if kind in ROW_EXAMPLES else ""
    if on_error == "error":
        raise ValueError(
            f"invalid {kind} {detail} ({len(problems)} of {total} rows invalid; on_error='skip' drops them).{example}"
        )
    if len(problems) == total:
        raise ValueError(f"{caller}: all {total} {kind} rows are invalid; first: {detail}.")
    logger.warning("%s: skipped %d of %d %s rows (first: %s).", caller, len(problems), total, kind, detail)
    return dataset.select([i for i in range(total) if i not in problems])


# --------------------------------------------------------------------------------------------------------------------
# Collators


def _check_label_mode(label_mode: str) -> None:
    if label_mode not in ("project", "reference"):
        raise ValueError(f"label_mode={label_mode!r}: expected 'project' or 'reference'.")


class JointLMCollator:
    """Collator of stage 1 (`sft=False`, rows `{"text"}`) and stage 2 (`sft=True`, rows `{"query", "answer"}`).

    Args:
        tokenizer: RxT tokenizer (special ids read with `check_rxt_tokenizer`).
        mask_prob: MLM selection probability per non-pad position.
        sft: interaction rows and answer-only labels instead of text rows and all-token labels.
        max_length: longest sequence (None: no limit); see `overflow`.
        seed: seed of a private `torch.Generator` for the MLM masks (reproducible per collator); None uses torch's
            global RNG (reproducible under `transformers.set_seed`).
        label_mode: `"project"` (answer + `[EOS]`) or `"reference"` (SFT: answer body only); only for `sft=True`.
        train_on_padding: pre-training labels include the pads (reference parity).
        overflow: `"error"` or `"truncate"` (cut the text / answer body, keep `[EOS]`).
        pad_to_multiple_of: round the padded length up.
        text_field: column of the text rows.

    Returns (from `__call__(rows)`), `B` rows, `T` the longest sequence of the batch, all `torch.long`:
        `input_ids [B, T]` (unmasked, right-padded with `[PAD]`), `attention_mask [B, T]` (1 on real tokens),
        `labels [B, T]` (decoder targets aligned with `input_ids`, -100 ignored), `mlm_input_ids [B, T]`
        (`input_ids` with selected positions replaced by `[MASK]`), `mlm_labels [B, T]` (original id where selected,
        -100 elsewhere).
    """

    def __init__(
        self,
        tokenizer,
        mask_prob: float = 0.15,
        sft: bool = False,
        max_length: int | None = None,
        seed: int | None = None,
        label_mode: str = "project",
        train_on_padding: bool = False,
        overflow: str = "error",
        pad_to_multiple_of: int | None = None,
        text_field: str = "text",
    ):
        if not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"mask_prob={mask_prob}: expected a probability in [0, 1].")
        _check_label_mode(label_mode)
        _check_overflow(overflow)
        self.tokenizer = tokenizer
        self.ids = _special_ids(tokenizer)
        self.mask_prob = mask_prob
        self.sft = sft
        self.max_length = max_length
        self.label_mode = label_mode
        self.train_on_padding = train_on_padding
        self.overflow = overflow
        self.pad_to_multiple_of = pad_to_multiple_of
        self.text_field = text_field
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(seed)

    def state_dict(self) -> dict:
        """What the next batch's masks depend on besides its rows: the RNG they are drawn from (the collator's
        generator, or torch's global CPU RNG when `seed=None`). `RxTTrainer` saves it in checkpoints."""
        return {"rng": torch.get_rng_state() if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        (torch.set_rng_state if self.generator is None else self.generator.set_state)(state["rng"])

    def _sequences(self, rows: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
        if self.sft:
            queries = [row["query"] for row in rows]
            query_bodies = tokenize_texts(self.tokenizer, queries)
            answer_bodies = tokenize_texts(self.tokenizer, [row["answer"] for row in rows])
            pairs = [
                build_interaction(
                    self.ids,
                    q,
                    a,
                    self.max_length,
                    self.overflow,
                    train_answer_token=False,
                    train_eos=self.label_mode == "project",
                    query=text,
                )
                for q, a, text in zip(query_bodies, answer_bodies, queries)
            ]
            return [p[0] for p in pairs], [p[1] for p in pairs]
        texts = [row[self.text_field] for row in rows]
        seqs = [
            _build_text(self.ids, body, self.max_length, self.overflow, text)
            for body, text in zip(tokenize_texts(self.tokenizer, texts), texts)
        ]
        return seqs, [list(seq) for seq in seqs]

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        seqs, targets = self._sequences(rows)
        length = pad_to_multiple(max(len(seq) for seq in seqs), self.pad_to_multiple_of)
        input_ids = torch.full((len(seqs), length), self.ids["pad_token_id"], dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
        labels = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long)
        for b, (seq, target) in enumerate(zip(seqs, targets)):
            fill_row(input_ids[b], seq)
            attention_mask[b, : len(seq)] = 1
            fill_row(labels[b], target)
        if self.train_on_padding and not self.sft:
            labels = input_ids.clone()

        selected = torch.rand(input_ids.shape, generator=self.generator) < self.mask_prob
        selected &= attention_mask.bool()
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "mlm_input_ids": input_ids.masked_fill(selected, self.ids["mask_token_id"]),
            "mlm_labels": torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX)),
        }


class InteractionCollator(JointLMCollator):
    """Stage-2 collator: `JointLMCollator(tokenizer, sft=True, **kwargs)` (rows `{"query", "answer"}`)."""

    def __init__(self, tokenizer, **kwargs: Any):
        if kwargs.pop("sft", True) is not True:
            raise ValueError("InteractionCollator is the sft=True case of JointLMCollator.")
        super().__init__(tokenizer, sft=True, **kwargs)


def episode_turns(row: dict, max_turns: int | None = None) -> list[tuple[str, str]]:
    """Turn list `[(query, answer), ...]` of an episode row: the top-level pair, then `interactions`; at most
    `max_turns` (None: all)."""
    turns = [(row["query"], row["answer"])]
    turns += [(turn["query"], turn["answer"]) for turn in row.get("interactions") or []]
    return turns if max_turns is None else turns[:max_turns]


def truncate_episode(row: dict, max_turns: int | None) -> dict:
    """Copy of an episode row cut to its first `max_turns` turns; probes with `turn >= max_turns` are dropped."""
    if max_turns is None:
        return dict(row)
    if max_turns < 1:
        raise ValueError(f"max_turns={max_turns}: expected >= 1 or None.")
    out = dict(row)
    out["interactions"] = list(row.get("interactions") or [])[: max_turns - 1]
    if row.get("probes") is not None:
        out["probes"] = [probe for probe in row["probes"] if probe["turn"] < max_turns]
    return out


class EpisodeCollator:
    """Collator of episode rows `{"query", "answer", "interactions": [{"query", "answer"}, ...]}` (stages 3-5).

    The turn list of a row is `[(query, answer)] + interactions`, cut to `max_turns` when set (see `set_max_turns`;
    `truncate_episode` cuts a row and its probes the same way). Every turn is encoded as
    `[BOS][Q]{query}` + `[A]{answer}[EOS]`. Other row fields (`probes`, `system`) are not used here.

    Args:
        tokenizer: RxT tokenizer.
        max_length: longest turn (None: no limit); see `overflow`.
        max_turns: keep `max_turns` turns of each episode (None: all).
        window: which `max_turns` turns: `"head"` (the first ones) or `"probe"` (a window ending at a question whose
            fact lies inside the window, chosen at random among such probes; the head when none fits). `"probe"`
            keeps the memory signal in short episodes: cutting an episode to its first two turns rarely leaves a
            fact-then-question pair.
        seed: seed of the `"probe"` window choice.
        max_probe_distance: `"probe"` windows end only at questions whose fact is at most this many turns back
            (None: any that fits). With `max_turns` larger than the distance the window keeps the turns *before* the
            fact, so the fact is written from an STM that already holds earlier turns, as in real dialogues.
        label_mode: `"project"` (answer + `[EOS]`) or `"reference"` (SMAT: `[A]`, answer, `[EOS]`).
        overflow: `"error"` or `"truncate"` (cut the answer body, keep `[EOS]`).
        pad_to_multiple_of: round `T` up.

    Returns (from `__call__(rows)`), `B` rows, `N` = most turns of an episode in the batch, `T` = longest turn in the
    batch, all `torch.long`:
        `input_ids [N, B, T]`, `attention_mask [N, B, T]`, `labels [N, B, T]` (answer-only targets, -100 ignored);
        turn `k` of episode `b` is `[k, b]`; a missing turn (`k >= num_turns[b]`) is all pad, mask 0, labels -100;
        `turn_mask [N, B]` (1 where episode `b` has turn `k`); `num_turns [B]`.
    """

    def __init__(
        self,
        tokenizer,
        max_length: int | None = None,
        max_turns: int | None = None,
        label_mode: str = "project",
        overflow: str = "error",
        pad_to_multiple_of: int | None = None,
        window: str = "head",
        seed: int = 0,
        max_probe_distance: int | None = None,
    ):
        _check_label_mode(label_mode)
        _check_overflow(overflow)
        if window not in ("head", "probe"):
            raise ValueError(f"window={window!r}: expected 'head' or 'probe'.")
        if max_probe_distance is not None and max_probe_distance < 1:
            raise ValueError(f"max_probe_distance={max_probe_distance}: expected >= 1 or None.")
        self.window = window
        self.max_probe_distance = max_probe_distance
        self._rng = random.Random(seed)
        self.tokenizer = tokenizer
        self.ids = _special_ids(tokenizer)
        self.max_length = max_length
        self.label_mode = label_mode
        self.overflow = overflow
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_turns = None
        self.set_max_turns(max_turns)

    def set_max_turns(self, max_turns: int | None) -> None:
        """Change the episode length used from the next batch on (e.g. from a `TrainerCallback`)."""
        if max_turns is not None and (not isinstance(max_turns, int) or max_turns < 1):
            raise ValueError(f"max_turns={max_turns!r}: expected a positive integer or None.")
        self.max_turns = max_turns

    def state_dict(self) -> dict:
        """What the next batch depends on besides its rows: the `"probe"` window RNG and `max_turns`. `RxTTrainer`
        saves it in checkpoints, so a resumed run builds the episodes of the uninterrupted one."""
        return {"rng": self._rng.getstate(), "max_turns": self.max_turns}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self.set_max_turns(state["max_turns"])

    def _turns(self, row: dict) -> list[tuple[str, str]]:
        if self.window == "head" or self.max_turns is None:
            return episode_turns(row, self.max_turns)
        limit = self.max_turns - 1 if self.max_probe_distance is None else min(self.max_turns - 1, self.max_probe_distance)
        fitting = [p for p in row.get("probes") or [] if p["distance"] <= limit]
        turns = episode_turns(row)
        if not fitting:
            return turns[: self.max_turns]
        end = self._rng.choice(fitting)["turn"]
        start = max(0, end - (self.max_turns - 1))
        return turns[start : end + 1]

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        episodes = [self._turns(row) for row in rows]
        flat = [turn for turns in episodes for turn in turns]
        query_bodies = tokenize_texts(self.tokenizer, [q for q, _ in flat])
        answer_bodies = tokenize_texts(self.tokenizer, [a for _, a in flat])
        reference = self.label_mode == "reference"
        encoded = [
            build_interaction(
                self.ids, q, a, self.max_length, self.overflow, train_answer_token=reference, train_eos=True, query=text
            )
            for q, a, (text, _) in zip(query_bodies, answer_bodies, flat)
        ]

        num_turns = torch.tensor([len(turns) for turns in episodes], dtype=torch.long)
        n, b = int(num_turns.max()), len(rows)
        length = pad_to_multiple(max(len(seq) for seq, _ in encoded), self.pad_to_multiple_of)
        input_ids = torch.full((n, b, length), self.ids["pad_token_id"], dtype=torch.long)
        attention_mask = torch.zeros((n, b, length), dtype=torch.long)
        labels = torch.full((n, b, length), IGNORE_INDEX, dtype=torch.long)
        turn_mask = torch.zeros((n, b), dtype=torch.long)
        position = 0
        for j, turns in enumerate(episodes):
            for k in range(len(turns)):
                seq, target = encoded[position]
                position += 1
                fill_row(input_ids[k, j], seq)
                attention_mask[k, j, : len(seq)] = 1
                fill_row(labels[k, j], target)
                turn_mask[k, j] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "turn_mask": turn_mask,
            "num_turns": num_turns,
        }
