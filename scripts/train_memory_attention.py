#!/usr/bin/env python
"""Stage 3: self-supervised memory-attention pre-training on episode rows (`query`, `answer`, `interactions`).

    python scripts/train_memory_attention.py --model_name_or_path runs/joint --train_file dialogues.jsonl \
        --output_dir runs/memattn [--ed_label_mode pool] [any TrainingArguments / MemoryAttentionConfig flag]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.cli import run_stage  # noqa: E402
from trainers.data import EpisodeCollator  # noqa: E402
from trainers.memory_attention import MemoryAttentionConfig, MemoryAttentionTrainer  # noqa: E402


def episode_collator(tokenizer, args):
    return EpisodeCollator(tokenizer, max_length=args.max_length)


def main(argv=None):
    return run_stage(MemoryAttentionTrainer, MemoryAttentionConfig, "episode", episode_collator, argv)


if __name__ == "__main__":
    main()
