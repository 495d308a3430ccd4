#!/usr/bin/env python
"""Throughput of batched conversations at turn 16: RxT (STM per conversation) vs a same-size Llama with a KV cache.

B conversations (B = 1 ... 32) are at turn `--turn` (16): each has `turn - 1` previous interactions of
`--query-len` + `--answer-len` tokens (64 + 64). RxT holds an STM `[L, B, S, D]` (its values do not change the
cost; the initial STM is used), Llama holds a `DynamicCache` with the B histories (built once, untimed, and
cropped back after every timed repeat). Both answer a new 64-token query per conversation with stock `generate()`
(greedy, EOS disabled, 64 new tokens). Measured, systems in alternation, median and quartiles over `--repeats`:
turn latency, time to first token, generated tokens per second (`B * answer_len / turn latency`) and, for RxT, the
batched memory update (`update_memory` of the B interactions into an `RxTCache`, which also projects the next
turn's memory K/V, so the timed turn does not) and the throughput if that update is counted in (the memory update is
normally hidden behind the user's think time, but on a saturated server it costs compute).

Writes `runs/bench/batch.json` and `.png`.

    python scripts/bench_batch.py            # B = 1..32, turn 16, D=256, 4 layers
    python scripts/bench_batch.py --quick    # tiny model, B = 1, 2, turn 3 (seconds)
"""

from __future__ import annotations

import time

import bench_common as bc
import torch

from modeling_rxt import CACHE_KWARG

SUMMARY_KEYS = ("throughput_ratio_rxt_vs_llama_b32_turn16",)


def main(argv=None) -> dict:
    ap = bc.base_parser("batch", __doc__)
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=None, help="(1 2 4 8 16 32; quick 1 2)")
    ap.add_argument("--turn", type=int, default=None, help="turn measured (16; quick 3)")
    ap.add_argument("--query-len", type=int, default=None, help="(64; quick 16)")
    ap.add_argument("--answer-len", type=int, default=None, help="(64; quick 16)")
    ap.add_argument("--global-warmup", type=int, default=2, help="untimed turns per model before the sweep")
    args = ap.parse_args(argv)

    from transformers import DynamicCache

    from modeling_rxt import RxTCache

    quick = args.quick
    threads, machine = bc.start(args)
    if quick:
        dims = dict(bc.QUICK_DIMS)
        sizes, turn, q_len, a_len, repeats = [1, 2], 3, 16, 16, 2
    else:
        dims = dict(bc.FULL_DIMS)
        sizes, turn, q_len, a_len, repeats = [1, 2, 4, 8, 16, 32], 16, 64, 64, 5
    sizes = sorted(set(args.batch_sizes or sizes))
    turn = args.turn or turn
    q_len, a_len = args.query_len or q_len, args.answer_len or a_len
    repeats = args.repeats or repeats
    history_len = (turn - 1) * (q_len + a_len)
    headline_b = 32 if 32 in sizes else max(sizes)
    config, rxt, llama = bc.rxt_and_llama(
        dims, seq_len=max(1024, 2 * (q_len + a_len)), max_positions=max(16384, history_len + q_len + a_len + 8)
    )
    gen = torch.Generator().manual_seed(args.seed)
    b_max = max(sizes)
    vocab = dims["vocab_size"]
    history = bc.random_tokens(gen, (b_max, history_len), vocab)
    queries = bc.rxt_query(gen, b_max, q_len, vocab, config)
    answers = bc.random_tokens(gen, (b_max, a_len), vocab)
    interactions = torch.cat([queries, answers], dim=1)
    stm = rxt.initial_stm(b_max)
    results = []
    t_start = time.perf_counter()
    with torch.inference_mode():
        t0 = time.perf_counter()
        full_cache = DynamicCache()
        if history_len:
            chunk = 8  # conversations per prefill call (bounds the activation memory)
            parts = []
            for start in range(0, b_max, chunk):
                c = DynamicCache()
                llama(input_ids=history[start : start + chunk], **{CACHE_KWARG: c}, use_cache=True, logits_to_keep=1)
                parts.append(c)
            for i in range(len(parts[0].layers)):
                full_cache.update(torch.cat([p.layers[i].keys for p in parts]),
                                  torch.cat([p.layers[i].values for p in parts]), i)  # fmt: skip
        build_s = time.perf_counter() - t0
        for _ in range(args.global_warmup):  # whole-process warm-up before the first point
            bc.timed_generate(rxt, queries[:1], a_len, cache=RxTCache(stm=stm[:, :1].contiguous()))
            bc.timed_generate(llama, queries[:1], a_len)
        for b in sizes:
            kv = DynamicCache()
            for i, layer in enumerate(full_cache.layers):
                kv.update(layer.keys[:b].clone(), layer.values[:b].clone(), i)
            prompt = torch.cat([history[:b], queries[:b]], dim=1)
            rxt_stm = stm[:, :b].contiguous()

            def run_rxt(b=b, rxt_stm=rxt_stm):
                cache = bc.rxt_cache_after_update(rxt, rxt_stm)
                return bc.timed_generate(rxt, queries[:b], a_len, cache=cache)[0]

            def run_update(b=b, rxt_stm=rxt_stm):
                cache = RxTCache(stm=rxt_stm)
                t = time.perf_counter()
                rxt.update_memory(interactions[:b], None, cache)  # B new STMs + the next turn's memory K/V
                return {"update_ms": (time.perf_counter() - t) * 1e3}

            def run_llama(prompt=prompt, kv=kv):
                out, _ = bc.timed_generate(llama, prompt, a_len, **{CACHE_KWARG: kv})
                kv.crop(history_len - kv.get_seq_length())
                return out

            m_rxt, m_upd, m_llama = bc.measure_interleaved([run_rxt, run_update, run_llama], repeats, args.warmup)
            tokens = b * a_len
            rxt_turn, upd, ll_turn = (
                bc.median(m_rxt["turn_ms"]),
                bc.median(m_upd["update_ms"]),
                bc.median(m_llama["turn_ms"]),
            )
            row = {
                "batch": b,
                "turn": turn,
                "history_tokens_per_conversation": history_len,
                "generated_tokens": tokens,
                "rxt": {"turn": bc.spread(m_rxt["turn_ms"]), "prompt": bc.spread(m_rxt["prompt_ms"]),
                        "tokens_per_s": tokens / (rxt_turn / 1e3), "state_bytes": bc.tensor_bytes([rxt_stm])},
                "rxt_memory_update": bc.spread(m_upd["update_ms"]),
                "rxt_tokens_per_s_with_update": tokens / ((rxt_turn + upd) / 1e3),
                "llama_kvcache": {"turn": bc.spread(m_llama["turn_ms"]), "prompt": bc.spread(m_llama["prompt_ms"]),
                                  "tokens_per_s": tokens / (ll_turn / 1e3),
                                  "state_bytes": bc.dynamic_cache_bytes(kv)},
            }  # fmt: skip
            row["throughput_ratio_rxt_vs_llama"] = row["rxt"]["tokens_per_s"] / row["llama_kvcache"]["tokens_per_s"]
            row["throughput_ratio_rxt_with_update_vs_llama"] = (
                row["rxt_tokens_per_s_with_update"] / row["llama_kvcache"]["tokens_per_s"]
            )
            results.append(row)
            print(f"B={b:3d}: tok/s rxt {row['rxt']['tokens_per_s']:8.1f} (with update "
                  f"{row['rxt_tokens_per_s_with_update']:8.1f})  llama-kv {row['llama_kvcache']['tokens_per_s']:8.1f}"
                  f"  ratio {row['throughput_ratio_rxt_vs_llama']:.2f}"
                  f" ({row['throughput_ratio_rxt_with_update_vs_llama']:.2f})"
                  f" | state MiB rxt {row['rxt']['state_bytes'] / 2**20:.1f}"
                  f" llama {row['llama_kvcache']['state_bytes'] / 2**20:.1f}",
                  flush=True)  # fmt: skip
            del kv
    elapsed = time.perf_counter() - t_start
    head = next(r for r in results if r["batch"] == headline_b)
    summary = {
        "throughput_ratio_rxt_vs_llama_b32_turn16": head["throughput_ratio_rxt_vs_llama"],
        "throughput_ratio_rxt_with_update_vs_llama_b32_turn16": head["throughput_ratio_rxt_with_update_vs_llama"],
        "rxt_tokens_per_s_b32": head["rxt"]["tokens_per_s"],
        "llama_kvcache_tokens_per_s_b32": head["llama_kvcache"]["tokens_per_s"],
        "state_bytes_ratio_llama_vs_rxt_b32": head["llama_kvcache"]["state_bytes"] / head["rxt"]["state_bytes"],
        "headline": {"batch": headline_b, "turn": turn},
        "throughput_ratio_by_batch": {str(r["batch"]): r["throughput_ratio_rxt_vs_llama"] for r in results},
    }
    config_out = bc.run_config(
        args,
        threads,
        repeats,
        global_warmup=args.global_warmup,
        batch_sizes=sizes,
        turn=turn,
        query_len=q_len,
        answer_len=a_len,
        history_tokens_per_conversation=history_len,
        summary_point={"batch": headline_b, "turn": turn}
        | ({"note": "quick mode: the largest batch and turn measured stand in for b32/turn16"} if quick else {}),
        rxt={**bc.rxt_dims(config), **bc.describe_model(rxt)},
        llama=bc.describe_model(llama),
        llama_cache_build_s=build_s,
        stm="initial STM per conversation (the update cost does not depend on its values)",
        elapsed_s=elapsed,
    )

    def plot(png):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        xs = [r["batch"] for r in results]
        ax = axes[0]
        ax.plot(xs, [r["rxt"]["tokens_per_s"] for r in results], "o-", label="RxT (generate)")
        ax.plot(xs, [r["rxt_tokens_per_s_with_update"] for r in results], "o--", label="RxT incl. memory update")
        ax.plot(xs, [r["llama_kvcache"]["tokens_per_s"] for r in results], "s-", label="Llama + KV cache")
        bc.log_axes(ax, "conversations in the batch", "generated tokens / s", xbase=2)
        ax = axes[1]
        bc.errorbar(ax, xs, [r["rxt"]["turn"] for r in results], "RxT turn")
        bc.errorbar(ax, xs, [r["rxt_memory_update"] for r in results], "RxT memory update", linestyle="--")
        bc.errorbar(ax, xs, [r["llama_kvcache"]["turn"] for r in results], "Llama + KV cache turn")
        bc.log_axes(ax, "conversations in the batch", "ms (median, IQR)", xbase=2)
        bc.save_figure(fig, png, f"batched conversations at turn {turn} ({history_len} history tokens each), "
                       f"D={dims['embed_dim']}, {dims['num_layers']} layers, {threads} thread(s)")  # fmt: skip

    out = bc.write_outputs(args.output, machine, config_out, results, summary, plot, SUMMARY_KEYS)
    return out


if __name__ == "__main__":
    main()
