"""Shared helpers of the benchmark scripts (`scripts/bench_*.py`).

- machine description (`machine_info`), thread pinning (`pin_threads`);
- timing: `timeit`, `timeit_interleaved` (systems compared in alternation, so they share the same background load on
  a shared machine), `spread` (median, min, max, quartiles, IQR of a list of milliseconds), `TimingStreamer`
  (a `generate()` streamer that time-stamps the prompt and every generated token);
- command line and run set-up: `base_parser` (the common `--quick/--output/--threads/--repeats/--warmup/--seed`
  options), `start` (threads pinned, machine described, torch seeded), `run_config` (the `config` block's common
  head: quick, threads, repeats, warm-up, seed, dtype);
- output: `write_outputs` (JSON `{"machine", "config", "results", "summary"}` + a PNG with the same stem, next to
  the JSON), and for the PNG `errorbar`, `log_axes` and `save_figure`;
- the compared models: `rxt_config` (a dense RxT with stated dims), `llama_like` (a transformers `LlamaForCausalLM`
  with the RxT decoder's width, layers, heads, head dim, SwiGLU FF width and vocabulary) and `rxt_and_llama` (both,
  built from one set of dims).

Every script imports this module as `bench_common` (it puts the repository root on `sys.path`).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402 - after the environment defaults above
from transformers.generation.streamers import BaseStreamer  # noqa: E402

# The benchmarked RxT / Llama dims: tiny for --quick, the documented full size otherwise (docs/benchmarks.md).
QUICK_DIMS = dict(
    embed_dim=64, num_layers=2, att_heads=4, query_heads=2, kv_heads=2, ff_dim=192, vocab_size=512, stm_size=32
)
FULL_DIMS = dict(
    embed_dim=256, num_layers=4, att_heads=16, query_heads=8, kv_heads=8, ff_dim=768, vocab_size=8192, stm_size=512
)


# ---------------------------------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def pin_threads(threads: int) -> int:
    """`torch.set_num_threads(threads)` (intra-op); returns the count actually in effect."""
    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine_info(threads: int, device: str = "cpu", **extra) -> dict:
    """CPU model, core counts, platform, library versions, torch threads, load average (+ `extra` keys)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        affinity = os.cpu_count()
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_available": affinity,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "torch_threads": threads,
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        import transformers

        info["transformers_version"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if hasattr(os, "getloadavg"):
        info["loadavg_1min_start"] = os.getloadavg()[0]
    info.update(extra)
    return info


# ---------------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------------
def _no_sync() -> None:
    return None


def timeit(fn: Callable[[], object], repeats: int, warmup: int, sync: Callable[[], None] = _no_sync) -> list[float]:
    """Wall-clock milliseconds of `repeats` calls of `fn`, after `warmup` untimed calls."""
    return timeit_interleaved([fn], repeats, warmup, sync)[0]


def timeit_interleaved(
    fns: list[Callable[[], object]], repeats: int, warmup: int, sync: Callable[[], None] = _no_sync
) -> list[list[float]]:
    """Time several callables in alternation (A B C A B C ...) so that all see the same background load."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync()
    gc.collect()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            sync()
            out.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_interleaved(fns: list[Callable[[], dict]], repeats: int, warmup: int) -> list[dict[str, list[float]]]:
    """Like `timeit_interleaved` for callables that measure themselves: each returns a dict of named milliseconds
    (e.g. `{"prompt_ms": .., "turn_ms": ..}`); returns, per callable, name -> list over the timed repeats."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    gc.collect()
    out: list[dict[str, list[float]]] = [{} for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, out, strict=True):
            for key, value in fn().items():
                acc.setdefault(key, []).append(value)
    return out


def spread(times_ms: Iterable[float]) -> dict:
    """Median, min, max, quartiles and IQR of a list of milliseconds."""
    times = list(times_ms)
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "repeats": len(times),
    }


def median(times_ms: Iterable[float]) -> float:
    return statistics.median(list(times_ms))


class TimingStreamer(BaseStreamer):
    """`generate(..., streamer=TimingStreamer())`: `perf_counter()` of the prompt push and of every generated token.

    `generate` pushes the prompt first (before the prefill), then each generated token right after it is selected,
    so with `t0` taken just before calling `generate`: time to first token = `stamps[1] - t0`, and the decode steps
    are the gaps between later stamps.
    """

    def __init__(self):
        self.stamps: list[float] = []
        self.end_stamp: float | None = None

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        self.end_stamp = time.perf_counter()


def timed_generate(model, ids: torch.Tensor, new_tokens: int, **kwargs) -> tuple[dict, torch.Tensor]:
    """Greedy `generate()` of exactly `new_tokens` tokens (EOS disabled), timed by a `TimingStreamer`:
    `({"prompt_ms": time to first token, "turn_ms": the whole call, "decode_ms_per_token": mean step after the first
    token}, output ids)`."""
    streamer = TimingStreamer()
    t0 = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
        pad_token_id=0, streamer=streamer, **kwargs,
    )  # fmt: skip
    t1 = time.perf_counter()
    if out.shape != (ids.shape[0], ids.shape[1] + new_tokens):
        raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens, expected {new_tokens}")
    stamps = streamer.stamps  # [prompt push, token 1, ..., token N]
    decode = (stamps[-1] - stamps[1]) / max(new_tokens - 1, 1)
    return {"prompt_ms": (stamps[1] - t0) * 1e3, "turn_ms": (t1 - t0) * 1e3, "decode_ms_per_token": decode * 1e3}, out


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors if t is not None))


def dynamic_cache_bytes(cache) -> int:
    """Bytes held by a transformers `DynamicCache` (keys and values of every layer)."""
    tensors = []
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and getattr(layer, "is_initialized", True):
            tensors += [layer.keys, layer.values]
    return tensor_bytes(tensors)


# ---------------------------------------------------------------------------------------------------------------------
# command line and outputs
# ---------------------------------------------------------------------------------------------------------------------
def base_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model and sweep (seconds; smoke test)")
    ap.add_argument("--output", default=f"runs/bench/{name}.json", help="JSON path; the PNG goes next to it")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core VM a descheduled OpenMP worker can "
                         "stall every parallel op)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per point (default: per script)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls per point")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def start(args) -> tuple[int, dict]:
    """Pin torch to `args.threads`, describe the machine and seed torch with `args.seed`: `(threads, machine)`."""
    threads = pin_threads(args.threads)
    machine = machine_info(threads)
    torch.manual_seed(args.seed)
    return threads, machine


def run_config(args, threads: int, repeats, warmup=None, **fields) -> dict:
    """The head of every benchmark's `config` block (how it was run: quick, threads, repeats, warm-up per point,
    seed, dtype), followed by the script's own `fields`."""
    head = {
        "quick": bool(args.quick),
        "threads": threads,
        "repeats": repeats,
        "warmup_per_point": args.warmup if warmup is None else warmup,
        "seed": args.seed,
        "dtype": "float32",
    }
    return {**head, **fields}


def finite(value) -> bool:
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, bool):
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    return True


def write_outputs(
    path: str | Path,
    machine: dict,
    config: dict,
    results: list,
    summary: dict,
    plot: Callable[[Path], None] | None = None,
    required: Iterable[str] = (),
    extra: dict | None = None,
) -> dict:
    """Write the JSON (and the PNG drawn by `plot(png_path)`, same stem); raise if a required summary value is not
    finite; print the required summary values and the path. `extra` adds more top-level keys. Returns the JSON
    object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(os, "getloadavg"):
        machine["loadavg_1min_end"] = os.getloadavg()[0]
    out = {"machine": machine, "config": config, "results": results, "summary": summary, **(extra or {})}
    if plot is not None:
        png = path.with_suffix(".png")
        try:
            import matplotlib

            matplotlib.use("Agg")
            plot(png)
            out["plot"] = str(png)
        except Exception as exc:  # pragma: no cover - plotting is best effort
            print(f"plot skipped: {exc!r}", file=sys.stderr)
    path.write_text(json.dumps(out, indent=2) + "\n")
    bad = [k for k in required if k not in summary or not finite(summary[k])]
    if bad:
        raise SystemExit(f"summary keys missing or not finite: {bad} ({path})")
    for key in required:
        value = summary[key]
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"-> {path}")
    return out


def errorbar(ax, xs, rows: list[dict], label: str, **kwargs) -> None:
    """Median with quartile bars of `spread` dicts."""
    med = [r["median_ms"] for r in rows]
    lo = [max(r["median_ms"] - r["q1_ms"], 0.0) for r in rows]
    hi = [max(r["q3_ms"] - r["median_ms"], 0.0) for r in rows]
    ax.errorbar(xs, med, yerr=[lo, hi], marker=kwargs.pop("marker", "o"), capsize=3, label=label, **kwargs)


def log_axes(ax, xlabel: str, ylabel: str, xbase: int | None = None, title: str | None = None, legend=None) -> None:
    """Log-scale y (and x with `xbase`), labels, optional title, grid and legend: the benchmarks' plot axes."""
    if xbase is not None:
        ax.set_xscale("log", base=xbase)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(**(legend if legend is not None else {"fontsize": 7}))


def save_figure(fig, png: Path, title: str | None = None, dpi: int = 110) -> None:
    """Title the figure, lay it out, write the PNG and close it."""
    import matplotlib.pyplot as plt

    if title is not None:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=dpi)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------------
def rxt_config(
    embed_dim: int = 256,
    num_layers: int = 4,
    att_heads: int = 16,
    query_heads: int = 8,
    kv_heads: int = 8,
    ff_dim: int = 768,
    vocab_size: int = 8192,
    stm_size: int = 512,
    seq_len: int = 1024,
    variant: str = "self-interlayer",
    num_groups: int = 1,
    decoder: dict | None = None,
):
    """A dense RxT (no MoE) with SwiGLU FF, RMS head norm and SQA heads `(query_heads, kv_heads)` of `att_heads`
    everywhere (decoder/encoder self-attention, memory cross-attention, memory attention); `decoder` overrides
    decoder fields (e.g. `self_att_type`, `att_groups`, `att_query_groups`)."""
    from modeling_rxt import RxTConfig

    common = dict(
        num_layers=num_layers, vocab_size=vocab_size, embed_dim=embed_dim, ff_dim=ff_dim, att_heads=att_heads,
        seq_len=seq_len, stm_size=stm_size, self_att_type="sqa", att_groups=kv_heads, att_query_groups=query_heads,
        cross_att_type="sqa", cross_att_groups=kv_heads, cross_att_query_groups=query_heads, ff_activation="silu",
        use_gated=True,
    )  # fmt: skip
    decoder = {**common, "use_head_norm": True, "head_norm_type": "rms_norm", **(decoder or {})}
    memory_attention = dict(
        num_layers=num_layers, embed_dim=embed_dim, att_heads=att_heads, seq_len=seq_len, stm_size=stm_size,
        att_type="sqa", att_groups=kv_heads, att_query_groups=query_heads, interlayer_att_type="sqa",
        interlayer_att_groups=kv_heads, interlayer_att_query_groups=query_heads, self_att_type="sqa",
        self_att_groups=kv_heads, self_att_query_groups=query_heads, use_gated_residual=True,
        residual_gate_type="elementwise", use_tanh_residual_gate=False, num_groups=num_groups,
    )  # fmt: skip
    return RxTConfig(
        decoder_config=decoder,
        encoder_config=dict(common),
        memory_attention_config=memory_attention,
        memory_attention_variant=variant,
    )


def llama_like(config, max_positions: int = 16384):
    """`LlamaForCausalLM` with the RxT decoder's D, layers, `(Hq, Hkv)`, head dim, SwiGLU width (with biases, like
    RxT's FF) and vocabulary; SDPA attention, untied head (as RxT)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dec = config.decoder_config
    hq, hkv = dec.self_attention_heads
    llama_config = LlamaConfig(
        vocab_size=dec.vocab_size,
        hidden_size=dec.embed_dim,
        intermediate_size=dec.ff_dim,
        num_hidden_layers=dec.num_layers,
        num_attention_heads=hq,
        num_key_value_heads=hkv,
        head_dim=dec.head_dim,
        hidden_act="silu",
        mlp_bias=True,
        attention_bias=False,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )
    return LlamaForCausalLM(llama_config).eval()


def rxt_and_llama(dims: dict, seq_len: int, max_positions: int):
    """`(config, rxt, llama)`: a dense RxT with `dims` (`rxt_config`) and the Llama of its decoder's shape
    (`llama_like`), both in eval mode, built in this order from torch's current RNG state."""
    from modeling_rxt import RxTForCausalLM

    config = rxt_config(**dims, seq_len=seq_len)
    rxt = RxTForCausalLM(config).eval()
    return config, rxt, llama_like(config, max_positions=max_positions)


def describe_model(model) -> dict:
    return {
        "class": type(model).__name__,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "dtype": str(next(model.parameters()).dtype),
    }


def rxt_dims(config) -> dict:
    dec = config.decoder_config
    return {
        "embed_dim": dec.embed_dim,
        "num_layers": dec.num_layers,
        "att_heads": dec.att_heads,
        "head_dim": dec.head_dim,
        "self_attention_heads_q_kv": list(dec.self_attention_heads),
        "cross_attention_heads_q_kv": list(dec.cross_attention_heads),
        "ff_dim": dec.ff_dim,
        "ff": "SwiGLU",
        "vocab_size": dec.vocab_size,
        "stm_size": config.memory_attention_config.stm_size,
        "memory_attention_variant": config.memory_attention_variant,
    }


def random_tokens(generator: torch.Generator, shape, vocab: int, low: int = 16) -> torch.Tensor:
    """Random ordinary token ids in `[low, vocab)` (special ids below `low` are avoided)."""
    return torch.randint(low, vocab, tuple(shape), generator=generator)


def rxt_query(generator: torch.Generator, batch: int, length: int, vocab: int, config) -> torch.Tensor:
    """A random `[BOS][Q] ... [A]` prompt of `length` tokens."""
    ids = random_tokens(generator, (batch, length), vocab)
    ids[:, 0], ids[:, 1], ids[:, -1] = config.bos_token_id, config.query_token_id, config.answer_token_id
    return ids


def rxt_cache_after_update(rxt, stm: torch.Tensor):
    """The `RxTCache` a chat holds after a memory update wrote `stm`: the next turn's memory K/V already projected
    (`update_memory(..., cache)` → `prepare_memory_kv`), so a timed `generate` does not include that projection."""
    from modeling_rxt import RxTCache

    cache = RxTCache(stm=stm)
    rxt.prepare_memory_kv(cache)
    return cache


__all__ = [
    "REPO_ROOT", "TimingStreamer", "base_parser", "cpu_model", "describe_model", "dynamic_cache_bytes", "errorbar",
    "finite", "llama_like", "log_axes", "machine_info", "measure_interleaved", "median", "pin_threads",
    "random_tokens", "run_config", "rxt_and_llama", "rxt_cache_after_update", "rxt_config", "rxt_dims", "rxt_query",
    "save_figure", "spread", "start", "tensor_bytes", "timed_generate", "timeit", "timeit_interleaved", "write_outputs",
]  # fmt: skip
