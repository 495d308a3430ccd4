#!/usr/bin/env python
"""Multi-turn conversation cost: RxT (fixed-size STM) vs a same-size Llama re-reading the history, and vs a Llama
keeping its KV cache across turns.

A conversation is a fixed sequence of random interactions `[BOS][Q] query [A] answer [EOS]` (`--query-len` +
`--answer-len` tokens, 64 + 64 by default). At each measured turn t (1 ... `--turns`) every system answers the turn-t
query with `generate()` (greedy, exactly `--answer-len` new tokens: EOS disabled) starting from its state after
turns 1 ... t-1:

- **rxt**: `RxTForCausalLM.generate(query, cache=cache)`: reads the query only. As in a chat, the cache comes
  from the previous turn's memory update, which also projected the memory K/V from the new STM
  (`prepare_memory_kv`), so the prompt phase does not; `prompt_memory_kv_in_prompt` times the same turn with a fresh
  `RxTCache(stm)`, whose prefill projects them. The memory update (`update_memory` of the 128-token interaction into
  an `RxTCache`, the K/V projection included) is timed separately (`rxt_memory_update`); its cost does not block
  the reply (see background below).
- **llama_reread**: `LlamaForCausalLM.generate(history + query)` with no cache between turns (a stateless chatbot
  re-reads the whole conversation every turn).
- **llama_kvcache**: the same Llama, `generate(history + query, cache=cache)` (`past_key_values` before
  transformers 5.24) with the `DynamicCache` holding the history; only the new tokens are prefilled. The cache is
  cropped back after each timed repeat.

Measured per turn and system (median and quartiles over `--repeats`, the systems timed in alternation after
warm-up): prompt-phase latency = time to first token (prefill of what the system must read, stamped by a streamer
inside `generate`), full turn latency (prompt + the whole answer), per-token decode time, tokens processed, and the
state carried between turns in bytes (RxT: the STM; Llama: its KV cache after the turn).
Between measured turns the states are advanced without timing (RxT: `update_memory` per interaction; Llama KV:
one forward over the interaction). Finally the memory update runs in a background thread during a simulated user
think time (`--think-time`, 1 s), as `RxTChatSession(background_update=True)` does, and the fraction of the update
hidden behind it is measured (also with no think time, the worst case).

Writes `runs/bench/conversation.json` and `.png`.

    python scripts/bench_conversation.py            # D=256, 4 layers, turns 1..64 (a few minutes)
    python scripts/bench_conversation.py --quick    # tiny model, turns 1..3, 16+16 tokens (seconds)
"""

from __future__ import annotations

import threading
import time

import bench_common as bc
import torch

from modeling_rxt import CACHE_KWARG

SUMMARY_KEYS = (
    "rxt_prompt_latency_ratio_turn64_vs_turn1",
    "prompt_speedup_vs_llama_reread_turn32",
    "turn_speedup_vs_llama_reread_turn32",
    "turn_latency_ratio_rxt_vs_llama_kvcache_turn32",
    "state_bytes_ratio_llama_kvcache_vs_rxt_turn64",
)
SYSTEMS = ("rxt", "llama_reread", "llama_kvcache")
LABELS = {"rxt": "RxT (query only + STM)", "llama_reread": "Llama, re-reads history",
          "llama_kvcache": "Llama, KV cache across turns"}  # fmt: skip


def main(argv=None) -> dict:
    ap = bc.base_parser("conversation", __doc__)
    ap.add_argument("--turns", type=int, default=None, help="last turn (default 64; quick 3)")
    ap.add_argument(
        "--measure-turns",
        type=int,
        nargs="*",
        default=None,
        help="turns timed (default 1 2 4 8 16 32 48 64; quick 1 3)",
    )
    ap.add_argument("--query-len", type=int, default=None, help="query tokens incl. [BOS][Q]..[A] (64; quick 16)")
    ap.add_argument("--answer-len", type=int, default=None, help="answer tokens generated per turn (64; quick 16)")
    ap.add_argument("--think-time", type=float, default=None, help="simulated user think time, s (1.0; quick 0.1)")
    ap.add_argument("--background-turns", type=int, default=None, help="turns of the background test (6; quick 2)")
    ap.add_argument("--global-warmup", type=int, default=2, help="untimed turns of every system before the sweep")
    ap.add_argument("--embed-dim", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--stm-size", type=int, default=None)
    args = ap.parse_args(argv)

    from transformers import DynamicCache

    from modeling_rxt import RxTCache

    quick = args.quick
    threads, machine = bc.start(args)
    if quick:
        dims = dict(bc.QUICK_DIMS)
        defaults = dict(turns=3, measure=[1, 3], q=16, a=16, think=0.1, bg=2, repeats=2)
    else:
        dims = dict(bc.FULL_DIMS)
        defaults = dict(turns=64, measure=[1, 2, 4, 8, 16, 32, 48, 64], q=64, a=64, think=1.0, bg=6, repeats=5)
    if args.embed_dim:
        dims["embed_dim"], dims["ff_dim"] = args.embed_dim, 3 * args.embed_dim
    if args.layers:
        dims["num_layers"] = args.layers
    if args.stm_size:
        dims["stm_size"] = args.stm_size
    turns = args.turns or defaults["turns"]
    measure = sorted({t for t in (args.measure_turns or defaults["measure"]) if 1 <= t <= turns} | {1, turns})
    q_len, a_len = args.query_len or defaults["q"], args.answer_len or defaults["a"]
    think = defaults["think"] if args.think_time is None else args.think_time
    bg_turns = args.background_turns or defaults["bg"]
    repeats = args.repeats or defaults["repeats"]
    inter_len = q_len + a_len

    config, rxt, llama = bc.rxt_and_llama(
        dims, seq_len=max(1024, 2 * inter_len), max_positions=max(16384, (turns + 1) * inter_len + 8)
    )
    vocab = dims["vocab_size"]
    gen = torch.Generator().manual_seed(args.seed)
    queries = [bc.rxt_query(gen, 1, q_len, vocab, config) for _ in range(turns + bg_turns)]
    answers = []
    for _ in range(turns + bg_turns):
        answer = bc.random_tokens(gen, (1, a_len), vocab)
        answer[:, -1] = config.eos_token_id
        answers.append(answer)
    interactions = [torch.cat([q, a], dim=1) for q, a in zip(queries, answers, strict=True)]
    turn_ref = {"turn32": 32 if 32 in measure else max(measure), "turn64": 64 if 64 in measure else max(measure)}

    results = []
    stm = rxt.initial_stm(1)
    stm_at_turn = {}
    kv_cache = DynamicCache()
    t_start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(args.global_warmup):  # whole-process warm-up (allocator, kernels) before the first point
            bc.timed_generate(rxt, queries[0], a_len, cache=RxTCache(stm=stm))
            rxt.update_memory(interactions[0], None, stm)
            bc.timed_generate(llama, queries[0], a_len)
        for t in range(1, turns + 1):
            query, interaction = queries[t - 1], interactions[t - 1]
            history = torch.cat(interactions[: t - 1], dim=1) if t > 1 else query[:, :0]
            if t in measure:
                stm_at_turn[t] = stm
                hist_len = history.shape[1]
                prompt = torch.cat([history, query], dim=1)
                info: dict = {}

                def run_rxt(query=query, info=info, stm=stm):
                    cache = bc.rxt_cache_after_update(rxt, stm)
                    times, _ = bc.timed_generate(rxt, query, a_len, cache=cache)
                    info["rxt_turn_bytes"] = bc.dynamic_cache_bytes(cache) + bc.tensor_bytes(
                        x for kv in cache.memory_kv.values() for x in kv
                    )
                    return times

                def run_rxt_cold(query=query, stm=stm):  # the prefill projects the memory K/V
                    return bc.timed_generate(rxt, query, a_len, cache=RxTCache(stm=stm))[0]

                def run_update(interaction=interaction, stm=stm):
                    cache = RxTCache(stm=stm)
                    t0 = time.perf_counter()
                    rxt.update_memory(interaction, None, cache)  # new STM + the next turn's memory K/V
                    return {"update_ms": (time.perf_counter() - t0) * 1e3}

                def run_reread(prompt=prompt):
                    return bc.timed_generate(llama, prompt, a_len)[0]

                def run_kv(prompt=prompt, hist_len=hist_len, info=info):
                    times, _ = bc.timed_generate(llama, prompt, a_len, **{CACHE_KWARG: kv_cache})
                    info["kv_bytes_after"] = bc.dynamic_cache_bytes(kv_cache)
                    info["kv_tokens_after"] = kv_cache.get_seq_length()
                    kv_cache.crop(hist_len - kv_cache.get_seq_length())  # back to the history (negative count)
                    return times

                m_rxt, m_cold, m_upd, m_re, m_kv = bc.measure_interleaved(
                    [run_rxt, run_rxt_cold, run_update, run_reread, run_kv], repeats, args.warmup
                )
                stm_bytes = bc.tensor_bytes([stm])
                row = {
                    "turn": t,
                    "history_tokens": hist_len,
                    "rxt": {
                        "prompt": bc.spread(m_rxt["prompt_ms"]),
                        "turn": bc.spread(m_rxt["turn_ms"]),
                        "prompt_memory_kv_in_prompt": bc.spread(m_cold["prompt_ms"]),
                        "decode_ms_per_token": bc.median(m_rxt["decode_ms_per_token"]),
                        "prompt_tokens_read": q_len,
                        "tokens_processed": q_len + a_len,
                        "memory_update_tokens": inter_len,
                        "state_bytes": stm_bytes,
                        "turn_transient_bytes": info["rxt_turn_bytes"],
                        "cumulative_tokens_processed": t * (q_len + a_len + inter_len),
                    },
                    "rxt_memory_update": bc.spread(m_upd["update_ms"]),
                    "llama_reread": {
                        "prompt": bc.spread(m_re["prompt_ms"]),
                        "turn": bc.spread(m_re["turn_ms"]),
                        "decode_ms_per_token": bc.median(m_re["decode_ms_per_token"]),
                        "prompt_tokens_read": hist_len + q_len,
                        "tokens_processed": hist_len + q_len + a_len,
                        "state_bytes": 0,
                        "turn_transient_bytes": info["kv_bytes_after"]
                        * (hist_len + q_len + a_len - 1)
                        // max(info["kv_tokens_after"], 1),
                        "cumulative_tokens_processed": sum(
                            (i - 1) * inter_len + q_len + a_len for i in range(1, t + 1)
                        ),
                    },
                    "llama_kvcache": {
                        "prompt": bc.spread(m_kv["prompt_ms"]),
                        "turn": bc.spread(m_kv["turn_ms"]),
                        "decode_ms_per_token": bc.median(m_kv["decode_ms_per_token"]),
                        "prompt_tokens_read": q_len,
                        "tokens_processed": q_len + a_len,
                        "attended_history_tokens": hist_len,
                        "state_bytes": info["kv_bytes_after"],
                        "state_tokens": info["kv_tokens_after"],
                        "cumulative_tokens_processed": t * (q_len + a_len),
                    },
                }
                results.append(row)
                print(
                    f"turn {t:3d} (history {hist_len:5d} tok)  prompt ms: rxt {row['rxt']['prompt']['median_ms']:7.1f}"
                    f"  reread {row['llama_reread']['prompt']['median_ms']:8.1f}"
                    f"  kv {row['llama_kvcache']['prompt']['median_ms']:7.1f} | turn ms: rxt "
                    f"{row['rxt']['turn']['median_ms']:7.1f}  reread {row['llama_reread']['turn']['median_ms']:8.1f}"
                    f"  kv {row['llama_kvcache']['turn']['median_ms']:7.1f}"
                    f" | update {row['rxt_memory_update']['median_ms']:6.1f}"
                    f" | state KiB rxt {stm_bytes / 1024:.0f} kv {info['kv_bytes_after'] / 1024:.0f}",
                    flush=True,
                )
            # advance every state by turn t (untimed)
            stm = rxt.update_memory(interaction, None, stm)
            llama(input_ids=interaction, **{CACHE_KWARG: kv_cache}, use_cache=True, logits_to_keep=1)

        # -- RxT at every measured turn, timed in alternation (same background load for turn 1 and turn 64) --
        rxt_fns = [
            lambda t=t: bc.timed_generate(
                rxt, queries[t - 1], a_len, cache=bc.rxt_cache_after_update(rxt, stm_at_turn[t])
            )[0]
            for t in measure
        ]
        rxt_by_turn = {
            t: {"prompt": bc.spread(m["prompt_ms"]), "turn": bc.spread(m["turn_ms"])}
            for t, m in zip(measure, bc.measure_interleaved(rxt_fns, repeats, args.warmup), strict=True)
        }
        print(
            "RxT by turn, interleaved: prompt ms "
            + "  ".join(f"t{t} {v['prompt']['median_ms']:.1f}" for t, v in rxt_by_turn.items()),
            flush=True,
        )

        # -- background memory update behind a simulated think time (as RxTChatSession(background_update=True)) --
        background = []
        for think_s in sorted({0.0, think}):
            cache = RxTCache(stm=stm)
            rows = []
            for k in range(bg_turns + 1):
                query = queries[turns + min(k, bg_turns - 1)]
                t_query = time.perf_counter()
                if rows:  # the next query arrives: wait for the previous turn's update, then answer
                    thread, stamps = rows[-1].pop("_thread"), rows[-1].pop("_stamps")
                    thread.join()
                    rows[-1]["wait_ms"] = (time.perf_counter() - t_query) * 1e3
                    rows[-1]["update_ms"] = (stamps[1] - stamps[0]) * 1e3
                    rows[-1]["hidden_fraction"] = max(0.0, min(1.0, 1.0 - rows[-1]["wait_ms"] / rows[-1]["update_ms"]))
                if k == bg_turns:
                    break
                times, out = bc.timed_generate(rxt, query, a_len, cache=cache)
                interaction = out  # [BOS][Q]query[A] + the generated answer
                stamps: list[float] = []

                def update(interaction=interaction, stamps=stamps, cache=cache):
                    torch.set_num_threads(threads)
                    with torch.inference_mode():
                        stamps.append(time.perf_counter())
                        rxt.update_memory(interaction, None, cache)
                        stamps.append(time.perf_counter())

                thread = threading.Thread(target=update, daemon=True)
                thread.start()
                rows.append({"turn_ms": times["turn_ms"], "_thread": thread, "_stamps": stamps})
                if think_s > 0:
                    time.sleep(think_s)  # the user reads the answer and types the next query
            hidden = [r["hidden_fraction"] for r in rows]
            background.append(
                {
                    "think_time_s": think_s,
                    "turns": len(rows),
                    "update_ms": bc.spread([r["update_ms"] for r in rows]),
                    "wait_ms": bc.spread([r["wait_ms"] for r in rows]),
                    "hidden_fraction_median": bc.median(hidden),
                    "hidden_fraction_min": min(hidden),
                    "per_turn": rows,
                }
            )
            print(
                f"background update, think {think_s:.1f} s: update {background[-1]['update_ms']['median_ms']:.1f} ms,"
                f" next query waited {background[-1]['wait_ms']['median_ms']:.2f} ms, hidden fraction "
                f"{background[-1]['hidden_fraction_median']:.3f}",
                flush=True,
            )
    elapsed = time.perf_counter() - t_start

    by_turn = {r["turn"]: r for r in results}
    first, t32, t64 = by_turn[min(measure)], by_turn[turn_ref["turn32"]], by_turn[turn_ref["turn64"]]

    def med(row, system, key):
        return row[system][key]["median_ms"]

    bg_think = next(b for b in background if b["think_time_s"] == think)
    summary = {
        "rxt_prompt_latency_ratio_turn64_vs_turn1": rxt_by_turn[turn_ref["turn64"]]["prompt"]["median_ms"]
        / rxt_by_turn[min(measure)]["prompt"]["median_ms"],
        "prompt_speedup_vs_llama_reread_turn32": med(t32, "llama_reread", "prompt") / med(t32, "rxt", "prompt"),
        "turn_speedup_vs_llama_reread_turn32": med(t32, "llama_reread", "turn") / med(t32, "rxt", "turn"),
        "turn_latency_ratio_rxt_vs_llama_kvcache_turn32": med(t32, "rxt", "turn") / med(t32, "llama_kvcache", "turn"),
        "state_bytes_ratio_llama_kvcache_vs_rxt_turn64": t64["llama_kvcache"]["state_bytes"]
        / t64["rxt"]["state_bytes"],
        "rxt_turn_latency_ratio_turn64_vs_turn1": rxt_by_turn[turn_ref["turn64"]]["turn"]["median_ms"]
        / rxt_by_turn[min(measure)]["turn"]["median_ms"],
        "rxt_prompt_latency_ratio_turn64_vs_turn1_sweep": med(t64, "rxt", "prompt") / med(first, "rxt", "prompt"),
        "prompt_latency_ratio_rxt_vs_llama_kvcache_turn32": med(t32, "rxt", "prompt")
        / med(t32, "llama_kvcache", "prompt"),
        "rxt_prompt_speedup_memory_kv_prepared_by_update_turn32": med(t32, "rxt", "prompt_memory_kv_in_prompt")
        / med(t32, "rxt", "prompt"),
        "decode_ms_per_token_turn32": {s: t32[s]["decode_ms_per_token"] for s in SYSTEMS},
        "rxt_memory_update_ms_median": bc.median(r["rxt_memory_update"]["median_ms"] for r in results),
        "background_update_hidden_fraction": bg_think["hidden_fraction_median"],
        "background_update_hidden_fraction_min": bg_think["hidden_fraction_min"],
        "background_think_time_s": think,
        "headline_turns": turn_ref,
        "targets": {
            "rxt_prompt_latency_ratio_turn64_vs_turn1": "<= 1.05",
            "prompt_speedup_vs_llama_reread_turn32": ">= 20",
            "turn_speedup_vs_llama_reread_turn32": ">= 3",
            "turn_latency_ratio_rxt_vs_llama_kvcache_turn32": "<= 1.0",
            "state_bytes_ratio_llama_kvcache_vs_rxt_turn64": ">= 10",
            "background_update_hidden_fraction": "1.0 (fully hidden)",
        },
    }
    summary["meets_target"] = {
        "rxt_prompt_latency_ratio_turn64_vs_turn1": summary["rxt_prompt_latency_ratio_turn64_vs_turn1"] <= 1.05,
        "prompt_speedup_vs_llama_reread_turn32": summary["prompt_speedup_vs_llama_reread_turn32"] >= 20,
        "turn_speedup_vs_llama_reread_turn32": summary["turn_speedup_vs_llama_reread_turn32"] >= 3,
        "turn_latency_ratio_rxt_vs_llama_kvcache_turn32": (
            summary["turn_latency_ratio_rxt_vs_llama_kvcache_turn32"] <= 1.0
        ),
        "state_bytes_ratio_llama_kvcache_vs_rxt_turn64": summary["state_bytes_ratio_llama_kvcache_vs_rxt_turn64"]
        >= 10,
        "background_update_hidden_fraction": summary["background_update_hidden_fraction"] >= 0.99,
    }
    config_out = {
        **bc.run_config(args, threads, repeats),
        "turns": turns,
        "measured_turns": measure,
        "query_len": q_len,
        "answer_len": a_len,
        "interaction_len": inter_len,
        "generation": "greedy generate(), eos_token_id=None (fixed answer length)",
        "summary_turns": turn_ref,
        "summary_turn_note": "keys named turn32/turn64 use these turns"
        + (" (quick mode: the largest turn measured)" if turn_ref["turn32"] != 32 else ""),
        "rxt": {**bc.rxt_dims(config), **bc.describe_model(rxt)},
        "llama": {
            **bc.describe_model(llama),
            "num_attention_heads": llama.config.num_attention_heads,
            "num_key_value_heads": llama.config.num_key_value_heads,
            "head_dim": llama.config.head_dim,
            "intermediate_size": llama.config.intermediate_size,
            "mlp_bias": True,
        },  # fmt: skip
        "think_time_s": think,
        "background_turns": bg_turns,
        "global_warmup_turns": args.global_warmup,
        "rxt_turn_ratio_measure": "rxt_prompt/turn_latency_ratio_turn64_vs_turn1 come from a final pass timing RxT at "
        "every measured turn (its STM after turns 1..t-1) in alternation; the per-turn sweep ratio is given as *_sweep",
        "prompt_latency": "time to first token inside generate() (streamer stamp); RxT's memory K/V were projected by "
        "the previous turn's update (prompt_memory_kv_in_prompt: projected in the prefill)",
        "turn_latency": "wall time of generate() for the whole answer",
        "state_bytes": "RxT: STM tensor; Llama KV: DynamicCache keys+values after the turn; re-read: none",
        "elapsed_s": elapsed,
    }

    def plot(png):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        xs = [r["turn"] for r in results]
        for system in SYSTEMS:
            bc.errorbar(axes[0, 0], xs, [r[system]["prompt"] for r in results], LABELS[system])
            bc.errorbar(axes[0, 1], xs, [r[system]["turn"] for r in results], LABELS[system])
        bc.errorbar(axes[0, 0], xs, [rxt_by_turn[t]["prompt"] for t in xs], "RxT, turns timed in alternation",
                    linestyle=":", marker="x")  # fmt: skip
        bc.errorbar(axes[0, 0], xs, [r["rxt"]["prompt_memory_kv_in_prompt"] for r in results],
                    "RxT, memory K/V projected in the prompt", linestyle="--", marker="+")  # fmt: skip
        bc.errorbar(axes[0, 1], xs, [r["rxt_memory_update"] for r in results], "RxT memory update (async)",
                    linestyle="--")  # fmt: skip
        for ax, title in ((axes[0, 0], "prompt phase (time to first token)"),
                          (axes[0, 1], f"full turn ({a_len}-token answer)")):  # fmt: skip
            bc.log_axes(ax, "turn", "ms (median, IQR bars)", title=title)
        ax = axes[1, 0]
        ax.plot(xs, [r["rxt"]["state_bytes"] / 2**20 for r in results], "o-", label="RxT STM")
        ax.plot(xs, [r["llama_kvcache"]["state_bytes"] / 2**20 for r in results], "o-", label="Llama KV cache")
        bc.log_axes(ax, "turn", "state carried between turns (MiB)")
        ax = axes[1, 1]
        for system in SYSTEMS:
            ax.plot(xs, [r[system]["cumulative_tokens_processed"] for r in results], "o-", label=LABELS[system])
        hidden = summary["background_update_hidden_fraction"]
        bc.log_axes(ax, "turn", "cumulative tokens processed",
                    title=f"background update hidden behind {think:g} s think time: {hidden:.0%}")  # fmt: skip
        bc.save_figure(fig, png, f"RxT vs Llama conversation, D={dims['embed_dim']}, {dims['num_layers']} layers, "
                       f"{q_len}+{a_len} tokens/turn, {threads} thread(s)")  # fmt: skip

    out = bc.write_outputs(
        args.output,
        machine,
        config_out,
        results,
        summary,
        plot,
        SUMMARY_KEYS,
        extra={"results_background": background, "results_rxt_by_turn_interleaved": rxt_by_turn},
    )
    print(f"background_update_hidden_fraction: {summary['background_update_hidden_fraction']:.3f}")
    return out


if __name__ == "__main__":
    main()
