"""Helpers of the serving tests: a tiny saved RxT checkpoint (the `model_dir` / `ref` fixtures over it are in
conftest.py), a live uvicorn server in a thread or in a subprocess (127.0.0.1, free port), and reading a
conversation's STM back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import load as load_safetensors

from pg_fixture import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
GREEDY = {"temperature": 0, "max_output_tokens": 6}


def make_model_dir(path: Path, seed: int = 0) -> Path:
    """A tiny RxT model + tokenizer saved with save_pretrained (what `python -m serving` loads)."""
    from modeling_rxt import RxTConfig, RxTForCausalLM
    from modeling_rxt.tokenization_rxt import train_rxt_tokenizer

    texts = [f"my name is alice {i} and i live in paris number {i * 7}" for i in range(200)]
    tokenizer = train_rxt_tokenizer(texts, vocab_size=300, min_frequency=1)
    torch.manual_seed(seed)
    model = RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tokenizer))).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class ThreadServer:
    """`create_app(...)` served by uvicorn in a thread of the test process."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-thread server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


class ProcessServer:
    """`python -m serving MODEL_DIR --db DB --port P ...` in a subprocess."""

    def __init__(self, model_dir: Path, db: str, *args: str, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        command = [sys.executable, "-m", "serving", str(model_dir), "--db", db, "--port", str(self.port),
                   "--threads", "1", "--log-level", "warning", *args]  # fmt: skip
        self.log = log
        self.output = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - open for the process lifetime
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=self.output, stderr=self.output)

    def wait_ready(self, timeout: float = 120) -> ProcessServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log.read_text()[-3000:] if self.log else ""
                raise RuntimeError(f"server exited with {self.process.returncode}: {tail}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server on {self.url} not ready after {timeout} s")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.output is not subprocess.DEVNULL:
            self.output.close()
        return self.process.returncode

    def kill9(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        if self.output is not subprocess.DEVNULL:
            self.output.close()


def read_memory(url: str, conversation_id: str, api_key: str | None = None) -> tuple[bytes, int]:
    """The conversation's current STM (safetensors bytes) and its turn number, via the memory endpoint."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{url}/v1/conversations/{conversation_id}/memory", headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.content, int(response.headers["X-Memory-Turn"])


def stm_of(data: bytes) -> torch.Tensor:
    return load_safetensors(data)["stm"]
