#!/usr/bin/env python
"""Memory evaluation: per-distance recall of generated answers, with memory, with memory reset every turn, and for
stateless baselines (docs/spec.md#memory-evaluation).

    python scripts/eval_memory.py MODEL_DIR [--data FILE.jsonl] [--paraphrase_data FILE.jsonl] [--output FILE.json]
        [--baseline DIR] [--style basic|diverse]

`--data` takes JSONL rows `{"query", "answer", "interactions": [{"query", "answer"}, ...],
"probes": [{"turn", "distance", "attribute", "expected"}, ...]}` (docs/training.md, "Data formats"; default: the
generated test split of `--style`). A probe is recalled when its `expected` value appears in the generated answer, so
any dialogue written in any words can be evaluated. `--paraphrase_data` (same format) is a second set evaluated the
same way and reported beside the first: the held-out-template set (default with `--style diverse` and no `--data`:
the generated `paraphrase` test set, whose templates never occur in training). Writes the JSON (`recall`,
`recall_memory_reset`, `recall_stateless`, `chance`, `n_dialogues`, `ci95` (Wilson 95 %), ..., and under
`paraphrase` the same keys for the second set) and a PNG next to it.
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
from trainers.synthetic import STYLES, chance_level, generate_dialogues  # noqa: E402


@dataclass
class EvalArguments:
    model_dir: str = field(metadata={"help": "RxT model folder (tokenizer inside)."})
    data: str | None = field(default=None, metadata={"help": "JSONL dialogues with probes (default: synthetic test)."})
    paraphrase_data: str | None = field(
        default=None, metadata={"help": "A second JSONL set reported beside --data, e.g. held-out templates (default "
                                "with --style diverse and no --data: the generated paraphrase test set)."})
    style: str = field(default="basic", metadata={"help": f"Generator style of the default test sets: {STYLES}."})
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
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel of every model evaluated: eager | sdpa | ... (default: "
                                "transformers' choice). With 2 CPU threads on small models eager is the faster one."})


def load_rows(args: EvalArguments) -> tuple[list[dict], float]:
    """The `--data` rows (or the generated test split of `--style`) and their chance level."""
    if args.data is None:
        rows = generate_dialogues(args.num_dialogues, seed=args.seed, split="test", max_turns=args.max_turns,
                                  max_distance=args.max_distance, style=args.style)  # fmt: skip
        return rows, chance_level("test", args.style)
    return read_dialogues(args.data)


def load_paraphrase_rows(args: EvalArguments) -> tuple[list[dict], float] | None:
    """The `--paraphrase_data` rows, or with `--style diverse` and no `--data` the generated held-out-template test
    set (the same seed, sizes and values' pools as the default in-template set); None otherwise."""
    if args.paraphrase_data is not None:
        return read_dialogues(args.paraphrase_data)
    if args.data is None and args.style != "basic":
        rows = generate_dialogues(args.num_dialogues, seed=args.seed, split="test", max_turns=args.max_turns,
                                  max_distance=args.max_distance, style=args.style, templates="held_out")  # fmt: skip
        return rows, chance_level("test", args.style)
    return None


def read_dialogues(path: str) -> tuple[list[dict], float]:
    """Rows of a dialogue file (every row checked before any generation) and the chance level of guessing uniformly
    among the values its probes expect for the same attribute."""
    rows = check_rows(iter_json_rows(path), "evaluation", path)
    values_per_attribute: dict[str, set] = {}
    for row in rows:
        for probe in row["probes"]:
            values_per_attribute.setdefault(probe.get("attribute", "value"), set()).add(probe["expected"])
    chance = sum(1 / len(v) for v in values_per_attribute.values()) / max(len(values_per_attribute), 1)
    return rows, chance


def evaluate_set(model, tokenizer, rows: list[dict], chance: float, baselines: dict, **kwargs) -> dict:
    """Every system on one dialogue set: the result keys of the module docstring. `baselines`: `{"stateless" |
    "full_history": model}`."""
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
    for key, baseline in baselines.items():
        system = "stateless" if key == "stateless" else "full_history"
        measured = evaluate_system(baseline, tokenizer, rows, system, **kwargs)
        result[f"recall_{key}"] = measured["recall"]
        for name in ("ci95", "perplexity", "token_accuracy", "value_token_accuracy", "wrong_fact"):
            result[name][key] = measured[name]
    return result


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # MODEL_DIR as the first positional argument
        argv = ["--model_dir", argv[0], *argv[1:]]
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.style not in STYLES:
        raise ValueError(f"--style {args.style!r}: expected one of {STYLES}.")
    rows, chance = load_rows(args)
    paraphrase = load_paraphrase_rows(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    load = {"trust_remote_code": True}
    if args.attn_implementation:
        load["attn_implementation"] = args.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, **load).eval()
    started = time.perf_counter()
    kwargs = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    baselines = {}
    for key, folder in (("stateless", args.baseline), ("full_history", args.full_history_baseline)):
        if folder:
            baselines[key] = AutoModelForCausalLM.from_pretrained(folder, **load).eval()
    result = evaluate_set(model, tokenizer, rows, chance, baselines, **kwargs)
    if paraphrase is not None:
        result["paraphrase"] = evaluate_set(model, tokenizer, *paraphrase, baselines, **kwargs)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["attn_implementation"] = model.config._attn_implementation
    output = Path(args.output) if args.output else Path(args.model_dir).resolve().parent / "memory_eval.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    plot_recall(result, str(output.with_suffix(".png")))
    shown = {k: result[k] for k in ("recall", "recall_memory_reset", "recall_stateless", "chance")}
    if paraphrase is not None:
        shown["paraphrase"] = {k: result["paraphrase"][k] for k in ("recall", "recall_memory_reset", "chance")}
    print(json.dumps(shown))
    return result


if __name__ == "__main__":
    main()
