"""Generate the synthetic fact-recall data of docs/spec.md#memory-evaluation (deterministic for a given `--seed`).

Example:

    python scripts/make_synthetic_data.py --output-dir runs/data --seed 0 --num-train 4000 --max-turns 10

Writes into `--output-dir` (a new or empty folder, or one an earlier run of an RxT script created; a folder holding
other files is refused, never overwritten):
    pretrain_{train,validation}.jsonl                  {"text"}                                   (stage 0/1)
    sft_{train,validation}.jsonl                       {"query", "answer"}                        (stage 2)
    dialogues_{train,validation,test}.jsonl            {"query", "answer", "interactions", "probes"} (stages 3-5,
                                                       memory evaluation; `dialogues_long_range_*` with --long-range)
    dialogues_paraphrase_test.jsonl                    (--style diverse) test episodes in held-out templates

Values come from fixed pools that are disjoint between train, validation and test. The row formats, the episode
sampling and the chance level are documented in `trainers/synthetic.py`.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import HfArgumentParser  # noqa: E402

from trainers.cli import claim_output_dir  # noqa: E402
from trainers.synthetic import chance_level, write_synthetic_data  # noqa: E402


@dataclass
class SyntheticDataArguments:
    output_dir: str = field(default="runs/data", metadata={"help": "Directory for the JSONL files (new, empty, or "
                                                           "written by an earlier run)."})
    seed: int = field(default=0, metadata={"help": "Seed of the episodes (the value pools are fixed)."})
    num_train: int = field(default=4000, metadata={"help": "Training episodes (dialogues_train.jsonl)."})
    num_validation: int = field(default=200, metadata={"help": "Validation episodes."})
    num_test: int = field(default=500, metadata={"help": "Test episodes (memory evaluation)."})
    min_turns: int = field(default=2, metadata={"help": "Minimum turns per episode (>= 2)."})
    max_turns: int = field(default=10, metadata={"help": "Maximum turns per episode."})
    max_distance: int = field(
        default=8, metadata={"help": "Maximum probe distance (turns from statement to question; 1 = next turn)."}
    )
    num_pretrain: int = field(default=10000, metadata={"help": "Pre-training text rows (train split)."})
    num_pretrain_validation: int | None = field(
        default=None, metadata={"help": "Pre-training validation rows (default: num_pretrain // 10)."}
    )
    num_sft: int = field(default=5000, metadata={"help": "Single-turn SFT rows (train split)."})
    num_sft_validation: int | None = field(
        default=None, metadata={"help": "SFT validation rows (default: num_sft // 10)."}
    )
    mrl_steps: str | None = field(
        default=None,
        metadata={"help": "MRL curriculum subsets, e.g. '1,2,4': dialogues[_long_range]_steps-N_{split}.jsonl with "
                  "exactly N follow-ups per episode."},
    )  # fmt: skip
    style: str = field(
        default="basic",
        metadata={"help": "'basic' or 'diverse' (many paraphrase templates, varied values, more attributes; also "
                  "writes dialogues_paraphrase_test.jsonl in held-out templates): trainers/synthetic.py."},
    )  # fmt: skip
    long_range: bool = field(
        default=False,
        metadata={
            "help": "Topic-change episodes: the fact at turn 0, off-topic chit-chat, the question at the last turn "
            "(written as dialogues_long_range_*.jsonl)."
        },
    )


def main(argv: list[str] | None = None) -> dict[str, Path]:
    (args,) = HfArgumentParser(SyntheticDataArguments).parse_args_into_dataclasses(args=argv)
    options = asdict(args)
    options["mrl_steps"] = [int(n) for n in args.mrl_steps.split(",")] if args.mrl_steps else None
    # a folder holding other files is refused (its files would be overwritten); one this script made is rewritten
    claim_output_dir(args.output_dir, "--output-dir", clear=False)
    written = write_synthetic_data(**options)
    for path in written.values():
        with path.open(encoding="utf-8") as handle:
            count = sum(1 for _ in handle)
        print(f"{path}: {count} rows")
    chances = {split: chance_level(split, args.style) for split in ("train", "validation", "test")}
    print(f"chance level: train {chances['train']:.4f}, validation {chances['validation']:.4f}, "
          f"test {chances['test']:.4f}")  # fmt: skip
    return written


if __name__ == "__main__":
    main()
