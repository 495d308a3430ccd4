#!/usr/bin/env python
"""Benchmark TensorBLEU (trainers/tensorbleu.py) against a per-sentence NLTK ``sentence_bleu`` loop.

Both sides score the same batch of token-id sequences (candidates = references with a fraction of tokens
replaced, so every n-gram order has matches). TensorBLEU is timed from the id tensors to the score tensor;
the NLTK side is timed from the same tensors, including the ``.tolist()`` conversion a training loop would need.
Each measurement is preceded by warm-up calls; the two implementations are timed in alternation (so both see
the same background load on a shared machine) and the median and spread (min, max, IQR) over ``--repeats`` runs
are reported, with the load average before and after. torch's intra-op threads are pinned with
``torch.set_num_threads(--threads)`` (default 1, like the single-threaded NLTK loop) and recorded.

Writes JSON (``--output``, default ``runs/bench/tensorbleu.json``) and a PNG next to it (same stem) with time
per batch vs batch size for both implementations (log scale).

    python scripts/bench_tensorbleu.py                 # full sweep, batch sizes 16..512 x 256 tokens
    python scripts/bench_tensorbleu.py --quick         # seconds; for smoke tests
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # puts the repository root on sys.path
import torch

from trainers.tensorbleu import NLTK_SMOOTHING_METHOD, tensor_sentence_bleu


def _machine_info(threads: int, device: str) -> dict:
    import nltk

    return bc.machine_info(threads, device, nltk_version=nltk.__version__)


def make_batch(batch: int, length: int, vocab: int, noise: float, refs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randint(1, vocab, (batch, refs, length), generator=g)
    cand = ref[:, 0].clone()
    replace = torch.rand(batch, length, generator=g) < noise
    cand[replace] = torch.randint(1, vocab, (int(replace.sum()),), generator=g)
    return cand, (ref[:, 0] if refs == 1 else ref)


def main(argv=None) -> dict:
    ap = bc.base_parser("tensorbleu", __doc__)  # --quick: batch 4/8, length 32, 2 repeats
    ap.set_defaults(warmup=2)
    ap.add_argument("--batch", type=int, default=64, help="headline batch size (always part of the sweep)")
    ap.add_argument("--length", type=int, default=256, help="tokens per sequence")
    ap.add_argument(
        "--batch-sizes", type=int, nargs="*", default=None, help="sweep (default 16 32 64 128 256 512; quick: 4 8)"
    )
    ap.add_argument("--max-n", type=int, default=4)
    ap.add_argument("--smoothing", default="floor", choices=sorted(NLTK_SMOOTHING_METHOD))
    ap.add_argument("--refs", type=int, default=1, help="references per sample")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--noise", type=float, default=0.3, help="fraction of candidate tokens replaced")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--no-unfold", action="store_true", help="skip timing the unfold/unique(dim=0) backend at the headline batch"
    )
    args = ap.parse_args(argv)

    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if args.quick:
        length = min(args.length, 32)
        sizes = args.batch_sizes or [4, 8]
        headline = args.batch if args.batch in sizes else sizes[-1]
        repeats = args.repeats or 2
    else:
        length = args.length
        sizes = args.batch_sizes or [16, 32, 64, 128, 256, 512]
        headline = args.batch
        repeats = args.repeats or 15
    sizes = sorted(set(sizes) | {headline})
    threads = bc.pin_threads(args.threads)  # 1 by default, like the single-threaded NLTK loop
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    smoothing_fn = getattr(SmoothingFunction(), NLTK_SMOOTHING_METHOD[args.smoothing])
    weights = tuple([1.0 / args.max_n] * args.max_n)

    def tb(cand, ref, backend="rolling"):
        return tensor_sentence_bleu(
            cand, ref, max_n=args.max_n, smoothing=args.smoothing, backend=backend, dtype=torch.float64
        )

    def nltk_loop(cand, ref):
        c = cand.tolist()
        r = ref.tolist()
        if ref.dim() == 2:
            r = [[x] for x in r]
        return [sentence_bleu(r[i], c[i], weights, smoothing_function=smoothing_fn) for i in range(len(c))]

    results = []
    unfold = None
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK method0 warns per sentence
        for bs in sizes:
            cand, ref = make_batch(bs, length, args.vocab, args.noise, args.refs, args.seed + bs)
            cand_d, ref_d = cand.to(device), ref.to(device)
            t_tb, t_nl = bc.timeit_interleaved(
                [lambda c=cand_d, r=ref_d: tb(c, r), lambda c=cand, r=ref: nltk_loop(c, r)], repeats, args.warmup, sync
            )
            ours = tb(cand_d, ref_d).cpu()
            oracle = torch.tensor(nltk_loop(cand, ref), dtype=torch.float64)
            row = {
                "batch": bs,
                "length": length,
                "tensorbleu": bc.spread(t_tb),
                "nltk": bc.spread(t_nl),
                "speedup": statistics.median(t_nl) / statistics.median(t_tb),
                "max_abs_diff_vs_nltk": float((ours - oracle).abs().max()),
                "mean_bleu": float(oracle.mean()),
            }
            results.append(row)
            print(
                f"batch {bs:4d} x {length}: tensorbleu {row['tensorbleu']['median_ms']:8.2f} ms  "
                f"nltk {row['nltk']['median_ms']:9.2f} ms  speedup {row['speedup']:6.1f}x  "
                f"max|diff| {row['max_abs_diff_vs_nltk']:.1e}",
                flush=True,
            )
            if bs == headline and not args.no_unfold:
                t_un = bc.timeit(lambda c=cand_d, r=ref_d: tb(c, r, "unfold"), max(2, repeats // 3), 1, sync)
                unfold = bc.spread(t_un)

    head = next(r for r in results if r["batch"] == headline)
    summary = {
        "tensorbleu_speedup_vs_nltk": head["speedup"],
        "headline_batch": headline,
        "headline_length": length,
        "tensorbleu_median_ms": head["tensorbleu"]["median_ms"],
        "nltk_median_ms": head["nltk"]["median_ms"],
        "max_abs_diff_vs_nltk": max(r["max_abs_diff_vs_nltk"] for r in results),
        "target_speedup": 10.0,
        "meets_target": bool(head["speedup"] >= 10.0),
        "min_speedup": min(r["speedup"] for r in results),
        "max_speedup": max(r["speedup"] for r in results),
    }
    if unfold is not None:
        summary["unfold_backend_median_ms"] = unfold["median_ms"]
        summary["unfold_backend_speedup_vs_nltk"] = head["nltk"]["median_ms"] / unfold["median_ms"]
    machine = _machine_info(threads, str(device))
    if load_before is not None:
        machine["loadavg_1min_before"] = load_before[0]
        machine["loadavg_1min_after"] = os.getloadavg()[0]
    config = {
        "quick": bool(args.quick),
        "batch": headline,
        "length": length,
        "batch_sizes": sizes,
        "repeats": repeats,
        "warmup": args.warmup,
        "threads": threads,
        "max_n": args.max_n,
        "smoothing": args.smoothing,
        "nltk_smoothing": NLTK_SMOOTHING_METHOD[args.smoothing],
        "refs": args.refs,
        "vocab": args.vocab,
        "noise": args.noise,
        "seed": args.seed,
        "backend": "rolling",
        "nltk_timing_includes_tolist": True,
        "timing": "interleaved (tensorbleu, nltk) pairs, time.perf_counter wall clock",
    }

    def plot(png):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["batch"] for r in results]
        for key, label in (("tensorbleu", "TensorBLEU (torch)"), ("nltk", "NLTK sentence_bleu loop")):
            med = [r[key]["median_ms"] for r in results]
            lo = [r[key]["median_ms"] - r[key]["min_ms"] for r in results]
            hi = [r[key]["max_ms"] - r[key]["median_ms"] for r in results]
            ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=label)
        title = (f"BLEU-{args.max_n}, {length} tokens, {threads} torch thread(s), {args.device}\n"
                 f"speed-up at batch {headline}: {head['speedup']:.1f}x")  # fmt: skip
        bc.log_axes(ax, "batch size (sequences)", "time per batch (ms, median; bars min-max)", xbase=2, title=title,
                    legend={})  # fmt: skip
        bc.save_figure(fig, png, dpi=120)

    out = bc.write_outputs(args.output, machine, config, results, summary, plot, ("tensorbleu_speedup_vs_nltk",))
    path = Path(args.output)
    print(f"speed-up at batch {headline} x {length}: {head['speedup']:.1f}x  -> {path}")
    if not all(math.isfinite(r["speedup"]) for r in results):  # pragma: no cover
        raise SystemExit("non-finite timing")
    return out


if __name__ == "__main__":
    main()
