#!/usr/bin/env python
"""DMPO (docs/spec.md#dmpo, after SMAT) on preference episodes
`{"interactions": [{"query", "accepted": {"answer"}, "rejected": {"answer"}, "neutral"?: {"answer"}}, ...]}`.

    python scripts/train_dmpo.py --model_name_or_path runs/smat --train_file preferences.jsonl --output_dir runs/dmpo \
        [--beta 0.1 --label_smoothing 0 --anchor_weight 0.1 --bptt_turns 1] [any TrainingArguments / DMPOConfig flag]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.cli import run_stage  # noqa: E402
from trainers.dmpo import DMPOCollator, DMPOConfig, DMPOTrainer, validate_dmpo_rows  # noqa: E402


def main(argv=None):
    return run_stage(DMPOTrainer, DMPOConfig, None, lambda tokenizer, args: DMPOCollator(tokenizer, args.max_length),
                     argv, validate=validate_dmpo_rows)


if __name__ == "__main__":
    main()
