#!/usr/bin/env python
"""Memory-update cost (`RxTForCausalLM.update_memory`: memory encoder + memory-attention network) vs the number of
STM slots and the interaction length, for every memory-attention variant.

Variants: `simple`, `self`, `interlayer`, `self-interlayer`, `grouped-self-interlayer` (2 groups). Same dims for all
(D=256, 4 layers, H=16, sSQA 8/8 everywhere, SwiGLU 768); batch 1, fp32. Two sweeps:
- slots S in 64 ... 1024 at a 256-token interaction;
- interaction length T in 64 ... 1024 at S = 512.
At each point the variants are timed in alternation (warm-up, median and quartiles over `--repeats`). The
encoder alone (`mode="encode"`, the same for all variants) and the memory-attention network alone
(`mode="memory_update"` with precomputed `encoder_hidden_states`) are also timed, so the total splits into both parts.

`update_ms_per_1k_tokens` (summary, per variant) = median update time at the longest interaction and S = 512,
scaled to 1000 tokens; the least-squares slope over the length sweep (ms per 1000 extra tokens) is reported beside it.

Writes `runs/bench/memory_update.json` and `.png`.

    python scripts/bench_memory_update.py           # full sweeps (a few minutes)
    python scripts/bench_memory_update.py --quick   # tiny model (seconds)
"""

from __future__ import annotations

import time

import bench_common as bc
import torch

SUMMARY_KEYS = ("update_ms_per_1k_tokens",)
VARIANTS = ("simple", "self", "interlayer", "self-interlayer", "grouped-self-interlayer")


def _slope(xs, ys) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


def main(argv=None) -> dict:
    ap = bc.base_parser("memory_update", __doc__)
    ap.add_argument("--slots", type=int, nargs="*", default=None, help="STM slots sweep (64..1024; quick 16 32)")
    ap.add_argument("--lengths", type=int, nargs="*", default=None, help="interaction lengths (64..1024; quick 32 64)")
    ap.add_argument("--base-slots", type=int, default=None, help="slots of the length sweep (512; quick 32)")
    ap.add_argument("--base-length", type=int, default=None, help="length of the slots sweep (256; quick 32)")
    args = ap.parse_args(argv)

    from modeling_rxt import RxTForCausalLM

    quick = args.quick
    threads, machine = bc.start(args)
    if quick:
        dims = dict(embed_dim=64, num_layers=2, att_heads=4, query_heads=2, kv_heads=2, ff_dim=192, vocab_size=256)
        slots, lengths, base_slots, base_length, repeats = [16, 32], [32, 64], 32, 32, 2
    else:
        dims = dict(embed_dim=256, num_layers=4, att_heads=16, query_heads=8, kv_heads=8, ff_dim=768, vocab_size=1024)
        slots, lengths, base_slots, base_length, repeats = (
            [64, 128, 256, 512, 1024],
            [64, 128, 256, 512, 1024],
            512,
            256,
            5,
        )
    slots = sorted(set(args.slots or slots))
    lengths = sorted(set(args.lengths or lengths))
    base_slots = args.base_slots or base_slots
    base_length = args.base_length or base_length
    repeats = args.repeats or repeats
    gen = torch.Generator().manual_seed(args.seed)
    seq_len = max(1024, max(lengths + [base_length]) + 8)
    groups = 2 if dims["num_layers"] % 2 == 0 else 1

    def build(variant: str, stm_size: int):
        torch.manual_seed(args.seed)
        config = bc.rxt_config(**dims, stm_size=stm_size, seq_len=seq_len, variant=variant,
                               num_groups=groups if variant == "grouped-self-interlayer" else 1)  # fmt: skip
        return RxTForCausalLM(config).eval()

    points = [("slots", s, base_length) for s in slots] + [("length", base_slots, t) for t in lengths]
    results = []
    t_start = time.perf_counter()
    models_by_slots: dict[int, dict] = {}
    with torch.inference_mode():
        for sweep, stm_size, length in points:
            if stm_size not in models_by_slots:
                models_by_slots.clear()  # keep only one slot count's models alive
                models_by_slots[stm_size] = {v: build(v, stm_size) for v in VARIANTS}
            models = models_by_slots[stm_size]
            ids = bc.random_tokens(gen, (1, length), dims["vocab_size"])
            ids[:, 0] = models["simple"].config.bos_token_id
            stms = {v: m.initial_stm(1) for v, m in models.items()}
            reference = models["simple"]
            encoded = reference.encode(ids)

            fns = [lambda m=models[v], s=stms[v], ids=ids: m.update_memory(ids, None, s) for v in VARIANTS]
            fns.append(lambda reference=reference, ids=ids: reference.encode(ids))
            fns += [lambda m=models[v], s=stms[v], e=encoded: m(mode="memory_update", encoder_hidden_states=e, stm=s)
                    for v in VARIANTS]  # fmt: skip
            times = bc.timeit_interleaved(fns, repeats, args.warmup)
            row = {"sweep": sweep, "stm_slots": stm_size, "interaction_tokens": length,
                   "encoder_only": bc.spread(times[len(VARIANTS)]), "variants": {}}  # fmt: skip
            for i, v in enumerate(VARIANTS):
                row["variants"][v] = {
                    "update": bc.spread(times[i]),
                    "memory_attention_only": bc.spread(times[len(VARIANTS) + 1 + i]),
                }
            results.append(row)
            print(
                f"{sweep:6s} S={stm_size:5d} T={length:5d}  update ms: "
                + "  ".join(f"{v} {row['variants'][v]['update']['median_ms']:7.1f}" for v in VARIANTS)
                + f"  | encoder {row['encoder_only']['median_ms']:.1f}",
                flush=True,
            )
    elapsed = time.perf_counter() - t_start

    length_rows = [r for r in results if r["sweep"] == "length"]
    longest = max(length_rows, key=lambda r: r["interaction_tokens"])
    per_1k = {
        v: longest["variants"][v]["update"]["median_ms"] * 1000 / longest["interaction_tokens"] for v in VARIANTS
    }
    lengths_done = [r["interaction_tokens"] for r in length_rows]
    slope = {v: 1000 * _slope(lengths_done, [r["variants"][v]["update"]["median_ms"] for r in length_rows])
             for v in VARIANTS}  # fmt: skip
    slot_rows = [r for r in results if r["sweep"] == "slots"]
    summary = {
        "update_ms_per_1k_tokens": per_1k,
        "update_ms_per_1k_tokens_slope": slope,
        "update_ms_per_1k_tokens_at": {"stm_slots": base_slots, "interaction_tokens": longest["interaction_tokens"]},
        "encoder_share_at_longest": {
            v: longest["encoder_only"]["median_ms"] / longest["variants"][v]["update"]["median_ms"] for v in VARIANTS
        },
        "update_ms_by_slots": {
            v: {str(r["stm_slots"]): r["variants"][v]["update"]["median_ms"] for r in slot_rows} for v in VARIANTS
        },
    }
    config = {
        **bc.run_config(args, threads, repeats),
        "batch": 1,
        "dims": dims,
        "grouped_num_groups": groups,
        "slots_sweep": {"stm_slots": slots, "interaction_tokens": base_length},
        "length_sweep": {"stm_slots": base_slots, "interaction_tokens": lengths},
        "memory_attention": "sSQA heads, elementwise sigmoid residual gates, classic-rms norms",
        "measure": "update_memory(ids, None, stm) wall time; also encoder alone and memory attention alone",
        "elapsed_s": elapsed,
    }

    def plot(png):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, rows, key, label in ((axes[0], slot_rows, "stm_slots", f"STM slots (T={base_length})"),
                                     (axes[1], length_rows, "interaction_tokens",
                                      f"interaction tokens (S={base_slots})")):  # fmt: skip
            xs = [r[key] for r in rows]
            for v in VARIANTS:
                bc.errorbar(ax, xs, [r["variants"][v]["update"] for r in rows], v)
            bc.errorbar(ax, xs, [r["encoder_only"] for r in rows], "encoder alone", linestyle="--", color="gray")
            bc.log_axes(ax, label, "update_memory ms (median, IQR)", xbase=2)
        title = f"memory update, D={dims['embed_dim']}, {dims['num_layers']} layers, {threads} thread(s)"
        bc.save_figure(fig, png, title)

    out = bc.write_outputs(args.output, machine, config, results, summary, plot, SUMMARY_KEYS)
    return out


if __name__ == "__main__":
    main()
