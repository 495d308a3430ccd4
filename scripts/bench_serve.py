"""Serving benchmark: K concurrent simulated users × M turns through the HTTP API of a live `python -m serving`
server, for three systems behind the same server code path, engine and batching:

- `rxt`: RxT, each turn sends only the new message with `previous_response_id` (the server keeps the STM);
- `llama_history`: a same-dims `LlamaForCausalLM` served the way `transformers serve` serves it: the client resends
  the whole conversation (`/v1/chat/completions`) and the server re-reads it every turn;
- `llama_kv`: the same Llama with each conversation's KV cache kept by the server between turns (what prefix
  caching gives at best), `previous_response_id` as for RxT.

The users run turn by turn together (turn t of every user, then turn t + 1), with `--think` seconds between a
reply and the next message. Reported by turn index: time to first token and turn latency (p50 / p99), throughput
(turns/s of the round); per system: state bytes per conversation (what the server stores; for `llama_history` the
history the client resends) and, after a server restart, the time of the next turn (state restored from the store).
JSON (`summary` keys with `ttft`, `throughput`, `ratio`) + PNG; docs/benchmarks.md "Serving".
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import (
    FULL_DIMS,
    QUICK_DIMS,
    REPO_ROOT,
    base_parser,
    llama_like,
    machine_info,
    pin_threads,
    rxt_config,
    write_outputs,
)

SYSTEMS = ("rxt", "llama_history", "llama_kv")


def build_models(folder: Path, dims: dict, seq_len: int, max_positions: int, seed: int) -> dict[str, Path]:
    """A tokenizer, an RxT and a same-dims Llama (random weights), saved for `python -m serving`."""
    import torch

    from modeling_rxt import RxTForCausalLM
    from modeling_rxt.tokenization_rxt import train_rxt_tokenizer
    from trainers.synthetic import generate_pretrain

    tokenizer = train_rxt_tokenizer([r["text"] for r in generate_pretrain(400, seed=seed)],
                                    vocab_size=dims["vocab_size"], min_frequency=1)  # fmt: skip
    dims = {**dims, "vocab_size": len(tokenizer)}
    torch.manual_seed(seed)
    config = rxt_config(**dims, seq_len=seq_len)
    paths = {"rxt": folder / "rxt", "llama": folder / "llama"}
    RxTForCausalLM(config).eval().save_pretrained(paths["rxt"])
    llama_like(config, max_positions=max_positions).save_pretrained(paths["llama"])
    for path in paths.values():
        tokenizer.save_pretrained(path)
    return paths


class Server:
    def __init__(self, model_dir: Path, db: Path, port: int, threads: int, batch: int, *extra: str):
        command = [sys.executable, "-m", "serving", str(model_dir), "--db", str(db), "--port", str(port),
                   "--threads", str(threads), "--max-batch-size", str(batch), "--max-output-tokens", "1024",
                   "--log-level", "warning", *extra]  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        self.log = db.with_suffix(f".{port}.log")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=log)

    def wait_ready(self, timeout: float = 300) -> float:
        import httpx

        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(self.url)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def one_turn(http, system: str, user: dict, text: str, max_tokens: int) -> dict:
    """One streamed turn → time to first token, latency, output tokens; updates the user's state."""
    started = time.perf_counter()
    first, pieces, usage = None, [], {}
    if system == "llama_history":
        user["messages"].append({"role": "user", "content": text})
        body = {"model": "m", "messages": user["messages"], "stream": True, "max_tokens": max_tokens,
                "temperature": 0, "stream_options": {"include_usage": True}}  # fmt: skip
        path = "/v1/chat/completions"
    else:
        body = {"model": "m", "input": text, "stream": True, "max_output_tokens": max_tokens, "temperature": 0,
                "previous_response_id": user.get("previous")}  # fmt: skip
        path = "/v1/responses"
    request_bytes = len(json.dumps(body))
    async with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread()).decode()[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if system == "llama_history":
                if event.get("choices") and event["choices"][0]["delta"].get("content"):
                    first = first or time.perf_counter()
                    pieces.append(event["choices"][0]["delta"]["content"])
                usage = event.get("usage") or usage
            elif event["type"] == "response.output_text.delta":
                first = first or time.perf_counter()
                pieces.append(event["delta"])
            elif event["type"] in ("response.completed", "response.incomplete"):
                user["previous"], user["conversation"] = event["response"]["id"], event["response"]["conversation"]["id"]
                usage = {"completion_tokens": event["response"]["usage"]["output_tokens"]}
    done = time.perf_counter()
    if system == "llama_history":
        user["messages"].append({"role": "assistant", "content": "".join(pieces)})
    return {"ttft_s": (first or done) - started, "latency_s": done - started,
            "output_tokens": usage.get("completion_tokens", 0), "request_bytes": request_bytes}  # fmt: skip


def query(user: int, turn: int) -> str:
    return f"user {user} turn {turn}: my name is alice and i live in paris number {user * 7 + turn}"


async def run_users(url: str, system: str, users: list[dict], turns: range, max_tokens: int, think: float):
    """Turn t of every user concurrently, then turn t + 1 (after `think` seconds). → per-turn rows."""
    import httpx

    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for turn in turns:
            start = time.perf_counter()
            stats = await asyncio.gather(*(one_turn(http, system, user, query(index, turn), max_tokens)
                                           for index, user in enumerate(users)))  # fmt: skip
            wall = time.perf_counter() - start
            rows.append({"turn": turn + 1, "wall_s": wall, "throughput_turns_per_s": len(users) / wall,
                         "ttft": percentiles([s["ttft_s"] for s in stats]),
                         "latency": percentiles([s["latency_s"] for s in stats]),
                         "output_tokens": statistics.mean(s["output_tokens"] for s in stats),
                         "request_bytes": statistics.mean(s["request_bytes"] for s in stats)})  # fmt: skip
            if think > 0:
                await asyncio.sleep(think)
    return rows


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    def pick(q):
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
    return {"p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * pick(0.99), "max_ms": 1000 * ordered[-1]}


def memory_wait_ms_per_turn(url: str) -> float:
    """Mean time a turn waited for its conversation's previous memory update (server metric)."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=60).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("rxt_memory_update_wait_seconds_")}  # fmt: skip
    count = values.get("rxt_memory_update_wait_seconds_count", 0.0)
    return 1000 * values.get("rxt_memory_update_wait_seconds_sum", 0.0) / count if count else 0.0


def state_bytes(url: str, users: list[dict], system: str, rows: list[dict]) -> float:
    import httpx

    if system == "llama_history":  # no server state: the client holds (and resends) the history
        return rows[-1]["request_bytes"]
    sizes = [len(httpx.get(f"{url}/v1/conversations/{u['conversation']}/memory", timeout=120).content) for u in users]
    return statistics.mean(sizes)


def bench_system(system: str, model_dir: Path, work: Path, args, think: float, restart: bool = True) -> dict:
    extra = {"llama_history": ["--baseline-mode", "history"], "llama_kv": ["--baseline-mode", "kv"]}.get(system, [])
    db = work / f"{system}.sqlite3"
    server = Server(model_dir, db, free_port(), args.threads, args.users, *extra)
    server.wait_ready()
    users = [{"messages": []} for _ in range(args.users)]
    warm = [{"messages": []} for _ in range(args.users)]
    try:
        for _ in range(args.warmup):  # untimed: one turn of other conversations
            asyncio.run(run_users(server.url, system, warm, range(1), args.max_output_tokens, 0.0))
        rows = asyncio.run(run_users(server.url, system, users, range(args.turns), args.max_output_tokens, think))
        size = state_bytes(server.url, users, system, rows)
        waited = memory_wait_ms_per_turn(server.url)
    finally:
        server.stop()
    result = {"system": system, "think_s": think, "turns": rows, "state_bytes": size,
              "memory_update_wait_ms_per_turn": waited}  # fmt: skip
    if not restart:
        return result
    restarted = Server(model_dir, db, free_port(), args.threads, args.users, *extra)
    startup_s = restarted.wait_ready()
    try:  # the next turn of every user after the restart: its state comes back from the store
        after = asyncio.run(run_users(restarted.url, system, users, range(args.turns, args.turns + 1),
                                      args.max_output_tokens, 0.0))  # fmt: skip
    finally:
        restarted.stop()
    return {**result, "restart_startup_s": startup_s, "turn_after_restart": after[0]}


def main(argv=None) -> dict:
    parser = base_parser("serve", __doc__)
    parser.add_argument("--users", type=int, default=None, help="K concurrent users (default 16; quick 4)")
    parser.add_argument("--turns", type=int, default=None, help="M turns per user (default 32; quick 4)")
    parser.add_argument("--max-output-tokens", type=int, default=None, help="answer length (default 32; quick 8)")
    parser.add_argument("--think", type=float, default=1.0, help="think time of the extra RxT run (s)")
    args = parser.parse_args(argv)
    args.users = args.users or (4 if args.quick else 16)
    args.turns = args.turns or (4 if args.quick else 32)
    args.max_output_tokens = args.max_output_tokens or (8 if args.quick else 32)
    threads = pin_threads(args.threads)
    dims = QUICK_DIMS if args.quick else FULL_DIMS
    per_turn = 64 + args.max_output_tokens  # a query is ~30 tokens; prompt + answer of one turn fit in the RxT seq_len
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        work = Path(tmp)
        paths = build_models(work, dims, seq_len=max(256, per_turn), max_positions=per_turn * (args.turns + 2),
                             seed=args.seed)  # fmt: skip
        results = [bench_system("rxt", paths["rxt"], work, args, 0.0),
                   bench_system("llama_history", paths["llama"], work, args, 0.0),
                   bench_system("llama_kv", paths["llama"], work, args, 0.0)]  # fmt: skip
        think_turns = min(args.turns, 4)
        think_args = type(args)(**{**vars(args), "turns": think_turns})
        results.append({**bench_system("rxt", paths["rxt"], work, think_args, args.think, restart=False),
                        "system": "rxt_think"})  # fmt: skip
    by = {r["system"]: r for r in results}
    last, first = args.turns - 1, 0

    def at(system, turn, key):
        return by[system]["turns"][turn][key]

    summary = {
        "rxt_ttft_p50_ratio_last_vs_turn1": at("rxt", last, "ttft")["p50_ms"] / at("rxt", first, "ttft")["p50_ms"],
        "throughput_ratio_rxt_vs_llama_history_last_turn": at("rxt", last, "throughput_turns_per_s")
        / at("llama_history", last, "throughput_turns_per_s"),
        "throughput_ratio_rxt_vs_llama_kv_last_turn": at("rxt", last, "throughput_turns_per_s")
        / at("llama_kv", last, "throughput_turns_per_s"),
        "state_bytes_ratio_llama_kv_vs_rxt": by["llama_kv"]["state_bytes"] / by["rxt"]["state_bytes"],
        "ttft_p50_ms_last_turn": {s: at(s, last, "ttft")["p50_ms"] for s in SYSTEMS},
        "throughput_turns_per_s_last_turn": {s: at(s, last, "throughput_turns_per_s") for s in SYSTEMS},
        "rxt_memory_update_wait_ms_per_turn": by["rxt"]["memory_update_wait_ms_per_turn"],
        "rxt_memory_update_wait_ms_per_turn_think": by["rxt_think"]["memory_update_wait_ms_per_turn"],
        "restore_ttft_p50_ms_after_restart": {s: by[s]["turn_after_restart"]["ttft"]["p50_ms"] for s in SYSTEMS},
    }  # fmt: skip
    config = {"quick": args.quick, "threads": threads, "users": args.users, "turns": args.turns,
              "max_output_tokens": args.max_output_tokens, "think_s": args.think, "dims": dims}  # fmt: skip

    def plot(png):
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for system in SYSTEMS:
            turns = [r["turn"] for r in by[system]["turns"]]
            left.plot(turns, [r["ttft"]["p50_ms"] for r in by[system]["turns"]], marker="o", label=system)
            right.plot(turns, [r["throughput_turns_per_s"] for r in by[system]["turns"]], marker="o", label=system)
        left.set(xlabel="turn", ylabel="time to first token p50 (ms)", title=f"{args.users} users")
        right.set(xlabel="turn", ylabel="throughput (turns/s)", title="one server, batched")
        left.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=120)

    return write_outputs(args.output, machine_info(threads), config, results, summary, plot,
                         required=("rxt_ttft_p50_ratio_last_vs_turn1", "throughput_ratio_rxt_vs_llama_history_last_turn",
                                   "throughput_ratio_rxt_vs_llama_kv_last_turn", "state_bytes_ratio_llama_kv_vs_rxt",
                                   "rxt_memory_update_wait_ms_per_turn_think"))  # fmt: skip


if __name__ == "__main__":
    main()
