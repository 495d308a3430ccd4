#!/usr/bin/env python
"""Stage 3: self-supervised memory-attention pre-training on episode rows (`query`, `answer`, `interactions`).

    python scripts/train_memory_attention.py --model_name_or_path runs/joint --train_file dialogues.jsonl \
        --output_dir runs/memattn [--ed_label_mode pool] [any TrainingArguments / MemoryAttentionConfig flag]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.cli import DataArguments, ModelArguments, load_model, load_split, load_tokenizer, parse_arguments, train_and_save  # noqa: E402
from trainers.data import EpisodeCollator  # noqa: E402
from trainers.memory_attention import MemoryAttentionConfig, MemoryAttentionTrainer  # noqa: E402


def main(argv=None):
    model_args, data_args, args = parse_arguments((ModelArguments, DataArguments, MemoryAttentionConfig), argv)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer)
    trainer = MemoryAttentionTrainer(
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
