"""Shared test set-up: offline hub, repo root and scripts/ importable, fixture paths."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny models: one thread is faster than two and immune to the other core being busy.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
if str(REPO_ROOT / "scripts") not in sys.path:
    sys.path.append(str(REPO_ROOT / "scripts"))  # the CLIs (quickstart, train_smat, ...) import as modules; last, so
    # they never shadow a package

FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "reference"


@pytest.fixture(autouse=True)
def _torch_threads_per_test():
    """Every test starts with the suite's one torch thread, whatever an earlier test's in-process script set (the
    quickstart sets its preset's count): results compared bit for bit with a 1-thread server differ in the last bits
    at 2 threads on some CPUs."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny saved RxT checkpoint (`serving_support.make_model_dir`), one per test module (serving tests)."""
    from serving_support import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("rxt_model"))


@pytest.fixture(scope="module")
def ref(model_dir):
    """A separate copy of the `model_dir` model to compute what the server should have done (serving tests)."""
    from serving import load_rxt_backend

    return load_rxt_backend(str(model_dir))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        raise FileNotFoundError(f"reference fixtures not found at {FIXTURES} (expected ../shared beside the repo)")
    return FIXTURES


# Two-process CPU DDP tests (gloo): a script = DDP_PREAMBLE + its own body + DDP_EPILOGUE, started by run_torchrun.
DDP_PREAMBLE = r"""
import hashlib, json, os, sys, torch
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from datasets import Dataset
from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.tokenization_rxt import train_rxt_tokenizer, check_rxt_tokenizer
from trainers.synthetic import generate_dialogues, generate_pretrain
torch.set_num_threads(1)
tok = train_rxt_tokenizer([r["text"] for r in generate_pretrain(200, seed=3)], vocab_size=400, min_frequency=1)
ids = {k: v for k, v in check_rxt_tokenizer(tok).items() if v is not None}
torch.manual_seed(0)
"""

DDP_EPILOGUE = r"""
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # all checks are done: skip interpreter teardown, where gloo once aborted ("terminate called without an active exception")
"""


def run_torchrun(
    body: str, tmp_path: Path, master_port: int, timeout: float = 300
) -> tuple[subprocess.CompletedProcess, Path]:
    """Run `DDP_PREAMBLE + body + DDP_EPILOGUE` in 2 CPU processes within `timeout` seconds; argv: repo root, an output
    folder (returned)."""
    script, out = tmp_path / "ddp_script.py", tmp_path / "out"
    script.write_text(DDP_PREAMBLE + body + DDP_EPILOGUE)
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(master_port), str(script), str(REPO_ROOT), str(out)]  # fmt: skip
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, out


# A tiny RxT and its tokenizer (module scope): the default `tokenizer` / `model` of the chat-session tests; a test
# module that needs other ones defines its own fixtures of these names.
@pytest.fixture(scope="module")
def tokenizer():
    from modeling_rxt.tokenization_rxt import train_rxt_tokenizer

    texts = [f"my name is alice {i} and i live in paris number {i * 7}" for i in range(200)]
    return train_rxt_tokenizer(texts, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def model(tokenizer):
    from modeling_rxt import RxTConfig, RxTForCausalLM

    torch.manual_seed(0)
    return RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tokenizer))).eval()
