#!/usr/bin/env python
"""DMPO (training.md §7, after SMAT) on preference episodes
`{"interactions": [{"query", "accepted": {"answer"}, "rejected": {"answer"}, "neutral"?: {"answer"}}, ...]}`.

    python scripts/train_dmpo.py --model_name_or_path runs/smat --train_file preferences.jsonl --output_dir runs/dmpo \
        [--beta 0.1 --label_smoothing 0 --anchor_weight 0.1 --bptt_turns 1] [any TrainingArguments / DMPOConfig flag]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import set_seed  # noqa: E402

from trainers.cli import (  # noqa: E402
    DataArguments,
    ModelArguments,
    load_model,
    load_tokenizer,
    parse_arguments,
    train_and_save,
)
from trainers.data import load_rows  # noqa: E402
from trainers.dmpo import DMPOCollator, DMPOConfig, DMPOTrainer, validate_dmpo_rows  # noqa: E402


def main(argv=None):
    model_args, data_args, args = parse_arguments((ModelArguments, DataArguments, DMPOConfig), argv)
    tokenizer = load_tokenizer(model_args)
    set_seed(args.seed)  # a new model's initial weights depend on the seed only

    def split(path):
        if path is None:
            return None
        kwargs = {"name": data_args.dataset_config} if data_args.dataset_config else {}
        return validate_dmpo_rows(load_rows(path, **kwargs), tokenizer, args.max_length, data_args.on_error)

    trainer = DMPOTrainer(
        model=load_model(model_args, tokenizer),
        args=args,
        train_dataset=split(data_args.train_file),
        eval_dataset=split(data_args.validation_file),
        data_collator=DMPOCollator(tokenizer, max_length=args.max_length),
        processing_class=tokenizer,
    )
    train_and_save(trainer, tokenizer, args)
    return trainer


if __name__ == "__main__":
    main()
