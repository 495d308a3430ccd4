#!/usr/bin/env python
"""Sparse Query Attention (SQA) vs MHA / GQA / MQA on long sequences.

Same width D, head dim hd = D/H (H = 16), six head layouts `(Hq, Hkv)` of one attention module
(`modeling_rxt.modeling_rxt.RxTSelfAttention`, SDPA backend, causal self-attention with RoPE on q and k, as in the
decoder prefill and in training):

| name | type | Hq | Hkv |          | name  | type | Hq | Hkv |
|------|------|----|-----|----------|-------|------|----|-----|
| MHA  | mha  | 16 | 16  |          | SQA   | sqa  | 8  | 4   |
| GQA  | gqa  | 16 | 4   |          | sSQA  | sqa  | 8  | 8   |
| MQA  | mqa  | 16 | 1   |          | xSQA  | sqa  | 4  | 4   |

Timed at 1k ... 16k tokens (batch 1):
- **layer**: the attention layer alone (projections + RoPE + attention core + output projection), forward; and one
  training step (forward + backward of `out.square().mean()`);
- **model**: a small RxT decoder (`RxTForCausalLM`, 2 layers, the self-attention layout varied, memory
  cross-attention fixed sSQA 8/8 over 64 STM slots, SwiGLU FF, vocabulary 1024), forward (all logits) and one
  training step (LM loss forward + backward).
The training steps stop at shorter lengths than the forward passes (`--train-max-len` 4k for the layer,
`--model-train-max-len` 2k for the model): on one CPU core a 16k MHA training step of the model takes about half a
minute per repeat.

Next to each measured speed-up vs MHA the theoretical ratios are given: `H/Hq` for the score and value products
(the part SQA shrinks), and the whole layer's FLOPs ratio (projections + causal core).

Writes `runs/bench/sqa.json` and `.png`.

    python scripts/bench_sqa.py           # 1k..16k tokens, D=256, H=16 (several minutes)
    python scripts/bench_sqa.py --quick   # 128/256 tokens, D=128 (seconds)
"""

from __future__ import annotations

import time

import bench_common as bc
import torch

SUMMARY_KEYS = ("xsqa_speedup_vs_mha_16k", "sqa_speedup_vs_gqa_16k")


def variants(heads: int) -> dict[str, dict]:
    """name -> decoder fields and resolved (Hq, Hkv)."""
    return {
        "MHA": dict(fields=dict(self_att_type="mha", att_groups=heads, att_query_groups=None), hq=heads, hkv=heads),
        "GQA": dict(fields=dict(self_att_type="gqa", att_groups=heads // 4, att_query_groups=None), hq=heads,
                    hkv=heads // 4),
        "MQA": dict(fields=dict(self_att_type="mqa", att_groups=1, att_query_groups=None), hq=heads, hkv=1),
        "SQA": dict(fields=dict(self_att_type="sqa", att_groups=heads // 4, att_query_groups=heads // 2),
                    hq=heads // 2, hkv=heads // 4),
        "sSQA": dict(fields=dict(self_att_type="sqa", att_groups=heads // 2, att_query_groups=heads // 2),
                     hq=heads // 2, hkv=heads // 2),
        "xSQA": dict(fields=dict(self_att_type="sqa", att_groups=heads // 4, att_query_groups=heads // 4),
                     hq=heads // 4, hkv=heads // 4),
    }  # fmt: skip


def layer_flops(tokens: int, dim: int, hd: int, hq: int, hkv: int, causal: bool = True) -> dict:
    """Forward FLOPs (2 per multiply-add) of one attention layer: projections and the score+value core."""
    hout = max(hq, hkv)
    proj = 2 * tokens * dim * (hq + 2 * hkv) * hd + 2 * tokens * hout * hd * dim
    core = 2 * 2 * tokens * tokens * hout * hd * (0.5 if causal else 1.0)
    return {"projections": proj, "core": core, "total": proj + core}


def repeats_for(tokens: int, base: int) -> int:
    if tokens <= 2048:
        return base
    if tokens <= 8192:
        return max(2, min(base, 3))
    return 2


def main(argv=None) -> dict:
    ap = bc.base_parser("sqa", __doc__)
    ap.add_argument("--lengths", type=int, nargs="*", default=None, help="tokens (default 1k..16k; quick 128 256)")
    ap.add_argument("--train-max-len", type=int, default=None,
                    help="longest training step of the layer (default 4096; quick all)")
    ap.add_argument("--model-train-max-len", type=int, default=None,
                    help="longest training step of the model (default 2048; quick all)")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--global-warmup", type=int, default=2, help="extra warm-up calls at the first (shortest) length")
    args = ap.parse_args(argv)

    from modeling_rxt import RxTForCausalLM

    quick = args.quick
    threads = bc.pin_threads(args.threads)
    if quick:
        dim, heads, layers, ff, vocab = 128, 16, 1, 256, 256
        lengths = args.lengths or [128, 256]
        train_max = args.train_max_len or max(lengths)
        model_train_max = args.model_train_max_len or max(lengths)
        base_repeats = args.repeats or 2
    else:
        dim, heads, layers, ff, vocab = 256, 16, 2, 768, 1024
        lengths = args.lengths or [1024, 2048, 4096, 8192, 16384]
        train_max = args.train_max_len or 4096
        model_train_max = args.model_train_max_len or 2048
        base_repeats = args.repeats or 5
    lengths = sorted(set(lengths))
    hd = dim // heads
    headline = 16384 if 16384 in lengths else max(lengths)
    machine = bc.machine_info(threads)
    specs = variants(heads)
    torch.manual_seed(args.seed)
    models = {}
    for name, spec in specs.items():
        config = bc.rxt_config(embed_dim=dim, num_layers=layers, att_heads=heads, query_heads=heads // 2,
                               kv_heads=heads // 2, ff_dim=ff, vocab_size=vocab, stm_size=64,
                               seq_len=max(lengths) + 1, decoder=spec["fields"])  # fmt: skip
        model = RxTForCausalLM(config).eval()
        assert model.config.decoder_config.self_attention_heads == (spec["hq"], spec["hkv"]), name
        models[name] = model
    gen = torch.Generator().manual_seed(args.seed)
    results = []
    t_start = time.perf_counter()
    names = list(specs)
    for tokens in lengths:
        repeats = repeats_for(tokens, base_repeats)
        warmup = args.warmup if tokens <= 4096 else 0  # a call is seconds long; the process is warm by then
        if tokens == lengths[0]:
            warmup += args.global_warmup  # first point: also warm up the process (allocator, autograd)
        x = torch.randn(1, tokens, dim, generator=gen)
        ids = bc.random_tokens(gen, (1, tokens), vocab)
        position_ids = torch.arange(tokens).unsqueeze(0)
        row = {"tokens": tokens, "repeats": repeats, "warmup": warmup, "variants": {}}

        def layer_fwd(model, x=x, position_ids=position_ids):
            decoder = model.model.decoder
            attention = decoder.layers[0].attention
            pe = decoder.rotary(position_ids, x.dtype)

            def run():
                with torch.inference_mode():
                    attention(x, pe, None, None)

            return run

        def layer_train(model, x=x, position_ids=position_ids):
            decoder = model.model.decoder
            attention = decoder.layers[0].attention
            xr = x.clone().requires_grad_(True)

            def run():
                attention.train()
                pe = decoder.rotary(position_ids, x.dtype)
                attention(xr, pe, None, None)[0].square().mean().backward()
                attention.zero_grad(set_to_none=True)
                xr.grad = None
                attention.eval()

            return run

        def model_fwd(model, ids=ids):
            stm = model.initial_stm(1)

            def run():
                with torch.inference_mode():
                    model(input_ids=ids, stm=stm, use_cache=False)

            return run

        def model_train(model, ids=ids):
            stm = model.initial_stm(1)

            def run():
                model.train()
                model(input_ids=ids, labels=ids, stm=stm, use_cache=False).loss.backward()
                model.zero_grad(set_to_none=True)
                model.eval()

            return run

        for kind, factory, limit in (
            ("layer_forward", layer_fwd, max(lengths)),
            ("layer_train_step", layer_train, train_max),
            ("model_forward", model_fwd, 0 if args.skip_model else max(lengths)),
            ("model_train_step", model_train, 0 if args.skip_model else model_train_max),
        ):
            if tokens > limit:
                continue
            times = bc.timeit_interleaved([factory(models[n]) for n in names], repeats, warmup)
            for name, ts in zip(names, times, strict=True):
                row["variants"].setdefault(name, {})[kind] = bc.spread(ts)
            mha = row["variants"]["MHA"][kind]["median_ms"]
            line = "  ".join(f"{n} {row['variants'][n][kind]['median_ms']:9.1f}" for n in names)
            xsqa = mha / row["variants"]["xSQA"][kind]["median_ms"]
            print(f"{tokens:6d} tok {kind:17s} ms: {line}  (xSQA x{xsqa:.2f})",
                  flush=True)
        for name in names:
            spec = specs[name]
            flops = layer_flops(tokens, dim, hd, spec["hq"], spec["hkv"])
            mha_flops = layer_flops(tokens, dim, hd, heads, heads)
            entry = row["variants"][name]
            entry.update({
                "hq": spec["hq"],
                "hkv": spec["hkv"],
                "theory_core_speedup_vs_mha": heads / max(spec["hq"], spec["hkv"]),
                "theory_layer_speedup_vs_mha": mha_flops["total"] / flops["total"],
                "layer_forward_gflop": flops["total"] / 1e9,
            })
            for kind in ("layer_forward", "layer_train_step", "model_forward", "model_train_step"):
                if kind in entry:
                    entry[f"{kind}_speedup_vs_mha"] = (
                        row["variants"]["MHA"][kind]["median_ms"] / entry[kind]["median_ms"]
                    )
            if "layer_forward" in entry:
                entry["layer_forward_gflops_per_s"] = flops["total"] / (entry["layer_forward"]["median_ms"] / 1e3) / 1e9
        results.append(row)
    elapsed = time.perf_counter() - t_start

    head = next(r for r in results if r["tokens"] == headline)["variants"]
    kind = "model_forward" if "model_forward" in head["MHA"] else "layer_forward"

    def speedup(a, b, k=kind):
        return head[b][k]["median_ms"] / head[a][k]["median_ms"]

    summary = {
        "xsqa_speedup_vs_mha_16k": speedup("xSQA", "MHA"),
        "sqa_speedup_vs_gqa_16k": speedup("SQA", "GQA"),
        "headline_tokens": headline,
        "headline_measure": kind,
        "xsqa_speedup_vs_mha_16k_layer": speedup("xSQA", "MHA", "layer_forward"),
        "sqa_speedup_vs_gqa_16k_layer": speedup("SQA", "GQA", "layer_forward"),
        "ssqa_speedup_vs_mha_16k": speedup("sSQA", "MHA"),
        "speedup_vs_mha_16k": {n: speedup(n, "MHA") for n in names},
        "theory_core_speedup_vs_mha": {n: head[n]["theory_core_speedup_vs_mha"] for n in names},
        "theory_layer_speedup_vs_mha_16k": {n: head[n]["theory_layer_speedup_vs_mha"] for n in names},
        "target": {"xsqa_speedup_vs_mha_16k": ">= 2.5"},
        "meets_target": {"xsqa_speedup_vs_mha_16k": speedup("xSQA", "MHA") >= 2.5},
    }
    config = {
        "quick": bool(quick),
        "threads": threads,
        "repeats": {str(t): repeats_for(t, base_repeats) for t in lengths},
        "warmup_per_point": f"{args.warmup} for <= 4096 tokens, else 0 (process already warm; a call takes seconds); "
        f"+{args.global_warmup} at the first length",
        "seed": args.seed,
        "dtype": "float32",
        "batch": 1,
        "lengths": lengths,
        "embed_dim": dim,
        "att_heads_H": heads,
        "head_dim": hd,
        "variants": {n: {"hq": s["hq"], "hkv": s["hkv"], **s["fields"]} for n, s in specs.items()},
        "attention": "RxTSelfAttention, causal, RoPE q/k, SDPA backend (attn_implementation=sdpa)",
        "layer_train_max_len": train_max,
        "model": None if args.skip_model else {
            "class": "RxTForCausalLM (decoder path)", "num_layers": layers, "ff_dim": ff, "vocab_size": vocab,
            "stm_size": 64, "cross_attention": f"sSQA {heads // 2}/{heads // 2} (fixed)",
            "train_max_len": model_train_max,
        },
        "training_step": "forward + backward (layer: mean square of the output; model: LM loss), grads zeroed",
        "summary_measure": f"{kind} at {headline} tokens" + (" (quick: largest length)" if headline != 16384 else ""),
        "elapsed_s": elapsed,
    }

    def plot(png):
        import matplotlib.pyplot as plt

        kinds = [k for k in ("layer_forward", "layer_train_step", "model_forward", "model_train_step")
                 if any(k in r["variants"]["MHA"] for r in results)]  # fmt: skip
        fig, axes = plt.subplots(1, len(kinds) + 1, figsize=(4.2 * (len(kinds) + 1), 4))
        for ax, k in zip(axes, kinds, strict=False):
            rows = [r for r in results if k in r["variants"]["MHA"]]
            for n in names:
                bc.errorbar(ax, [r["tokens"] for r in rows], [r["variants"][n][k] for r in rows], n)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens")
            ax.set_ylabel("ms (median, IQR bars)")
            ax.set_title(k.replace("_", " "), fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        ax = axes[-1]
        xs = range(len(names))
        ax.bar([i - 0.2 for i in xs], [summary["speedup_vs_mha_16k"][n] for n in names], 0.4,
               label=f"measured ({kind})")  # fmt: skip
        ax.bar([i + 0.2 for i in xs], [summary["theory_layer_speedup_vs_mha_16k"][n] for n in names], 0.4,
               label="theory, layer FLOPs")  # fmt: skip
        ax.plot(list(xs), [summary["theory_core_speedup_vs_mha"][n] for n in names], "k_", markersize=20,
                label="theory, H/Hq (core)")  # fmt: skip
        ax.set_xticks(list(xs), names)
        ax.set_ylabel(f"speed-up vs MHA at {headline} tokens")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
        fig.suptitle(f"SQA vs MHA/GQA/MQA: D={dim}, H={heads}, hd={hd}, causal, {threads} thread(s)", fontsize=10)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)

    out = bc.write_outputs(args.output, machine, config, results, summary, plot, SUMMARY_KEYS)
    return out


if __name__ == "__main__":
    main()
