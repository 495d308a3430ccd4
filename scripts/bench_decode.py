#!/usr/bin/env python
"""Per-token decode latency: RxT vs a same-size Llama, and RxT with vs without its per-turn memory K/V cache.

Both models get the same prompt (`--prompt-lens`, random ids) and generate `--new-tokens` tokens greedily (EOS
disabled), batch 1. Measured, median and quartiles over `--repeats`, systems in alternation after warm-up:

- **generate**: stock `generate()` (RxT with `cache=RxTCache(stm)`); per-token decode latency from the
  streamer's time stamps, `(t_last_token - t_first_token) / (N - 1)` (the prefill excluded), and, as a cross-check,
  `(time(generate N) - time(generate 1)) / (N - 1)`;
- **manual loop**: `model(input_ids=token, cache=cache)` per step with argmax, for Llama, RxT (memory
  K/V projected once per turn and reused, the normal path) and RxT re-projecting the memory K/V from the STM at
  every token (`cache.memory_kv.clear()` before each step: what an implementation without the memory K/V cache does);
- **static / compiled**: the manual loop with static self-attention caches (`RxTCache(max_cache_len=...)`, Llama's
  `StaticCache`) and each model's decode step compiled with `torch.compile(fullgraph=True)` (the prefill runs
  eagerly; `--no-compile` or `--quick` time the static caches uncompiled, `--compile` compiles in `--quick` too);
  the ratio of the two per-token medians is `decode_ratio_rxt_vs_llama_static[_compiled]` (target <= 1.17);
  `--cpu-clock` times these loops with the thread's CPU time instead of the wall clock (`--threads 1` only: the time a
  shared VM deschedules the vCPU is then not counted, which narrows the spread several-fold); `--cpp-wrapper` has
  inductor generate each compiled step's wrapper in C++ instead of Python (both models);
  `--decompose` adds, in the same alternation group, RxT without the attention over the slots (the memory
  sub-layer's norm, query projection with RoPE and output projection only) and RxT without memory sub-layers (the
  same decoder blocks, stateless), so the ratio splits into what each part of the memory sub-layer costs;
- **memory K/V projection**: the once-per-turn cost (`stm_norm` + `k_proj`/`v_proj` of every memory layer);
- **breakdown**: one extra pass with the manual loop where the decoder sub-modules are timed (self-attention,
  memory cross-attention, feed-forward, norms, LM head); instrumentation adds a little time, so these numbers
  only show where the per-token time goes.

Writes `runs/bench/decode.json` and `.png`.

    python scripts/bench_decode.py            # D=256, 4 layers, 512 STM slots, prompts 64/256, 128 new tokens
    python scripts/bench_decode.py --quick    # tiny model (seconds)
    python scripts/bench_decode.py --static-only --repeats 15   # only the static / compiled comparison
    python scripts/bench_decode.py --static-only --decompose --embed-dim 512 --ff-dim 1536   # another width
    python scripts/bench_decode.py --static-only --decompose-mm   # one-row matmuls as inductor kernels (both models)
    python scripts/bench_decode.py --static-only --decompose --cpu-clock --repeats 15   # thread CPU time (less spread)
"""

from __future__ import annotations

import collections
import time

import bench_common as bc
import torch

from modeling_rxt import CACHE_KWARG

SUMMARY_KEYS = ("decode_ratio_rxt_vs_llama", "memory_kv_cache_speedup")


def _generate(model, ids, new_tokens, **kwargs) -> dict:
    streamer = bc.TimingStreamer()
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0, streamer=streamer, **kwargs)  # fmt: skip
    t1 = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + new_tokens
    s = streamer.stamps
    per_token = (s[-1] - s[1]) / (new_tokens - 1) if new_tokens > 1 else float("nan")
    return {"total_ms": (t1 - t0) * 1e3, "prefill_ms": (s[1] - t0) * 1e3, "per_token_ms": per_token * 1e3}


def _loop(model, ids, new_tokens, cache, reproject: bool = False) -> dict:
    """Greedy manual loop; returns the prefill time and the mean decode step."""
    t0 = time.perf_counter()
    out = model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        if reproject:
            cache.memory_kv.clear()
        out = model(input_ids=token, **{CACHE_KWARG: cache}, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    t2 = time.perf_counter()
    return {"prefill_ms": (t1 - t0) * 1e3, "per_token_ms": (t2 - t1) / new_tokens * 1e3}


def _static_loop(model, ids, new_tokens, cache, step, clock=time.perf_counter) -> dict:
    """Greedy manual loop on a static cache: eager prefill, then `step(token, position_ids, cache)` per token."""
    t0 = clock()
    out = model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    t1 = clock()
    for i in range(new_tokens):
        position = torch.full_like(token, ids.shape[1] + i)
        token = step(token, position, cache)[:, -1:].argmax(-1)
    t2 = clock()
    return {"prefill_ms": (t1 - t0) * 1e3, "per_token_ms": (t2 - t1) / new_tokens * 1e3}


def _decode_step(model, compiled: bool):
    """One decode step `(token [B, 1], position_ids [B, 1], cache) → logits`, compiled as one graph if asked."""

    def step(token, position, cache):
        return model(input_ids=token, position_ids=position, **{CACHE_KWARG: cache}, use_cache=True).logits

    return torch.compile(step, fullgraph=True) if compiled else step


def _decomposition_models(rxt) -> dict:
    """Copies of `rxt` for `--decompose`: without the attention over the STM slots (the memory sub-layer keeps its
    norm, query projection with RoPE, output projection and residual add), and without memory sub-layers."""
    import copy

    from modeling_rxt.modeling_rxt import RxTMemoryCrossAttention, apply_rotary

    class NoAttentionCore(RxTMemoryCrossAttention):
        def forward(self, hidden_states, memory_key_value, position_embeddings=None):
            query = self.project_query(hidden_states)  # [B, Hq, T, hd]
            if position_embeddings is not None:
                query = apply_rotary(query, *position_embeddings, self.rope_layout)
            return self.out_proj(query.transpose(1, 2).reshape(*hidden_states.shape[:2], -1)), None

    no_core, no_memory = copy.deepcopy(rxt), copy.deepcopy(rxt)
    for layer in no_core.model.decoder.layers:
        layer.memory_cross_attention.__class__ = NoAttentionCore
    for layer in no_memory.model.decoder.layers:
        layer.memory_layer_idx = None  # the block skips its memory sub-layer
    return {"rxt_without_attention_core": no_core, "rxt_without_memory_sublayer": no_memory}


def _static_comparison(
    rxt, llama, ids, new_tokens, stm, repeats, warmup, compiled: bool, decompose=False, clock=time.perf_counter
) -> dict:
    """RxT vs Llama per-token decode, both on static caches (and compiled decode steps): one alternation group
    (with `decompose`, also the two RxT variants of `_decomposition_models`), timed with `clock`."""
    from transformers import StaticCache

    from modeling_rxt import RxTCache

    length = ids.shape[1] + new_tokens + 1
    models = {"rxt": rxt, "llama": llama, **(_decomposition_models(rxt) if decompose else {})}
    steps = {name: _decode_step(model, compiled) for name, model in models.items()}

    def cache(name):
        if name == "llama":
            return StaticCache(config=llama.config, max_cache_len=length)
        return RxTCache(stm=stm, config=rxt.config, max_cache_len=length)

    for name, model in models.items():  # compile every graph before timing
        _static_loop(model, ids, 2, cache(name), steps[name])
    times = bc.measure_interleaved([
        lambda name=name, model=model: _static_loop(model, ids, new_tokens, cache(name), steps[name], clock)
        for name, model in models.items()
    ], repeats, warmup)  # fmt: skip
    row = {"compiled": compiled, "clock": "thread CPU time" if clock is time.thread_time else "wall clock"}
    for name, t in zip(models, times, strict=True):
        row[name] = {k: bc.spread(v) for k, v in t.items()}
    llama_ms = row["llama"]["per_token_ms"]["median_ms"]
    row["decode_ratio_rxt_vs_llama"] = row["rxt"]["per_token_ms"]["median_ms"] / llama_ms
    if decompose:
        row["decomposition_ratio_vs_llama"] = {
            name: row[name]["per_token_ms"]["median_ms"] / llama_ms for name in models if name != "llama"
        }
    return row


def _breakdown(rxt, llama, ids, new_tokens, make_rxt_cache, make_llama_cache) -> dict:
    """Per-token milliseconds spent in decoder sub-modules (instrumented manual loop)."""
    acc: dict[str, float] = collections.defaultdict(float)
    patched = []

    def wrap(module, name):
        forward = module.forward

        def timed(*a, **k):
            t = time.perf_counter()
            r = forward(*a, **k)
            acc[name] += time.perf_counter() - t
            return r

        module.forward = timed
        patched.append(module)

    for layer in rxt.model.decoder.layers:
        wrap(layer.attention, "rxt.self_attention")
        wrap(layer.memory_cross_attention, "rxt.memory_cross_attention")
        wrap(layer.ff, "rxt.feed_forward")
        for norm in (layer.norm1, layer.norm2, layer.norm3):
            wrap(norm, "rxt.norms")
    if rxt.model.decoder.head_norm is not None:
        wrap(rxt.model.decoder.head_norm, "rxt.norms")
    if rxt.model.decoder.rotary is not None:
        wrap(rxt.model.decoder.rotary, "rxt.rope_table")
    wrap(rxt.model, "rxt.model_total")
    wrap(rxt.lm_head, "rxt.lm_head")
    for layer in llama.model.layers:
        wrap(layer.self_attn, "llama.self_attention")
        wrap(layer.mlp, "llama.feed_forward")
        wrap(layer.input_layernorm, "llama.norms")
        wrap(layer.post_attention_layernorm, "llama.norms")
    wrap(llama.model.norm, "llama.norms")
    wrap(llama.model.rotary_emb, "llama.rope_table")
    wrap(llama.model, "llama.model_total")
    wrap(llama.lm_head, "llama.lm_head")
    result = {}
    try:
        for prefix, model, make in (("rxt", rxt, make_rxt_cache), ("llama", llama, make_llama_cache)):
            _loop(model, ids, 2, make())  # warm
            cache = make()
            out = model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            acc.clear()
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, **{CACHE_KWARG: cache}, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            step = (time.perf_counter() - t0) / new_tokens * 1e3
            parts = {k.split(".", 1)[1]: v / new_tokens * 1e3 for k, v in acc.items() if k.startswith(prefix)}
            parts["step_total"] = step
            parts["other"] = step - parts.pop("model_total") - parts["lm_head"]
            parts["model_rest"] = (step - parts["other"] - parts["lm_head"]) - sum(
                v for k, v in parts.items() if k not in ("step_total", "other", "lm_head"))
            result[prefix] = parts
    finally:
        for module in patched:
            del module.forward  # back to the class method
    return result


def _write_static_only(args, machine, threads, repeats, dims, new_tokens, prompt_len, label, static) -> dict:
    """`--static-only`: `<output stem>_static.json` + PNG (per-token ms of every system in the comparison)."""
    from pathlib import Path

    systems = [k for k in static if isinstance(static[k], dict) and "per_token_ms" in static[k]]
    summary = {f"decode_ratio_rxt_vs_llama_{label}": static["decode_ratio_rxt_vs_llama"],
               "target": {f"decode_ratio_rxt_vs_llama_{label}": "<= 1.17"},
               "meets_target": static["decode_ratio_rxt_vs_llama"] <= 1.17,
               **({"decomposition_ratio_vs_llama": static["decomposition_ratio_vs_llama"]}
                  if "decomposition_ratio_vs_llama" in static else {})}  # fmt: skip
    config = {"threads": threads, "repeats": repeats, "warmup_per_point": args.warmup, "seed": args.seed,
              "dtype": "float32", "batch": 1, "prompt_len": prompt_len, "new_tokens": new_tokens, "dims": dims,
              "timing": "every system in one alternation group", "decompose_mm": args.decompose_mm,
              "clock": static["clock"], "cpp_wrapper": args.cpp_wrapper}  # fmt: skip

    def plot(png):
        import matplotlib.pyplot as plt

        rows = [static[k]["per_token_ms"] for k in systems]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(range(len(systems)), [r["median_ms"] for r in rows],
               yerr=[[r["median_ms"] - r["q1_ms"] for r in rows], [r["q3_ms"] - r["median_ms"] for r in rows]],
               capsize=3)  # fmt: skip
        ax.set_xticks(range(len(systems)), [k.replace("_", " ") for k in systems], rotation=15, fontsize=7)
        ax.set_ylabel("ms per generated token (median, IQR)")
        ax.set_title(f"{label} decode, D={dims['embed_dim']}, {dims['num_layers']} layers, STM {dims['stm_size']}: "
                     f"RxT / Llama x{static['decode_ratio_rxt_vs_llama']:.3f}", fontsize=9)  # fmt: skip
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)

    output = Path(args.output)
    return bc.write_outputs(output.with_name(output.stem + "_static.json"), machine, config, [static], summary, plot,
                            (f"decode_ratio_rxt_vs_llama_{label}",))  # fmt: skip


def main(argv=None) -> dict:
    ap = bc.base_parser("decode", __doc__)
    ap.add_argument("--prompt-lens", type=int, nargs="*", default=None, help="prompt tokens (64 256; quick 16)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens (128; quick 16)")
    ap.add_argument("--stm-size", type=int, default=None, help="STM slots (512; quick 32)")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--stm-sweep", type=int, nargs="*", default=None,
                    help="STM sizes for the decode-ratio sweep (128 512 1024; quick 16)")
    ap.add_argument("--global-warmup", type=int, default=2, help="untimed generate() calls per model before the sweep")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None,
                    help="compile the static-cache decode steps (default: yes, except with --quick)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--static-only", action="store_true", help="only the static / compiled comparison")
    ap.add_argument("--decompose-mm", action="store_true",
                    help="compile with inductor's decompose_mm_pass (one-row matrix products as generated "
                         "multiply-reduce kernels instead of BLAS calls), for both models")  # fmt: skip
    ap.add_argument("--cpu-clock", action="store_true",
                    help="static comparison: time with the thread's CPU time (time.thread_time) instead of the wall "
                         "clock; needs --threads 1")  # fmt: skip
    ap.add_argument("--cpp-wrapper", action="store_true",
                    help="compile with inductor's C++ wrapper (torch._inductor.config.cpp_wrapper), for both models")
    ap.add_argument("--decompose", action="store_true",
                    help="static comparison: also RxT without the attention over the slots and without memory "
                         "sub-layers")  # fmt: skip
    ap.add_argument("--embed-dim", type=int, default=None, help="model width (256; quick 64)")
    ap.add_argument("--ff-dim", type=int, default=None, help="feed-forward width (768; quick 192)")
    args = ap.parse_args(argv)
    if args.cpu_clock and args.threads != 1:
        ap.error(f"--cpu-clock times the calling thread only; expected --threads 1, got --threads {args.threads}")

    from transformers import DynamicCache

    from modeling_rxt import RxTCache, RxTForCausalLM

    quick = args.quick
    threads = bc.pin_threads(args.threads)
    if quick:
        dims = dict(bc.QUICK_DIMS)
        prompt_lens, new_tokens, repeats = [16], 16, 2
    else:
        dims = dict(bc.FULL_DIMS)
        prompt_lens, new_tokens, repeats = [64, 256], 128, 9
    for key in ("stm_size", "embed_dim", "ff_dim"):
        if getattr(args, key):
            dims[key] = getattr(args, key)
    stm_sizes = args.stm_sweep if args.stm_sweep is not None else ([16] if quick else [128, 512, 1024])
    prompt_lens = sorted(set(args.prompt_lens or prompt_lens))
    new_tokens = args.new_tokens or new_tokens
    repeats = args.repeats or repeats
    headline = prompt_lens[0]
    compiled = (not quick) if args.compile is None else args.compile
    if args.decompose_mm or args.cpp_wrapper:
        import torch._inductor.config as inductor_config

        if args.decompose_mm:
            inductor_config.post_grad_fusion_options = {"decompose_mm_pass": {}}
        inductor_config.cpp_wrapper = args.cpp_wrapper
    machine = bc.machine_info(threads)
    torch.manual_seed(args.seed)
    config = bc.rxt_config(**dims, seq_len=max(1024, max(prompt_lens) + new_tokens + 8))
    rxt = RxTForCausalLM(config).eval()
    llama = bc.llama_like(config)
    gen = torch.Generator().manual_seed(args.seed)
    stm = rxt.initial_stm(1)
    results = []
    breakdown = None
    t_start = time.perf_counter()
    with torch.inference_mode():
        ids = bc.rxt_query(gen, 1, headline, dims["vocab_size"], config)
        clock = time.thread_time if args.cpu_clock else time.perf_counter
        static = _static_comparison(
            rxt, llama, ids, new_tokens, stm, repeats, args.warmup, compiled, args.decompose, clock
        )
        label = "static_compiled" if compiled else "static"
        print(f"prompt {headline:4d}, {label}: per-token ms rxt {static['rxt']['per_token_ms']['median_ms']:.3f} "
              f"llama {static['llama']['per_token_ms']['median_ms']:.3f} (x{static['decode_ratio_rxt_vs_llama']:.3f})",
              flush=True)  # fmt: skip
        for name, ratio in static.get("decomposition_ratio_vs_llama", {}).items():
            print(f"  {name}: x{ratio:.3f} of Llama", flush=True)
        if args.static_only:
            return _write_static_only(args, machine, threads, repeats, dims, new_tokens, headline, label, static)
        warm = bc.rxt_query(gen, 1, prompt_lens[0], dims["vocab_size"], config)
        for _ in range(args.global_warmup):  # whole-process warm-up before the first point
            _generate(rxt, warm, new_tokens, cache=RxTCache(stm=stm))
            _generate(llama, warm, new_tokens)
        for plen in prompt_lens:
            ids = bc.rxt_query(gen, 1, plen, dims["vocab_size"], config)
            # all systems in one alternation group (same background load for every ratio)
            g_rxt, g_llama, g1_rxt, g1_llama, l_llama, l_rxt, l_noreuse = bc.measure_interleaved([
                lambda ids=ids: _generate(rxt, ids, new_tokens, cache=RxTCache(stm=stm)),
                lambda ids=ids: _generate(llama, ids, new_tokens),
                lambda ids=ids: _generate(rxt, ids, 1, cache=RxTCache(stm=stm)),
                lambda ids=ids: _generate(llama, ids, 1),
                lambda ids=ids: _loop(llama, ids, new_tokens, DynamicCache()),
                lambda ids=ids: _loop(rxt, ids, new_tokens, RxTCache(stm=stm)),
                lambda ids=ids: _loop(rxt, ids, new_tokens, RxTCache(stm=stm), reproject=True),
            ], repeats, args.warmup)  # fmt: skip

            def project_all():
                for layer in rxt.model.decoder.layers:
                    layer.project_memory(stm[layer.memory_layer_idx])

            (proj,) = bc.timeit_interleaved([project_all], repeats, args.warmup)
            diff = {
                name: (bc.median(gn["total_ms"]) - bc.median(g1["total_ms"])) / (new_tokens - 1)
                for name, gn, g1 in (("rxt", g_rxt, g1_rxt), ("llama", g_llama, g1_llama))
            }
            row = {
                "prompt_len": plen,
                "new_tokens": new_tokens,
                "generate": {
                    "rxt": {k: bc.spread(v) for k, v in g_rxt.items()},
                    "llama": {k: bc.spread(v) for k, v in g_llama.items()},
                    "per_token_ms_from_time_difference": diff,
                },
                "manual_loop": {
                    "llama": {k: bc.spread(v) for k, v in l_llama.items()},
                    "rxt_memory_kv_cached": {k: bc.spread(v) for k, v in l_rxt.items()},
                    "rxt_memory_kv_reprojected_per_token": {k: bc.spread(v) for k, v in l_noreuse.items()},
                },
                "rxt_memory_kv_projection_per_turn": bc.spread(proj),
            }
            r_g = (row["generate"]["rxt"]["per_token_ms"]["median_ms"]
                   / row["generate"]["llama"]["per_token_ms"]["median_ms"])  # fmt: skip
            r_l = (row["manual_loop"]["rxt_memory_kv_cached"]["per_token_ms"]["median_ms"]
                   / row["manual_loop"]["llama"]["per_token_ms"]["median_ms"])  # fmt: skip
            sp = (row["manual_loop"]["rxt_memory_kv_reprojected_per_token"]["per_token_ms"]["median_ms"]
                  / row["manual_loop"]["rxt_memory_kv_cached"]["per_token_ms"]["median_ms"])  # fmt: skip
            row.update({"decode_ratio_rxt_vs_llama_generate": r_g, "decode_ratio_rxt_vs_llama_manual_loop": r_l,
                        "memory_kv_cache_speedup": sp})  # fmt: skip
            results.append(row)
            print(f"prompt {plen:4d}: per-token ms generate rxt "
                  f"{row['generate']['rxt']['per_token_ms']['median_ms']:.2f}"
                  f" llama {row['generate']['llama']['per_token_ms']['median_ms']:.2f} (x{r_g:.3f}) | loop rxt "
                  f"{row['manual_loop']['rxt_memory_kv_cached']['per_token_ms']['median_ms']:.2f} re-projecting "
                  f"{row['manual_loop']['rxt_memory_kv_reprojected_per_token']['per_token_ms']['median_ms']:.2f}"
                  f" llama {row['manual_loop']['llama']['per_token_ms']['median_ms']:.2f} | memory K/V cache x{sp:.2f}"
                  f" | projection {row['rxt_memory_kv_projection_per_turn']['median_ms']:.2f} ms/turn", flush=True)
        # decode ratio vs STM size: the memory cross-attention reads S slots per layer and token
        stm_sweep = []
        if stm_sizes:
            ids = bc.rxt_query(gen, 1, headline, dims["vocab_size"], config)
            models = {}
            for size in stm_sizes:
                torch.manual_seed(args.seed)
                models[size] = RxTForCausalLM(bc.rxt_config(**{**dims, "stm_size": size},
                                                            seq_len=config.decoder_config.seq_len)).eval()  # fmt: skip
            fns = [lambda: _loop(llama, ids, new_tokens, DynamicCache())]
            fns += [lambda m=m: _loop(m, ids, new_tokens, RxTCache(stm=m.initial_stm(1))) for m in models.values()]
            times = bc.measure_interleaved(fns, repeats, args.warmup)
            llama_ms = bc.median(times[0]["per_token_ms"])
            for size, t in zip(stm_sizes, times[1:], strict=True):
                per = bc.spread(t["per_token_ms"])
                stm_sweep.append({"stm_size": size, "rxt_per_token_ms": per, "llama_per_token_ms": llama_ms,
                                  "decode_ratio_rxt_vs_llama_manual_loop": per["median_ms"] / llama_ms})  # fmt: skip
            print("decode ratio (manual loop) by STM slots: " + ", ".join(
                f"S={r['stm_size']} x{r['decode_ratio_rxt_vs_llama_manual_loop']:.3f}" for r in stm_sweep), flush=True)
        if not args.no_breakdown:
            ids = bc.rxt_query(gen, 1, headline, dims["vocab_size"], config)
            breakdown = _breakdown(rxt, llama, ids, new_tokens, lambda: RxTCache(stm=stm), DynamicCache)
            for name, parts in breakdown.items():
                print(f"breakdown {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(parts.items())))
    elapsed = time.perf_counter() - t_start
    head = next(r for r in results if r["prompt_len"] == headline)
    summary = {
        "decode_ratio_rxt_vs_llama": head["decode_ratio_rxt_vs_llama_generate"],
        "memory_kv_cache_speedup": head["memory_kv_cache_speedup"],
        "decode_ratio_rxt_vs_llama_manual_loop": head["decode_ratio_rxt_vs_llama_manual_loop"],
        "rxt_per_token_ms": head["generate"]["rxt"]["per_token_ms"]["median_ms"],
        "llama_per_token_ms": head["generate"]["llama"]["per_token_ms"]["median_ms"],
        "rxt_memory_kv_projection_ms_per_turn": head["rxt_memory_kv_projection_per_turn"]["median_ms"],
        "decode_ratio_rxt_vs_llama_static": static["decode_ratio_rxt_vs_llama"],
        "static_decode_step_compiled": compiled,
        "headline_prompt_len": headline,
        "decode_ratio_by_prompt_len": {str(r["prompt_len"]): r["decode_ratio_rxt_vs_llama_generate"] for r in results},
        "decode_ratio_manual_loop_by_stm_size": {
            str(r["stm_size"]): r["decode_ratio_rxt_vs_llama_manual_loop"] for r in stm_sweep
        },
        "target": {"decode_ratio_rxt_vs_llama": "<= 1.25", "memory_kv_cache_speedup": "> 1",
                   "decode_ratio_rxt_vs_llama_static": "<= 1.17"},  # fmt: skip
        "meets_target": {
            "decode_ratio_rxt_vs_llama": head["decode_ratio_rxt_vs_llama_generate"] <= 1.25,
            "decode_ratio_rxt_vs_llama_static": static["decode_ratio_rxt_vs_llama"] <= 1.17,
            "memory_kv_cache_speedup": head["memory_kv_cache_speedup"] > 1.0,
        },
    }
    config_out = {
        "quick": bool(quick),
        "threads": threads,
        "repeats": repeats,
        "warmup_per_point": args.warmup,
        "global_warmup": args.global_warmup,
        "timing": "generate and manual-loop systems timed in one alternation group per prompt length",
        "seed": args.seed,
        "dtype": "float32",
        "batch": 1,
        "prompt_lens": prompt_lens,
        "new_tokens": new_tokens,
        "rxt": {**bc.rxt_dims(config), **bc.describe_model(rxt)},
        "llama": {**bc.describe_model(llama), "num_attention_heads": llama.config.num_attention_heads,
                  "num_key_value_heads": llama.config.num_key_value_heads, "head_dim": llama.config.head_dim,
                  "intermediate_size": llama.config.intermediate_size},  # fmt: skip
        "summary_measure": f"generate(), streamer per-token decode, prompt {headline}; memory K/V speed-up from the "
                           "manual loop",
        "elapsed_s": elapsed,
    }

    def plot(png):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2 if breakdown else 1, figsize=(11 if breakdown else 6, 4.2), squeeze=False)
        ax = axes[0, 0]
        labels = ["Llama generate", "RxT generate", "Llama loop", "RxT loop", "RxT loop, K/V re-projected"]
        width = 0.8 / len(results)
        for i, r in enumerate(results):
            rows = [r["generate"]["llama"]["per_token_ms"], r["generate"]["rxt"]["per_token_ms"],
                    r["manual_loop"]["llama"]["per_token_ms"], r["manual_loop"]["rxt_memory_kv_cached"]["per_token_ms"],
                    r["manual_loop"]["rxt_memory_kv_reprojected_per_token"]["per_token_ms"]]  # fmt: skip
            xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(labels))]
            ax.bar(xs, [x["median_ms"] for x in rows], width,
                   yerr=[[x["median_ms"] - x["q1_ms"] for x in rows], [x["q3_ms"] - x["median_ms"] for x in rows]],
                   capsize=2, label=f"prompt {r['prompt_len']}")  # fmt: skip
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
        ax.set_ylabel("ms per generated token (median, IQR)")
        ax.set_title(f"decode ratio RxT/Llama {summary['decode_ratio_rxt_vs_llama']:.2f}, memory K/V cache "
                     f"x{summary['memory_kv_cache_speedup']:.1f}", fontsize=9)  # fmt: skip
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
        if breakdown:
            ax = axes[0, 1]
            parts = sorted({k for p in breakdown.values() for k in p} - {"step_total"})
            bottom = [0.0, 0.0]
            for part in parts:
                vals = [breakdown[s].get(part, 0.0) for s in ("llama", "rxt")]
                ax.bar(["Llama", "RxT"], vals, bottom=bottom, label=part)
                bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
            ax.set_ylabel("ms per token (instrumented loop)")
            ax.set_title("where a decode step goes", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle(f"decode, D={dims['embed_dim']}, {dims['num_layers']} layers, STM {dims['stm_size']} slots, "
                     f"{threads} thread(s)", fontsize=10)  # fmt: skip
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)

    out = bc.write_outputs(args.output, machine, config_out, results, summary, plot, SUMMARY_KEYS,
                           extra={"breakdown_ms_per_token": breakdown, "results_stm_sweep": stm_sweep,
                                  "results_static": static})  # fmt: skip
    return out


if __name__ == "__main__":
    main()
