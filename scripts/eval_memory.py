#!/usr/bin/env python
"""Memory evaluation: per-distance recall of generated answers, with memory, with memory reset every turn, and for
stateless baselines (training.md §10).

    python scripts/eval_memory.py MODEL_DIR [--data FILE.jsonl] [--output FILE.json] [--baseline DIR]

`--data` takes JSONL rows `{"query", "answer", "interactions": [{"query", "answer"}, ...],
"probes": [{"turn", "distance", "attribute", "expected"}, ...]}` (default: the generated test split). Writes the JSON
(`recall`, `recall_memory_reset`, `recall_stateless`, `chance`, `n_dialogues`, ...) and a PNG next to it.
"""

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser  # noqa: E402

from trainers.data import check_rows, iter_json_rows  # noqa: E402
from trainers.memory_eval import evaluate_system, plot_recall  # noqa: E402
from trainers.synthetic import chance_level, generate_dialogues  # noqa: E402


@dataclass
class EvalArguments:
    model_dir: str = field(metadata={"help": "RxT model folder (tokenizer inside)."})
    data: str | None = field(default=None, metadata={"help": "JSONL dialogues with probes (default: synthetic test)."})
    output: str | None = field(default=None, metadata={"help": "JSON output (default: MODEL_DIR/../memory_eval.json)."})
    baseline: str | None = field(default=None, metadata={"help": "Stateless baseline folder (current query only)."})
    full_history_baseline: str | None = field(default=None, metadata={"help": "Baseline evaluated on full history."})
    num_dialogues: int = field(default=200, metadata={"help": "Dialogues of the default test split."})
    max_turns: int = field(default=10, metadata={"help": "Turns per dialogue of the default test split."})
    max_distance: int = field(default=8, metadata={"help": "Maximum fact-question distance of the default split."})
    seed: int = field(default=1234, metadata={"help": "Seed of the default test split."})
    batch_size: int = field(default=32, metadata={"help": "Dialogues evaluated together."})
    max_new_tokens: int = field(default=24, metadata={"help": "Answer length limit."})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's choice)."})


def load_rows(args: EvalArguments) -> tuple[list[dict], float]:
    if args.data is None:
        rows = generate_dialogues(args.num_dialogues, seed=args.seed, split="test", max_turns=args.max_turns,
                                  max_distance=args.max_distance)  # fmt: skip
        return rows, chance_level("test")
    rows = check_rows(iter_json_rows(args.data), "evaluation", args.data)  # every row checked before any generation
    values_per_attribute: dict[str, set] = {}
    for row in rows:
        for probe in row["probes"]:
            values_per_attribute.setdefault(probe.get("attribute", "value"), set()).add(probe["expected"])
    chance = sum(1 / len(v) for v in values_per_attribute.values()) / max(len(values_per_attribute), 1)
    return rows, chance


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # MODEL_DIR as the first positional argument
        argv = ["--model_dir", argv[0], *argv[1:]]
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, chance = load_rows(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True).eval()
    started = time.perf_counter()
    kwargs = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    memory = evaluate_system(model, tokenizer, rows, "memory", **kwargs)
    reset = evaluate_system(model, tokenizer, rows, "memory_reset", **kwargs)
    result = {
        "recall": memory["recall"],
        "recall_memory_reset": reset["recall"],
        "recall_stateless": {},
        "chance": chance,
        "n_dialogues": len(rows),
        "counts": memory["counts"],
        "ci95": {"memory": memory["ci95"], "memory_reset": reset["ci95"]},
        "perplexity": {"memory": memory["perplexity"], "memory_reset": reset["perplexity"]},
        "token_accuracy": {"memory": memory["token_accuracy"], "memory_reset": reset["token_accuracy"]},
        "value_token_accuracy": {"memory": memory["value_token_accuracy"], "memory_reset": reset["value_token_accuracy"]},
        "wrong_fact": {"memory": memory["wrong_fact"], "memory_reset": reset["wrong_fact"]},
    }
    for key, folder, system in (("stateless", args.baseline, "stateless"),
                                ("full_history", args.full_history_baseline, "full_history")):  # fmt: skip
        if folder:
            baseline = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
            measured = evaluate_system(baseline, tokenizer, rows, system, **kwargs)
            result[f"recall_{key}"] = measured["recall"]
            result["ci95"][key] = measured["ci95"]
            result["perplexity"][key] = measured["perplexity"]
            result["token_accuracy"][key] = measured["token_accuracy"]
            result["value_token_accuracy"][key] = measured["value_token_accuracy"]
            result["wrong_fact"][key] = measured["wrong_fact"]
    result["seconds"] = round(time.perf_counter() - started, 1)
    output = Path(args.output) if args.output else Path(args.model_dir).resolve().parent / "memory_eval.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    plot_recall(result, str(output.with_suffix(".png")))
    print(json.dumps({k: result[k] for k in ("recall", "recall_memory_reset", "recall_stateless", "chance")}))
    return result


if __name__ == "__main__":
    main()
