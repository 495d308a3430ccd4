#!/usr/bin/env python
"""Stages 1–2: joint LM pre-training (`{text}` rows) or interaction SFT (`--sft`, `{query, answer}` rows).

    python scripts/train_joint.py --model_config cfg.json --tokenizer_name_or_path tok --train_file pretrain.jsonl \
        --output_dir runs/joint [--sft] [any TrainingArguments / JointLMConfig flag]
    python scripts/train_joint.py args.json          # or .yaml: the same fields in a file
Runs unchanged under `torchrun` and `accelerate launch`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.cli import run_stage  # noqa: E402
from trainers.data import JointLMCollator  # noqa: E402
from trainers.joint import JointLMConfig, JointLMTrainer  # noqa: E402


def main(argv=None):
    def collator(tokenizer, args):
        return JointLMCollator(tokenizer, mask_prob=args.mask_prob, sft=args.sft, max_length=args.max_length)

    def row_kind(args):
        return "interaction" if args.sft else "text"

    return run_stage(JointLMTrainer, JointLMConfig, row_kind, collator, argv, use_mlm_head=True)


if __name__ == "__main__":
    main()
