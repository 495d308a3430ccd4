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

from trainers.cli import DataArguments, ModelArguments, load_model, load_split, load_tokenizer, parse_arguments, train_and_save  # noqa: E402
from trainers.data import JointLMCollator  # noqa: E402
from trainers.joint import JointLMConfig, JointLMTrainer  # noqa: E402


def main(argv=None):
    model_args, data_args, args = parse_arguments((ModelArguments, DataArguments, JointLMConfig), argv)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer, use_mlm_head=True)
    kind = "interaction" if args.sft else "text"
    trainer = JointLMTrainer(
        model=model,
        args=args,
        train_dataset=load_split(data_args, data_args.train_file, kind, tokenizer, args.max_length),
        eval_dataset=load_split(data_args, data_args.validation_file, kind, tokenizer, args.max_length),
        data_collator=JointLMCollator(tokenizer, mask_prob=args.mask_prob, sft=args.sft, max_length=args.max_length),
        processing_class=tokenizer,
    )
    train_and_save(trainer, tokenizer, args)
    return trainer


if __name__ == "__main__":
    main()
