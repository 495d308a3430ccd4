#!/usr/bin/env python
"""Stage 4: supervised memory-aware training (SMAT) on episode rows (`query`, `answer`, `interactions`).

    python scripts/train_smat.py --model_name_or_path runs/memattn --train_file dialogues.jsonl --output_dir runs/smat \
        [--bptt_turns 0 --episode_length_start 2 --episode_max_turns 7] [any TrainingArguments / SMATConfig flag]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.cli import DataArguments, ModelArguments, load_model, load_split, load_tokenizer, parse_arguments, train_and_save  # noqa: E402
from trainers.data import EpisodeCollator  # noqa: E402
from trainers.smat import SMATConfig, SupervisedMemoryAwareTrainer  # noqa: E402


def main(argv=None):
    model_args, data_args, args = parse_arguments((ModelArguments, DataArguments, SMATConfig), argv)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer)
    trainer = SupervisedMemoryAwareTrainer(
        model=model,
        args=args,
        train_dataset=load_split(data_args, data_args.train_file, "episode", tokenizer, args.max_length),
        eval_dataset=load_split(data_args, data_args.validation_file, "episode", tokenizer, args.max_length),
        data_collator=EpisodeCollator(tokenizer, max_length=args.max_length),
        processing_class=tokenizer,
    )
    train_and_save(trainer, tokenizer, args)
    return trainer


if __name__ == "__main__":
    main()
