#!/usr/bin/env python
"""Stage 4: supervised memory-aware training (SMAT) on episode rows (`query`, `answer`, `interactions`).

    python scripts/train_smat.py --model_name_or_path runs/memattn --train_file dialogues.jsonl --output_dir runs/smat \
        [--bptt_turns 0 --episode_length_start 2 --episode_max_turns 7] [any TrainingArguments / SMATConfig flag]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.cli import run_stage  # noqa: E402
from trainers.data import EpisodeCollator  # noqa: E402
from trainers.smat import SMATConfig, SupervisedMemoryAwareTrainer  # noqa: E402


def episode_collator(tokenizer, args):
    return EpisodeCollator(tokenizer, max_length=args.max_length, window=args.episode_window, seed=args.seed,
                           max_probe_distance=args.episode_max_probe_distance)


def main(argv=None):
    return run_stage(SupervisedMemoryAwareTrainer, SMATConfig, "episode", episode_collator, argv)


if __name__ == "__main__":
    main()
