#!/usr/bin/env python
"""Stage 5: Memory Reinforcement Learning (IMPO) on episode rows (`query`, `answer`, `interactions`).

    python scripts/train_mrl.py --model_name_or_path runs/smat --train_file dialogues.jsonl --output_dir runs/mrl \
        [--curriculum 1,2,4 --advantage_estimator group --num_generations 4] [any MRLConfig / GRPOConfig flag]
        [--bleu_factor 0.25 --cos_factor 0.25 --retention_factor 0.5]

The retention term (`--retention_factor`, docs/training.md "Retention reward and paired evaluation") takes its IDF
from the training episodes.

Works unchanged under `torchrun` and `accelerate launch`. Saves the policy as a trust_remote_code folder (and the
critic to `critic/` when `advantage_estimator=critic`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.cli import run_stage  # noqa: E402
from trainers.mrl_config import MRLConfig  # noqa: E402
from trainers.mrl_trainer import MRLCollator, MRLTrainer  # noqa: E402


def main(argv=None):
    return run_stage(MRLTrainer, MRLConfig, "episode", lambda tokenizer, args: MRLCollator(tokenizer, args.max_length),
                     argv)  # fmt: skip


if __name__ == "__main__":
    main()
