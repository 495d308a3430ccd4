"""Benchmark scripts (`scripts/bench_*.py`): each runs with `--quick` in its own subprocess and writes a valid JSON
(`machine`, `config`, `results`, `summary` with the documented keys, all finite) plus a PNG. No timing assertions.

The subprocesses run two at a time (the scripts are single-threaded: OMP_NUM_THREADS=1, `--threads 1`).
"""

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "conversation": (
        "rxt_prompt_latency_ratio_turn64_vs_turn1",
        "prompt_speedup_vs_llama_reread_turn32",
        "turn_speedup_vs_llama_reread_turn32",
        "turn_latency_ratio_rxt_vs_llama_kvcache_turn32",
        "state_bytes_ratio_llama_kvcache_vs_rxt_turn64",
    ),
    "sqa": ("xsqa_speedup_vs_mha_16k", "sqa_speedup_vs_gqa_16k"),
    "decode": ("decode_ratio_rxt_vs_llama", "memory_kv_cache_speedup"),
    "memory_update": ("update_ms_per_1k_tokens",),
    "batch": ("throughput_ratio_rxt_vs_llama_b32_turn16",),
    "serve": (
        "rxt_ttft_p50_ratio_last_vs_turn1",
        "throughput_ratio_rxt_vs_llama_history_last_turn",
        "throughput_ratio_rxt_vs_llama_kv_last_turn",
        "state_bytes_ratio_llama_kv_vs_rxt",
        "rxt_memory_update_wait_ms_per_turn_think",
    ),
}
SCRIPTS["train_step"] = ("step_speedup_eager_vs_sdpa", "smat_speedup_eager_vs_sdpa")
MEMORY_VARIANTS = {"simple", "self", "interlayer", "self-interlayer", "grouped-self-interlayer"}


def _run(name: str, out_dir: Path):
    out = out_dir / name / f"{name}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / f"bench_{name}.py"), "--quick", "--output", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=out_dir,
    )  # fmt: skip
    return proc, out


@pytest.fixture(scope="module")
def bench_runs(request, tmp_path_factory):
    """Start the selected scripts (two at a time) once; each test waits for its own."""
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if item.originalname == "test_bench_quick" and hasattr(item, "callspec")
    ]
    out_dir = tmp_path_factory.mktemp("bench")
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(_run, name, out_dir) for name in SCRIPTS if name in selected}
    yield futures
    pool.shutdown(wait=True)


def _finite(value) -> bool:
    if isinstance(value, dict):
        return len(value) > 0 and all(_finite(v) for v in value.values())
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_bench_quick(name, bench_runs):
    proc, out = bench_runs[name].result()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert {"machine", "config", "results", "summary"} <= set(data)
    machine, config, results, summary = data["machine"], data["config"], data["results"], data["summary"]
    for key in ("cpu_model", "cpu_count", "torch_version", "torch_threads", "platform", "date"):
        assert key in machine, key
    assert machine["torch_threads"] == 1
    assert config["quick"] is True and config["threads"] == 1
    assert isinstance(results, list) and results
    for key in SCRIPTS[name]:
        assert key in summary, key
        assert _finite(summary[key]), (key, summary[key])
    png = out.with_suffix(".png")
    assert png.is_file() and png.stat().st_size > 0

    if name == "conversation":
        assert [r["turn"] for r in results] == config["measured_turns"]
        for row in results:
            for system in ("rxt", "llama_reread", "llama_kvcache"):
                assert row[system]["turn"]["median_ms"] >= row[system]["prompt"]["median_ms"] > 0
            assert row["rxt"]["state_bytes"] > 0 and row["llama_kvcache"]["state_bytes"] > 0
            assert row["rxt_memory_update"]["median_ms"] > 0
        assert 0.0 <= summary["background_update_hidden_fraction"] <= 1.0
        assert data["results_background"]
    elif name == "sqa":
        for row in results:
            assert set(row["variants"]) == {"MHA", "GQA", "MQA", "SQA", "sSQA", "xSQA"}
            assert row["variants"]["xSQA"]["theory_core_speedup_vs_mha"] == 4.0
            assert "layer_forward" in row["variants"]["MHA"] and "model_train_step" in row["variants"]["MHA"]
    elif name == "decode":
        loop = results[0]["manual_loop"]
        assert {"llama", "rxt_memory_kv_cached", "rxt_memory_kv_reprojected_per_token"} <= set(loop)
    elif name == "memory_update":
        assert set(summary["update_ms_per_1k_tokens"]) == MEMORY_VARIANTS
        assert {r["sweep"] for r in results} == {"slots", "length"}
    elif name == "batch":
        assert [r["batch"] for r in results] == config["batch_sizes"]
        for row in results:
            assert row["rxt"]["tokens_per_s"] > 0 and row["llama_kvcache"]["tokens_per_s"] > 0
    elif name == "train_step":
        assert [r["episodes"] for r in results] == ["dialogues_fact_question", "dialogues_recent", "dialogues_short4"]
        assert [r["preset_steps"] for r in results] == [1500, 1000, 1400]
        assert all(r[kernel]["median_ms"] > 0 for r in results for kernel in ("eager", "sdpa"))
    elif name == "serve":
        assert [r["system"] for r in results] == ["rxt", "llama_history", "llama_kv", "rxt_think"]
        for row in results[:3]:
            assert [t["turn"] for t in row["turns"]] == list(range(1, config["turns"] + 1))
            assert all(t["ttft"]["p50_ms"] > 0 and t["throughput_turns_per_s"] > 0 for t in row["turns"])
            assert row["turn_after_restart"]["latency"]["p50_ms"] > 0
        assert results[0]["state_bytes"] > 0 and results[2]["state_bytes"] > 0


def test_bench_all_runs_every_script():
    script = (REPO_ROOT / "scripts" / "bench_all.sh").read_text()
    scripts = (REPO_ROOT / "scripts").glob("bench_*.py")
    names = sorted(p.stem[len("bench_") :] for p in scripts if p.stem != "bench_common")
    for name in names:
        assert name in script, f"bench_all.sh does not run bench_{name}.py"
    assert set(SCRIPTS) | {"tensorbleu"} == set(names)


def test_decode_static_decomposition(tmp_path):
    """`bench_decode.py --static-only --decompose`: the two RxT variants do what they are named for (without the
    attention core the STM no longer changes the logits but the sub-layer's projections still do; without memory
    sub-layers the logits equal those of the blocks alone), and the run writes their ratios."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import bench_common as bc
    import bench_decode
    import torch

    torch.manual_seed(0)
    config = bc.rxt_config(**bc.QUICK_DIMS, seq_len=64)
    from modeling_rxt import RxTForCausalLM

    rxt = RxTForCausalLM(config).eval()
    variants = bench_decode._decomposition_models(rxt)
    ids = torch.randint(4, 500, (1, 8))
    stm_a, stm_b = rxt.initial_stm(1), torch.randn_like(rxt.initial_stm(1))
    with torch.no_grad():
        def logits(model, stm):
            return model(input_ids=ids, stm=stm).logits

        assert not torch.allclose(logits(rxt, stm_a), logits(rxt, stm_b))
        for model in variants.values():
            assert torch.equal(logits(model, stm_a), logits(model, stm_b))
        no_core, no_memory = variants["rxt_without_attention_core"], variants["rxt_without_memory_sublayer"]
        assert not torch.allclose(logits(no_core, stm_a), logits(no_memory, stm_a))
        for layer in rxt.model.decoder.layers:  # the original model is untouched
            assert type(layer.memory_cross_attention).__name__ == "RxTMemoryCrossAttention"
            assert layer.memory_layer_idx is not None

    out = tmp_path / "decode.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "bench_decode.py"), "--quick", "--static-only", "--decompose",
         "--decompose-mm", "--cpu-clock", "--output", str(out)], capture_output=True, text=True, timeout=600, env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "decode_static.json").read_text())
    assert data["config"]["decompose_mm"] is True and data["config"]["clock"] == "thread CPU time"
    ratios = data["summary"]["decomposition_ratio_vs_llama"]
    assert set(ratios) == {"rxt", "rxt_without_attention_core", "rxt_without_memory_sublayer"}
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert (tmp_path / "decode_static.png").exists()


@pytest.mark.parametrize(
    "option", [{"post_grad_fusion_options": {"decompose_mm_pass": {}}}, {"cpp_wrapper": True}],
    ids=["decompose_mm", "cpp_wrapper"],
)
def test_decode_step_compiled_with_inductor_options_equals_eager(option):
    """`bench_decode.py --decompose-mm` / `--cpp-wrapper`: the static-cache decode step compiled with the option gives
    the eager step's logits (with `decompose_mm_pass`, inductor rewrites the one-row matrix products: counted)."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import bench_common as bc
    import bench_decode
    import torch
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    from modeling_rxt import RxTCache, RxTForCausalLM

    torch.manual_seed(0)
    config = bc.rxt_config(**bc.QUICK_DIMS, seq_len=64)
    rxt = RxTForCausalLM(config).eval()
    stm = torch.randn_like(rxt.initial_stm(1))
    ids = torch.randint(4, 500, (1, 6))
    torch._dynamo.reset()
    counters.clear()
    with torch.inference_mode(), inductor_config.patch(**option):
        logits = {}
        for compiled in (False, True):
            cache = RxTCache(stm=stm, config=rxt.config, max_cache_len=16)
            rxt(input_ids=ids, cache=cache, use_cache=True)
            step = bench_decode._decode_step(rxt, compiled)
            token, position = ids[:, -1:], torch.full((1, 1), ids.shape[1])
            logits[compiled] = step(token, position, cache)
    if "post_grad_fusion_options" in option:
        assert counters["inductor"]["decompose_addmm"] + counters["inductor"]["decompose_mm"] > 0
    torch.testing.assert_close(logits[True], logits[False], atol=1e-4, rtol=1e-4)


def test_decode_cpu_clock_needs_one_thread(capsys):
    """`--cpu-clock` measures the calling thread only: with more torch threads it is refused, naming the fix."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import bench_decode

    with pytest.raises(SystemExit):
        bench_decode.main(["--quick", "--static-only", "--cpu-clock", "--threads", "2"])
    assert "expected --threads 1, got --threads 2" in capsys.readouterr().err
