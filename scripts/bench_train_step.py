#!/usr/bin/env python
"""Training-step time of a preset's SMAT phases by attention kernel: `eager` against `sdpa` (transformers' default).

The preset's model, tokenizer settings and episode sets (`--preset`, default `quickstart`: D = 128, 2 layers per
component, 32 STM slots; fact → question pairs for phase A, 4-turn distance-1 episodes for phases B and D, 3–6-turn
`short4` episodes for phase C), its batch size, turn length limit and whole-episode backpropagation. One timed call = one optimizer step (the SMAT
loss of a batch, backward, AdamW step, `zero_grad`), each kernel on its own copy of the same initial model and the
same batches in the same order; the kernels are timed in alternation (median and quartiles over `--repeats`).

`step_speedup_eager_vs_sdpa` (summary, per episode set) = sdpa median ÷ eager median;
`smat_speedup_eager_vs_sdpa` = the SMAT phases' time with sdpa ÷ with eager, each episode set's median step time
weighted by its step count in the preset (`quickstart`: 1500 / 800 + 200 / 1400).

Writes `runs/bench/train_step.json` and `.png`.

    python scripts/bench_train_step.py --threads 2      # the quickstart's setting (a few minutes)
    python scripts/bench_train_step.py --threads 2 --preset quickstart_diverse
    python scripts/bench_train_step.py --quick          # seconds
"""

from __future__ import annotations

import copy
from pathlib import Path

import bench_common as bc

SUMMARY_KEYS = ("step_speedup_eager_vs_sdpa", "smat_speedup_eager_vs_sdpa")
KERNELS = ("eager", "sdpa")


def episode_sets(stages: list[dict], preset: dict, count: int, seed: int) -> dict[str, list[dict]]:
    """The SMAT stages' episode sets as the quickstart writes them, `count` episodes each:
    `{"dialogues_fact_question": rows, ...}`."""
    from quickstart import episode_set

    names = {stage["data"] for stage in stages}
    return {name: episode_set({**preset["extra_dialogues"][name.removeprefix("dialogues_")], "num_train": count}, seed)
            for name in sorted(names)}  # fmt: skip


def main(argv=None) -> dict:
    ap = bc.base_parser("train_step", __doc__)
    ap.add_argument("--preset", default="quickstart", help="preset name in scripts/presets or a JSON file")
    args = ap.parse_args(argv)
    threads, machine = bc.start(args)
    repeats = args.repeats or (2 if args.quick else 20)

    from quickstart import load_preset

    from modeling_rxt import RxTConfig, RxTForCausalLM
    from modeling_rxt.tokenization_rxt import train_rxt_tokenizer
    from trainers.data import EpisodeCollator
    from trainers.smat import SMATConfig, SupervisedMemoryAwareTrainer
    from trainers.synthetic import generate_pretrain

    preset_path, preset = load_preset(args.preset)
    stages = [stage for stage in preset["stages"] if stage["stage"] == "smat" and "data" in stage]
    if not stages:
        raise SystemExit(f"--preset {args.preset}: no SMAT stage with an episode set ('data'); expected a preset such "
                         "as quickstart.")  # fmt: skip
    batch = stages[0]["args"].get("per_device_train_batch_size", 16)
    max_length = stages[0]["args"]["max_length"]
    style = preset["data"].get("style", "basic")
    texts = [row["text"] for row in generate_pretrain(preset["data"]["num_pretrain"], seed=args.seed, style=style)]
    tokenizer = train_rxt_tokenizer(texts, **preset["tokenizer"])  # the quickstart's tokenizer at the same seed
    fields = copy.deepcopy(preset["model"])
    for name in ("decoder_config", "encoder_config"):
        fields[name]["vocab_size"] = len(tokenizer)
    initial = RxTForCausalLM(RxTConfig(**fields)).state_dict()
    data = episode_sets(stages, preset, (args.warmup + repeats) * batch, args.seed)

    def stepper(kernel: str, rows: list[dict], max_turns: int | None):
        model = RxTForCausalLM(RxTConfig(**fields, attn_implementation=kernel))  # as the stage scripts build it
        model.load_state_dict(initial)
        model.train()
        settings = SMATConfig(output_dir="/tmp", report_to="none", use_cpu=True, learning_rate=1e-3, bptt_turns=0,
                              max_length=max_length, per_device_train_batch_size=batch)  # fmt: skip
        collator = EpisodeCollator(tokenizer, max_length=max_length, label_mode="reference", max_turns=max_turns)
        trainer = SupervisedMemoryAwareTrainer(model=model, args=settings, data_collator=collator)
        optimizer = trainer.create_optimizer()
        batches = [collator(rows[i : i + batch]) for i in range(0, len(rows), batch)]
        position = iter(range(len(batches)))

        def step() -> None:
            trainer.compute_loss(model, batches[next(position)]).backward()
            optimizer.step()
            optimizer.zero_grad()

        return step

    results, medians = [], {}
    phase_steps: dict[str, int] = {}
    for stage in stages:
        phase_steps[stage["data"]] = phase_steps.get(stage["data"], 0) + stage["args"]["max_steps"]
    for name, rows in data.items():
        max_turns = next(s["args"].get("episode_max_turns") for s in stages if s["data"] == name)
        times = bc.timeit_interleaved([stepper(kernel, rows, max_turns) for kernel in KERNELS], repeats, args.warmup)
        row = {"episodes": name, "turns_per_episode": max_turns or "all", "preset_steps": phase_steps[name]}
        row.update({kernel: bc.spread(t) for kernel, t in zip(KERNELS, times, strict=True)})
        medians[name] = {kernel: row[kernel]["median_ms"] for kernel in KERNELS}
        results.append(row)

    seconds = {kernel: sum(phase_steps[n] * m[kernel] for n, m in medians.items()) / 1e3 for kernel in KERNELS}
    summary = {
        "step_speedup_eager_vs_sdpa": {name: m["sdpa"] / m["eager"] for name, m in medians.items()},
        "smat_speedup_eager_vs_sdpa": seconds["sdpa"] / seconds["eager"],
        "smat_seconds_estimate": seconds,
    }

    def plot(png: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        width = 0.38
        for offset, kernel in enumerate(KERNELS):
            xs = [i + (offset - 0.5) * width for i in range(len(results))]
            ax.bar(xs, [r[kernel]["median_ms"] for r in results], width,
                   yerr=[[r[kernel]["median_ms"] - r[kernel]["q1_ms"] for r in results],
                         [r[kernel]["q3_ms"] - r[kernel]["median_ms"] for r in results]], capsize=3, label=kernel)  # fmt: skip
        ax.set_xticks(range(len(results)), [r["episodes"].removeprefix("dialogues_") for r in results])
        ax.set_ylabel("ms per optimizer step (median, quartiles)")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        bc.save_figure(fig, png, f"SMAT step by attention kernel ({machine['cpu_model']}, {threads} threads)")

    config = bc.run_config(args, threads, repeats, batch=batch, preset=preset_path.stem, kernels=list(KERNELS),
                           max_length=max_length)  # fmt: skip
    return bc.write_outputs(args.output, machine, config, results, summary, plot, required=SUMMARY_KEYS)


if __name__ == "__main__":
    main()
