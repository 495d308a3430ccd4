"""Train the RxT byte-level BPE tokenizer and save it with `save_pretrained`.

Example:

    python scripts/train_tokenizer.py --input corpus.txt dialogs.jsonl --vocab-size 8192 --output rxt-tokenizer

Text files are read line by line. Records of `.jsonl` / `.json` / `.parquet` files contribute their `text` field,
their `query` and `answer` fields, and the `query` / `answer` of every item in `interactions`. Every file is checked
before training starts: a missing, empty, blank-only or non-UTF-8 file, a broken JSON line, a record without text and
a `.csv` stop with an error naming the file and the line. Without `--input`, the tokenizer is trained on the
documentation topics that ship with CPython (`pydoc_data.topics`), which needs no download.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import HfArgumentParser  # noqa: E402

from modeling_rxt.tokenization_rxt import check_rxt_tokenizer, train_rxt_tokenizer  # noqa: E402
from trainers.data import iter_json_rows, load_rows, read_lines  # noqa: E402


@dataclass
class TrainTokenizerArguments:
    output: str = field(metadata={"help": "Directory to save the tokenizer to (created if missing)."})
    input: list[str] | None = field(
        default=None,
        metadata={
            "help": "Text files (one text per line) or .jsonl / .json / .parquet rows to train on. Rows may hold "
            "`text`, `query` + `answer`, or "
            "`interactions` (a list of {query, answer}). Default: CPython's pydoc_data.topics corpus."
        },
    )
    vocab_size: int = field(default=1024, metadata={"help": "Vocabulary size, special tokens included (>= 267)."})
    min_frequency: int = field(default=2, metadata={"help": "Minimum pair frequency for a BPE merge."})


def _strings_from_record(record, location: str) -> Iterator[str]:
    if not isinstance(record, dict):
        raise ValueError(f"{location}: expected a JSON object, got {type(record).__name__}.")
    found = False
    if isinstance(record.get("text"), str):
        found = True
        yield record["text"]
    for key in ("query", "answer"):
        if isinstance(record.get(key), str):
            found = True
            yield record[key]
    interactions = record.get("interactions")
    if isinstance(interactions, list):
        for interaction in interactions:
            if isinstance(interaction, dict):
                for key in ("query", "answer"):
                    if isinstance(interaction.get(key), str):
                        found = True
                        yield interaction[key]
    if not found:
        raise ValueError(
            f"{location}: no text found; expected a `text` field, `query` / `answer` fields, or `interactions` "
            "(a list of {query, answer})."
        )


def iter_file_texts(path: str) -> Iterator[str]:
    """Yield the training strings of a file: the records of a `.jsonl` / `.json` / `.parquet` file, or the lines of
    any other text file (`.txt`, `.md`, ...). A missing, empty, blank-only or non-UTF-8 file, a broken JSON line and a
    `.csv` stop with a `ValueError` naming the file and the line (the checks of `trainers.data`)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--input {path}: no such file.")
    suffix = file.suffix.lower()
    if suffix in (".csv", ".tsv"):
        raise ValueError(f"--input {path}: {suffix} files are not read (their commas and quotes would be trained as "
                         "text); expected plain text files (one text per line), or .jsonl / .json / .parquet rows "
                         'such as {"text": "..."}.')  # fmt: skip
    if suffix in (".jsonl", ".json"):
        for location, record in iter_json_rows(file):
            yield from _strings_from_record(record, location)
    elif suffix == ".parquet":
        for index, record in enumerate(load_rows(file)):
            yield from _strings_from_record(record, f"{path} row {index}")
    else:
        found = False
        for _, line in read_lines(file):
            found = found or bool(line.strip())
            yield line
        if not found:
            raise ValueError(f"--input {path}: {'is empty' if file.stat().st_size == 0 else 'holds only blank lines'}"
                             "; expected text, one paragraph or sentence per line.")  # fmt: skip


def iter_default_corpus() -> Iterator[str]:
    """Yield the pydoc topics that ship with CPython (about 0.5 MB of English documentation)."""
    from pydoc_data.topics import topics

    yield from topics.values()


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(TrainTokenizerArguments).parse_args_into_dataclasses(args=argv)
    if args.input:
        for path in args.input:  # every file checked before training starts (an error inside the trainer is opaque)
            for _ in iter_file_texts(path):
                pass
        texts = (text for path in args.input for text in iter_file_texts(path))
        source = ", ".join(args.input)
    else:
        texts = iter_default_corpus()
        source = "pydoc_data.topics (CPython documentation)"

    start = time.perf_counter()
    tokenizer = train_rxt_tokenizer(texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    elapsed = time.perf_counter() - start
    check_rxt_tokenizer(tokenizer)
    tokenizer.save_pretrained(args.output)
    print(f"Trained on {source} in {elapsed:.2f}s: vocab size {len(tokenizer)}; saved to {args.output}")


if __name__ == "__main__":
    main()
