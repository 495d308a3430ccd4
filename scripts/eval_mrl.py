#!/usr/bin/env python
"""MRL evidence: mean reward and per-distance recall of a model before and after MRL on held-out episodes.

    python scripts/eval_mrl.py --before runs/quickstart/model --after runs/mrl/model --reward_data episodes.jsonl \
        --recall_data dialogues_test.jsonl --output runs/mrl/eval.json [MRLConfig reward flags, --curriculum 4]

Reward: greedy rollouts with the MRL reward (`MRLTrainer.evaluate`) at the last curriculum stage's step count.
Recall: `trainers.memory_eval.evaluate_system` (memory updated with the model's own answers). Output JSON:
`{"reward_before", "reward_after", "recall_before": {...}, "recall_after": {...}, ...}`. `--reward_ceiling` adds
`reward_references`, `reward_other_template` and their mean `reward_ceiling` (synthetic episodes): what a policy that
recalls every value can expect, since the references draw one of two templates at random.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from trainers.cli import parse_arguments  # noqa: E402
from trainers.data import check_rows, iter_json_rows, load_rows, validate_rows  # noqa: E402
from trainers.memory_eval import evaluate_system  # noqa: E402
from trainers.mrl_config import MRLConfig  # noqa: E402
from trainers.mrl_trainer import MRLCollator, MRLTrainer  # noqa: E402
from trainers.synthetic import other_template  # noqa: E402


@dataclass
class MRLEvalArguments:
    before: str = field(metadata={"help": "Model folder before MRL."})
    after: str = field(metadata={"help": "Model folder after MRL."})
    reward_data: str = field(metadata={"help": "Held-out episode rows (JSONL) for the reward."})
    recall_data: str | None = field(default=None, metadata={"help": "Held-out dialogues with probes (recall)."})
    output: str = field(default="runs/mrl/eval.json", metadata={"help": "JSON output."})
    recall_batch_size: int = field(default=50, metadata={"help": "Dialogues evaluated together."})
    max_new_tokens: int = field(default=40, metadata={"help": "Answer length limit of the recall evaluation."})
    reward_ceiling: bool = field(
        default=False,
        metadata={"help": "Also score the references and their other template (synthetic data): the reward's ceiling."},
    )


def reward_ceiling(trainer: MRLTrainer, reward_rows) -> dict:
    """The reward of the reference answers themselves and of the same answers in the synthetic generator's other
    template (`trainers.synthetic.other_template`). A policy that recalls every value matches the reference's
    template by chance, so their mean is the reward it can expect: the ceiling of any before/after gain."""
    collator = trainer.data_collator
    swapped = [{**row, "answer": other_template(row["answer"]),
                "interactions": [{**turn, "answer": other_template(turn["answer"])} for turn in row["interactions"]]}
               for row in reward_rows]  # fmt: skip

    def key(episode):
        return tuple(tuple(query) + (-1,) + tuple(answer) for query, answer in episode)

    others = {key(original): [answer for _, answer in other[1:]]
              for original, other in zip(collator(reward_rows)["episodes"], collator(swapped)["episodes"])}  # fmt: skip
    references = trainer.evaluate(answers=lambda episode: [answer for _, answer in episode[1:]])["eval_reward"]
    other = trainer.evaluate(answers=lambda episode: others[key(episode)])["eval_reward"]
    return {"reward_references": references, "reward_other_template": other, "reward_ceiling": (references + other) / 2}


def measure(model_dir: str, args: MRLConfig, options: MRLEvalArguments, reward_rows, recall_rows,
            ceiling: bool = False) -> dict:  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    trainer = MRLTrainer(model=model, args=args, processing_class=tokenizer, eval_dataset=reward_rows,
                         data_collator=MRLCollator(tokenizer, args.max_length))  # fmt: skip
    trainer.set_epoch(sum(stage.epochs for stage in args.curriculum_stages) - 1)
    rewards = trainer.evaluate()
    result = {"reward": rewards["eval_reward"],
              "reward_per_step": {k.rsplit("_", 1)[1]: v for k, v in rewards.items() if "_step_" in k}}  # fmt: skip
    if ceiling:
        result["ceiling"] = reward_ceiling(trainer, reward_rows)
    if recall_rows is not None:
        measured = evaluate_system(model.eval(), tokenizer, recall_rows, "memory",
                                   batch_size=options.recall_batch_size, max_new_tokens=options.max_new_tokens)  # fmt: skip
        result["recall"] = measured["recall"]
    return result


def main(argv=None) -> dict:
    options, args = parse_arguments((MRLEvalArguments, MRLConfig), argv)
    args.beta = 0.0  # evaluation needs no reference model
    reward_rows = validate_rows(load_rows(options.reward_data), kind="episode")  # checked before any model loads
    recall_rows = None
    if options.recall_data:
        recall_rows = check_rows(iter_json_rows(options.recall_data), "evaluation", options.recall_data)
    before = measure(options.before, args, options, reward_rows, recall_rows, ceiling=options.reward_ceiling)
    after = measure(options.after, args, options, reward_rows, recall_rows)
    result = {"reward_before": before["reward"], "reward_after": after["reward"],
              "reward_relative_change": (after["reward"] - before["reward"]) / max(abs(before["reward"]), 1e-12),
              "reward_per_step_before": before["reward_per_step"], "reward_per_step_after": after["reward_per_step"],
              "recall_before": before.get("recall", {}), "recall_after": after.get("recall", {}),
              "n_reward_episodes": len(reward_rows), "n_recall_dialogues": len(recall_rows or [])}  # fmt: skip
    result.update(before.get("ceiling", {}))  # with the embedding of the model before MRL
    output = Path(options.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
