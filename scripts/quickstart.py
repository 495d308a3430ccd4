#!/usr/bin/env python
"""The main job: train a small RxT end to end on CPU and show, with numbers, that it remembers across turns.

    python scripts/quickstart.py [--preset quickstart|long|long_targets|gpu|micro|FILE.json] [--output-dir runs/quickstart]

Steps: synthetic data → tokenizer → the curriculum stages the preset names → `OUTPUT/model/` → a stateless baseline
of the same size and budget → memory evaluation (`OUTPUT/memory_eval.json` + PNG) → a scripted chat in which a fact
is recalled several turns later → a one-screen summary with the measured time of each step.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.cli import check_output_dir, claim_output_dir  # noqa: E402
from trainers.data import iter_json_rows  # noqa: E402

PRESETS = Path(__file__).resolve().parent / "presets"


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _flags(args: dict) -> list[str]:
    flags = []
    for key, value in args.items():
        if isinstance(value, bool):
            flags += [f"--{key}", str(value)]
        elif isinstance(value, (list, dict)):
            flags += [f"--{key}", json.dumps(value)]
        elif value is not None:
            flags += [f"--{key}", str(value)]
    return flags


def load_preset(name: str) -> tuple[Path, dict]:
    """`--preset NAME` (a file of scripts/presets) or `--preset FILE.json` → (its path, the parsed preset)."""
    path = Path(name) if name.endswith(".json") else PRESETS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"preset {name!r} not found (expected {path}); presets: "
                         f"{sorted(p.stem for p in PRESETS.glob('*.json'))}")  # fmt: skip
    return path, json.loads(path.read_text())


def attention_kernel(preset: dict) -> dict:
    """`{"attn_implementation": NAME}` from the preset's `attn_implementation` (none: transformers' default). It
    applies to training and evaluation and is not saved with the model: a reload gets transformers' default."""
    return {"attn_implementation": preset["attn_implementation"]} if "attn_implementation" in preset else {}


def run_stage(stage: dict, model_flags: list[str], data_dir: Path, tokenizer_dir: Path, output: Path, seed: int):
    """Run one curriculum stage in-process through its script's `main` (the same code path as the CLI)."""
    import train_joint
    import train_memory_attention
    import train_smat

    name = stage["stage"]
    mains = {"joint": (train_joint.main, "pretrain"), "sft": (train_joint.main, "sft"),
             "memory_attention": (train_memory_attention.main, "dialogues"), "smat": (train_smat.main, "dialogues")}  # fmt: skip
    if name not in mains:
        raise ValueError(f"unknown stage {name!r}; expected one of {list(mains)}")
    main, prefix = mains[name]
    prefix = stage.get("data", prefix)  # e.g. "dialogues_fact_question" (a set of the preset's "extra_dialogues")
    if not (data_dir / f"{prefix}_train.jsonl").is_file():
        raise ValueError(f"stage {name!r}: data {prefix!r} not found ({data_dir / (prefix + '_train.jsonl')})")
    args = {"output_dir": str(output), "report_to": "none", "save_strategy": "no", "seed": seed,
            "use_cpu": not _has_gpu(), "disable_tqdm": True, **stage.get("args", {})}  # fmt: skip
    if name == "sft":
        args["sft"] = True
    flags = model_flags + ["--tokenizer_name_or_path", str(tokenizer_dir), "--train_file",
                           str(data_dir / f"{prefix}_train.jsonl")] + _flags(args)  # fmt: skip
    trainer = main(flags)
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {"steps": trainer.state.global_step, "last_log": history[-1] if history else {},
            "attn_implementation": trainer.model.config._attn_implementation}  # fmt: skip


def episode_set(spec: dict, seed: int) -> list[dict]:
    """Rows of one `"extra_dialogues"` set: `num_train` training episodes of `generate_dialogues` (its other keyword
    arguments), generated with the spec's `seed` (default: the preset's) after skipping the first `skip` (default 0),
    so that sets with one seed and consecutive `skip`s are consecutive, disjoint slices of the same stream."""
    from trainers.synthetic import generate_dialogues

    spec = dict(spec)
    num, skip = spec.pop("num_train"), spec.pop("skip", 0)
    if not isinstance(skip, int) or skip < 0:
        raise ValueError(f"extra_dialogues skip={skip!r}: expected a non-negative number of episodes.")
    return generate_dialogues(skip + num, seed=spec.pop("seed", seed), split="train", **spec)[skip:]


def baseline_steps(preset: dict) -> int:
    """The stateless baseline's budget: as many rows (steps x batch) as all stages together, at its own batch size."""
    args = preset["baseline"].get("args", {})
    if "max_steps" in args:
        raise ValueError(f"baseline.args.max_steps={args['max_steps']}: remove it; the baseline's steps are derived "
                         "from the stages (the same rows as all stages together).")  # fmt: skip
    from transformers import TrainingArguments

    default_batch = TrainingArguments.per_device_train_batch_size  # the dataclass default: what an unset flag gets
    batch = args.get("per_device_train_batch_size", default_batch)
    rows = 0
    for i, stage in enumerate(preset["stages"]):
        stage_args = stage.get("args", {})
        if "max_steps" not in stage_args:
            raise ValueError(f"stage {i} ({stage.get('stage')!r}) has no args.max_steps: the baseline's budget is the "
                             "stages' rows (steps x batch); expected a step count for every stage with a baseline.")  # fmt: skip
        rows += stage_args["max_steps"] * stage_args.get("per_device_train_batch_size", default_batch)
    if rows % batch:
        raise ValueError(f"baseline batch {batch} does not divide the stages' {rows} rows; expected a divisor.")
    return rows // batch


def train_baseline(
    preset: dict, model_config: dict, data_dir: Path, tokenizer, output: Path, seed: int, max_steps: int
) -> dict:
    """Stateless decoder of the same size, trained `max_steps` steps (`baseline_steps`) on the same dialogues turn by
    turn (current query only)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, set_seed

    from modeling_rxt import RxTConfig, RxTStatelessConfig, RxTStatelessForCausalLM
    from trainers.data import InteractionCollator
    from trainers.memory_eval import dialogue_turns

    rows = [row for _, row in iter_json_rows(data_dir / "dialogues_train.jsonl")]
    turns = Dataset.from_list([{"query": q, "answer": a} for row in rows for q, a in dialogue_turns(row)])
    config = RxTStatelessConfig.from_rxt_config(RxTConfig(**model_config), **attention_kernel(preset))
    set_seed(seed)
    model = RxTStatelessForCausalLM(config)
    collator = InteractionCollator(tokenizer, max_length=preset["stages"][-1]["args"].get("max_length", 256))

    def decoder_batch(batch_rows):
        return {k: v for k, v in collator(batch_rows).items() if k in ("input_ids", "attention_mask", "labels")}

    settings = {"use_cpu": not _has_gpu(), **preset["baseline"]["args"], "max_steps": max_steps}
    args = TrainingArguments(output_dir=str(output), report_to="none", save_strategy="no", seed=seed,
                             disable_tqdm=True, remove_unused_columns=False, **settings)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=turns, data_collator=decoder_batch)
    trainer.train()
    trainer.save_model(str(output))
    tokenizer.save_pretrained(str(output))
    return {"steps": trainer.state.global_step, "attn_implementation": model.config._attn_implementation}


def scripted_chat(model_dir: Path, chat: dict, seed: int) -> list[tuple[str, str]]:
    """Play a held-out test dialogue up to a question at exactly `chat["distance"]` turns after its fact; return the
    (query, answer) pairs and the probe."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_rxt import RxTChatSession
    from trainers.memory_eval import dialogue_turns
    from trainers.synthetic import generate_dialogues

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    wanted = chat.get("distance", 3)
    style = {key: chat[key] for key in ("style", "templates") if key in chat}  # e.g. held-out templates
    for row in generate_dialogues(200, seed=seed + 99, split="test", max_turns=chat.get("max_turns", 6), **style):
        probe = next((p for p in row["probes"] if p["distance"] == wanted), None)
        if probe is not None:
            break
    else:
        turns = chat.get("max_turns", 6)
        raise ValueError(f"chat: no test dialogue of <= {turns} turns has a question at distance {wanted}.")
    session = RxTChatSession(model, tokenizer)
    transcript = []
    for query, _ in dialogue_turns(row)[: probe["turn"] + 1]:
        transcript.append((query, session.interact(query, max_new_tokens=chat.get("max_new_tokens", 40))))
    return transcript, probe


def run_mrl(preset: dict, model_dir: Path, data_dir: Path, output: Path, seed: int) -> dict:
    """Stage 5 on the trained model (`train_mrl.py`), then reward and recall before/after (`eval_mrl.py`)."""
    import eval_mrl
    import train_mrl

    if "mrl" not in preset:
        raise ValueError("--with-mrl: the preset has no 'mrl' section (args of scripts/train_mrl.py).")
    output = claim_output_dir(output, "--mrl-output-dir")
    mrl = preset["mrl"]
    args = {"output_dir": str(output / "model"), "report_to": "none", "save_strategy": "no", "seed": seed,
            "use_cpu": not _has_gpu(), "disable_tqdm": True, **mrl["args"]}  # fmt: skip
    train_file = data_dir / f"{mrl.get('data', 'dialogues')}_train.jsonl"
    flags = ["--model_name_or_path", str(model_dir), "--train_file", str(train_file)]
    train_mrl.main(flags + _flags({**attention_kernel(preset), **args}))
    reward_flags = {k: v for k, v in mrl["args"].items() if k not in ("max_steps", "learning_rate", "logging_steps")}
    return eval_mrl.main(["--before", str(model_dir), "--after", str(output / "model"), "--reward_data",
                          str(data_dir / f"{mrl.get('data', 'dialogues')}_validation.jsonl"), "--recall_data",
                          str(data_dir / "memory_eval_test.jsonl"), "--idf_data", str(train_file),
                          "--output", str(output / "eval.json"),
                          "--output_dir", str(output / "eval"), "--report_to", "none", "--reward_ceiling", "true",
                          "--memory_eval", "false", "--use_cpu", str(not _has_gpu())] + _flags(reward_flags))  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quickstart", help="preset name in scripts/presets or a JSON file")
    parser.add_argument("--output-dir", default="runs/quickstart")
    parser.add_argument("--skip-baseline", action="store_true", help="do not train/evaluate the stateless baseline")
    parser.add_argument("--with-mrl", action="store_true", help="then run the preset's MRL stage (stage 5) and "
                        "measure reward and recall before/after into MRL_OUTPUT_DIR/eval.json")
    parser.add_argument("--mrl-output-dir", default="runs/mrl")
    options = parser.parse_args(argv)
    preset_path, preset = load_preset(options.preset)
    with_baseline = bool(preset.get("baseline")) and not options.skip_baseline
    if not isinstance(preset.get("attn_implementation", ""), str):
        raise ValueError(f"preset attn_implementation={preset['attn_implementation']!r}: expected a name such as "
                         "'eager' or 'sdpa', or no key (transformers' default).")  # fmt: skip
    # a baseline budget that cannot be derived fails here, not after the stages trained
    num_baseline_steps = baseline_steps(preset) if with_baseline else None
    # the output folders: refused now (before any work) unless new, empty or written by an earlier run
    out = check_output_dir(options.output_dir, "--output-dir")
    if options.with_mrl:
        mrl_dir = check_output_dir(options.mrl_output_dir, "--mrl-output-dir")
        if mrl_dir == out or mrl_dir in out.parents:
            raise ValueError(f"--mrl-output-dir {options.mrl_output_dir!r} is or contains --output-dir "
                             f"{options.output_dir!r}: clearing it for the MRL stage would delete the model it starts "
                             "from; expected a separate folder (e.g. runs/mrl).")  # fmt: skip
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    import torch

    torch.set_num_threads(preset.get("threads", torch.get_num_threads()))
    from modeling_rxt.tokenization_rxt import train_rxt_tokenizer
    from trainers.synthetic import generate_dialogues, write_jsonl, write_synthetic_data

    out = claim_output_dir(options.output_dir, "--output-dir")
    seed = preset.get("seed", 0)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def timed(name):
        timings[name] = round(time.perf_counter() - timed.last, 1)
        timed.last = time.perf_counter()
        print(f"[quickstart] {name}: {timings[name]} s", flush=True)

    timed.last = started

    data_dir = out / "data"
    write_synthetic_data(data_dir, seed=seed, **preset["data"])
    evaluation = preset["eval"]
    style = evaluation.get("style", "basic")
    # the held-out-template (paraphrase) test set: the style's own held-out templates; "basic" has no template split,
    # so a basic-style preset may name "diverse" (wording and attributes it never trained on)
    paraphrase_style = evaluation.get("paraphrase_style", None if style == "basic" else style)
    if paraphrase_style not in (None, "diverse"):
        raise ValueError(f"eval.paraphrase_style={paraphrase_style!r}: expected 'diverse' (the only style with held-out "
                         "templates) or no key.")  # fmt: skip
    test_sets = {"memory_eval_test": (style, "train")}
    if paraphrase_style is not None:
        test_sets["memory_eval_paraphrase_test"] = (paraphrase_style, "held_out")
    for name, (set_style, templates) in test_sets.items():
        test_rows = generate_dialogues(evaluation["num_dialogues"], seed=seed + 1, split="test",
                                       max_turns=evaluation["max_turns"], max_distance=evaluation["max_distance"],
                                       style=set_style, templates=templates)  # fmt: skip
        write_jsonl(test_rows, data_dir / f"{name}.jsonl")
    for name, spec in preset.get("extra_dialogues", {}).items():  # more episode sets, e.g. fact->question pairs
        write_jsonl(episode_set(spec, seed), data_dir / f"dialogues_{name}_train.jsonl")
    timed("synthetic data")

    texts = [row["text"] for _, row in iter_json_rows(data_dir / "pretrain_train.jsonl")]
    tokenizer = train_rxt_tokenizer(texts, **preset["tokenizer"])
    tokenizer_dir = out / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    timed("tokenizer")

    config_file = out / "model_config.json"
    config_file.write_text(json.dumps(preset["model"], indent=2))
    attention = _flags(attention_kernel(preset))
    model_flags = ["--model_config", str(config_file)] + attention
    stage_results = {}
    for index, stage in enumerate(preset["stages"]):
        stage_dir = out / f"stage{index + 1}_{stage['stage']}"
        stage_results[f"{index + 1}_{stage['stage']}"] = run_stage(stage, model_flags, data_dir, tokenizer_dir, stage_dir, seed)
        model_flags = ["--model_name_or_path", str(stage_dir)] + attention
        timed(f"stage {index + 1} {stage['stage']}")
    model_dir = out / "model"
    shutil.copytree(stage_dir, model_dir)

    baseline_dir = baseline = None
    if with_baseline:
        from transformers import AutoTokenizer

        baseline_dir = out / "baseline_stateless"
        model_config = json.loads(config_file.read_text())
        for name in ("decoder_config", "encoder_config"):
            model_config[name]["vocab_size"] = len(tokenizer)
        baseline = train_baseline(preset, model_config, data_dir, AutoTokenizer.from_pretrained(tokenizer_dir),
                                  baseline_dir, seed, num_baseline_steps)
        timed("stateless baseline")

    import eval_memory

    eval_args = [str(model_dir), "--data", str(data_dir / "memory_eval_test.jsonl"), "--output",
                 str(out / "memory_eval.json"), "--batch_size", str(evaluation.get("batch_size", 32)),
                 "--max_new_tokens", str(evaluation.get("max_new_tokens", 24))] + attention  # fmt: skip
    if baseline_dir is not None:
        eval_args += ["--baseline", str(baseline_dir)]
    if "memory_eval_paraphrase_test" in test_sets:
        eval_args += ["--paraphrase_data", str(data_dir / "memory_eval_paraphrase_test.jsonl")]
    result = eval_memory.main(eval_args)
    from trainers.synthetic import chance_level

    result["chance"] = chance_level("test", style)  # the generated test split: uniform guess over the attribute's pool
    if "paraphrase" in result:
        result["paraphrase"]["chance"] = chance_level("test", paraphrase_style)
    (out / "memory_eval.json").write_text(json.dumps(result, indent=2))
    from trainers.memory_eval import plot_recall

    plot_recall(result, str(out / "memory_eval.png"))
    from trainers.model_card import write_model_card

    write_model_card(model_dir, training={"preset": preset_path.stem, "stages": stage_results}, evaluation=result)
    if baseline_dir is not None:
        baseline_training = {"preset": preset_path.stem, "steps": num_baseline_steps}
        write_model_card(baseline_dir, training=baseline_training, evaluation=result)
    timed("memory evaluation")

    transcript, probe = scripted_chat(model_dir, preset.get("chat", {}), seed)
    timed("scripted chat")
    mrl_result = None
    if options.with_mrl:
        mrl_result = run_mrl(preset, model_dir, data_dir, Path(options.mrl_output_dir), seed)
        timed("MRL + before/after evaluation")
    total = round(time.perf_counter() - started, 1)

    lines = ["", "=" * 78, f"RxT quickstart ({preset_path.stem}) finished in {total} s ({total / 60:.1f} min)", "-" * 78]
    lines += [f"  {name:<24s}{seconds:>8.1f} s" for name, seconds in timings.items()]
    lines += ["-" * 78, "Recall of facts in generated answers (memory updated with the model's own answers):"]
    distances = sorted(result["recall"], key=int)
    lines.append("  distance          " + "".join(f"{d:>7s}" for d in distances))
    paraphrase = result.get("paraphrase") or {}
    for key, label in (("recall", "RxT with memory"), ("recall_memory_reset", "memory reset"),
                       ("recall_stateless", "stateless baseline")):  # fmt: skip
        for source, prefix in ((result, ""), (paraphrase, "  held-out tmpl.")):
            if source.get(key):
                name = prefix or label
                lines.append(f"  {name:<18s}" + "".join(f"{source[key].get(d, float('nan')):>7.2f}" for d in distances))
    lines.append(f"  chance            {result['chance']:.3f}   dialogues: {result['n_dialogues']}")
    lines += ["-" * 78, f"Scripted chat (fact at turn {probe['turn'] - probe['distance'] + 1}, asked at turn "
              f"{probe['turn'] + 1}, expected '{probe['expected']}'):"]  # fmt: skip
    for i, (query, answer) in enumerate(transcript, 1):
        lines.append(f"  [{i}] user: {query}")
        lines.append(f"      rxt:  {answer}")
    if mrl_result is not None:
        paired = mrl_result["paired"]

        def change(key):
            c = paired[key]
            if c["mean"] is None:
                return "n/a (no dialogue has a probe there)"
            return f"{c['mean']:+.3f} (95 % CI {c['ci95'][0]:+.3f} … {c['ci95'][1]:+.3f}, {c['n']} dialogues)"

        lines += ["-" * 78, f"MRL, the same {paired['n_dialogues']} test dialogues before and after (answers generated, "
                  "memory written with them):",
                  f"  reward {paired['reward_before']:.4f} -> {paired['reward_after']:.4f} (ceiling "
                  f"{paired['reward_ceiling']:.4f}: every value recalled, the reference's template matched half the "
                  "time)",
                  f"  recall d = 2..8 {change('recall_d2_8_change')}   d = 1 {change('recall_d1_change')}",
                  "  recall by distance, before -> after:"]  # fmt: skip
        for d in sorted(paired["recall_after"], key=int):
            lines.append(f"  d={d}: {paired['recall_before'].get(d, float('nan')):.2f} -> "
                         f"{paired['recall_after'][d]:.2f}")  # fmt: skip
        lines.append(f"  MRL model: {options.mrl_output_dir}/model/   evidence: {options.mrl_output_dir}/eval.json")
    lines += ["-" * 78, f"model: {model_dir}/   evaluation: {out / 'memory_eval.json'} (+ .png)", "=" * 78]
    print("\n".join(lines))
    summary = {"preset": preset_path.stem, "seconds": total, "timings": timings, "stages": stage_results,
               "baseline": baseline, "evaluation_attn_implementation": result["attn_implementation"],
               "recall": result["recall"], "recall_memory_reset": result["recall_memory_reset"],
               "recall_stateless": result.get("recall_stateless", {}), "chance": result["chance"],
               "paraphrase": {k: paraphrase[k] for k in ("recall", "recall_memory_reset", "recall_stateless", "ci95")
                              if k in paraphrase},
               "chat": transcript, "probe": probe, "mrl": mrl_result}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
