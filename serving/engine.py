"""The batching scheduler (`Engine`) and the model backends it drives.

A backend is the model-specific part of serving: a conversation's state (RxT: its STM `[L, 1, S, D]`), batched
generation from several states at once, and a batched state update (RxT: the memory update of several
conversations' interactions). `Engine` owns one worker thread that runs the model: it takes every waiting generation
request (up to `max_batch_size`) and decodes them together, each row with its own state, then runs the waiting state
updates of several conversations as one batch. Replies come first; updates run when no reply is waiting, when a turn
needs one (`expedite`), or when `update_delay` has passed.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer


class StateMismatchError(ValueError):
    """A stored state was written by another model or config than the one this server runs."""


@dataclass
class SamplingParams:
    """Per-request sampling: `temperature == 0` is greedy decoding."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Generation:
    """One row's result: the answer ids (without `[EOS]`), why it stopped, and the ids its state update reads."""

    answer_ids: list[int]
    finish_reason: str  # "stop" ([EOS]) or "length" (max_new_tokens)
    update_ids: list[int]  # prompt + generated ids up to and including [EOS] (§13.3)


class Backend(Protocol):
    model_id: str

    def initial_state(self) -> torch.Tensor: ...

    def serialize(self, state: torch.Tensor) -> bytes: ...

    def deserialize(self, data: bytes) -> torch.Tensor: ...

    def generate(self, states: list[torch.Tensor], prompts: list[list[int]], params: list[SamplingParams],
                 on_token: Callable[[int, int], None]) -> list[Generation]: ...  # fmt: skip

    def update(self, states: list[torch.Tensor], interactions: list[list[int]]) -> list[torch.Tensor]: ...


def model_fingerprint(config_dict: dict, weight_files: list[Path]) -> str:
    """sha256 of the model's config (without bookkeeping keys) and of its weight files: the identity stored with every
    STM, so that an STM written by another model or config is refused."""
    digest = hashlib.sha256()
    config = {k: v for k, v in config_dict.items() if k not in ("transformers_version", "_name_or_path", "dtype")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for path in sorted(weight_files):
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:32]


class _PerRowSampling(LogitsProcessor):
    """Per-row temperature / top-p; greedy rows (temperature 0) keep only their argmax (sampling it is the argmax)."""

    def __init__(self, params: list[SamplingParams], device):
        self.temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]  # [B, 1]
        self.top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]  # [B, 1]
        self.greedy = self.temperature == 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores / torch.where(self.greedy, torch.ones_like(self.temperature), self.temperature)
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = (cumulative - sorted_scores.softmax(dim=-1)) >= self.top_p  # keep the smallest set reaching top_p
        remove[:, 0] = False
        remove |= self.greedy & (torch.arange(scores.shape[-1], device=scores.device) > 0)  # greedy: argmax only
        return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


class _PerRowLength(StoppingCriteria):
    """Row `i` stops after `limits[i]` generated tokens."""

    def __init__(self, prompt_length: int, limits: list[int], device):
        self.prompt_length, self.limits = prompt_length, torch.tensor(limits, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return self.limits <= (input_ids.shape[1] - self.prompt_length)


class _RowStreamer(BaseStreamer):
    """Hands each row's new token to `on_token(row, token)` while the row is unfinished."""

    def __init__(self, on_token: Callable[[int, int], None], limits: list[int], eos: set[int]):
        self.on_token, self.limits, self.eos = on_token, limits, eos
        self.counts = [0] * len(limits)
        self.done = [False] * len(limits)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call is the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            self.counts[row] += 1
            self.done[row] = token in self.eos or self.counts[row] >= self.limits[row]
            if token not in self.eos:
                self.on_token(row, token)

    def end(self) -> None:
        pass


class RxTBackend:
    """RxT: the state is the conversation's STM `[L, 1, S, D]`; a turn decodes only the new prompt against it."""

    def __init__(self, model, tokenizer, model_id: str):
        self.model, self.tokenizer, self.model_id = model.eval(), tokenizer, model_id
        config = model.config
        self.pad_id = config.pad_token_id or 0
        eos = config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.stm_shape = tuple(config.stm_shape)
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype

    @property
    def max_tokens(self) -> int:
        """Token limit of one interaction (prompt + answer): the decoder's `seq_len`."""
        return self.model.config.decoder_config.seq_len

    def initial_state(self) -> torch.Tensor:
        return self.model.initial_stm(1)

    # -- state <-> bytes (safetensors; dtype kept; no pickle) -----------------------------------------------------
    def serialize(self, state: torch.Tensor) -> bytes:
        identity = json.dumps({"format": "rxt-stm", "model_id": self.model_id}, sort_keys=True)
        # one metadata key: safetensors writes a metadata map in no fixed order, and the bytes must be reproducible
        return save_safetensors({"stm": state.detach().contiguous().cpu()}, metadata={"rxt": identity})

    def deserialize(self, data: bytes) -> torch.Tensor:
        header_length = int.from_bytes(data[:8], "little")
        try:
            metadata = json.loads(json.loads(data[8 : 8 + header_length])["__metadata__"]["rxt"])
        except (ValueError, KeyError, TypeError) as error:
            raise StateMismatchError("the stored state is not an RxT STM written by this server (no 'rxt' "
                                     "metadata in its safetensors header).") from error
        if metadata.get("model_id") != self.model_id:
            raise StateMismatchError(
                f"the stored STM was written by model {metadata.get('model_id')!r}, but this server runs model "
                f"{self.model_id!r} (another checkpoint or config); it cannot be used with this model."
            )
        stm = load_safetensors(data)["stm"]
        if stm.dim() != 4 or (stm.shape[0], stm.shape[2], stm.shape[3]) != self.stm_shape or stm.shape[1] != 1:
            raise StateMismatchError(
                f"the stored STM has shape {tuple(stm.shape)}, expected [L, 1, S, D] = "
                f"[{self.stm_shape[0]}, 1, {self.stm_shape[1]}, {self.stm_shape[2]}]."
            )
        return stm.to(device=self.device, dtype=self.dtype)

    # -- batched work -------------------------------------------------------------------------------------------
    def _pad(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # one copy per conversation, not per token
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span], mask[i, span] = torch.tensor(row), 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def generate(self, states, prompts, params, on_token) -> list[Generation]:
        from modeling_rxt import RxTCache

        input_ids, attention_mask = self._pad(prompts, left=True)  # [B, P], left-padded
        limits = [p.max_new_tokens for p in params]
        sample = any(p.temperature > 0 for p in params)
        kwargs = {"do_sample": False}
        if sample:
            kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0,
                      "logits_processor": LogitsProcessorList([_PerRowSampling(params, self.device)])}  # fmt: skip
        streamer = _RowStreamer(on_token, limits, self.eos_ids)
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=RxTCache(stm=torch.cat(states, dim=1)),  # [L, B, S, D]: one STM per row
            max_new_tokens=max(limits),
            stopping_criteria=StoppingCriteriaList([_PerRowLength(input_ids.shape[1], limits, self.device)]),
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            streamer=streamer,
            **kwargs,
        )
        generated = output[:, input_ids.shape[1] :].tolist()
        results = []
        for prompt, row, limit in zip(prompts, generated, limits):
            row = row[:limit]
            stop = next((i for i, token in enumerate(row) if token in self.eos_ids), None)
            answer = row if stop is None else row[:stop]
            update = prompt + (row if stop is None else row[: stop + 1])
            results.append(Generation(answer, "length" if stop is None else "stop", update))
        return results

    @torch.no_grad()
    def update(self, states, interactions) -> list[torch.Tensor]:
        input_ids, attention_mask = self._pad(interactions, left=False)  # [B, T], right-padded
        new = self.model.update_memory(input_ids, attention_mask, torch.cat(states, dim=1))  # [L, B, S, D]
        return [new[:, i : i + 1].clone() for i in range(new.shape[1])]


def load_rxt_backend(model_dir: str, device: str = "cpu", dtype: str | None = None) -> RxTBackend:
    """Load an RxT checkpoint folder (model + tokenizer) for serving."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_rxt  # noqa: F401  (registers the RxT Auto classes)

    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    weights = sorted(Path(model_dir).glob("*.safetensors"))
    identity = model_fingerprint(model.config.to_dict(), weights)
    return RxTBackend(model, tokenizer, identity)


# ---------------------------------------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _Job:
    state: torch.Tensor
    ids: list[int]
    future: Future
    params: SamplingParams | None = None
    on_token: Callable[[int], None] | None = None
    enqueued_at: float = field(default_factory=time.monotonic)


class Engine:
    """One worker thread runs the model; generation and state updates of several conversations run batched.

    Parameters:
        backend: the model backend (`RxTBackend`).
        max_batch_size: most rows of one generate / update batch.
        update_delay: seconds a state update may wait to join a larger batch while replies are being generated
            (0: run it as soon as no reply is waiting); a turn that needs the update runs it at once (`expedite`).
        metrics: a `serving.metrics.Metrics` (batch sizes, queue depth), optional.
    """

    def __init__(self, backend: Backend, max_batch_size: int = 16, update_delay: float = 0.0, metrics=None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: expected >= 1.")
        self.backend, self.max_batch_size, self.update_delay, self.metrics = backend, max_batch_size, update_delay, metrics
        self._generate: deque[_Job] = deque()
        self._update: deque[_Job] = deque()
        self._expedite = False
        self._condition = threading.Condition()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="rxt-engine", daemon=True)
        self._thread.start()

    # -- submission (any thread) ----------------------------------------------------------------------------------
    def submit_generate(self, state, prompt_ids: list[int], params: SamplingParams,
                        on_token: Callable[[int], None]) -> Future:  # fmt: skip
        job = _Job(state, prompt_ids, Future(), params, on_token)
        with self._condition:
            self._generate.append(job)
            self._report_depth()
            self._condition.notify()
        return job.future

    def submit_update(self, state, interaction_ids: list[int]) -> Future:
        job = _Job(state, interaction_ids, Future())
        with self._condition:
            self._update.append(job)
            self._report_depth()
            self._condition.notify()
        return job.future

    def expedite(self) -> None:
        """A turn is waiting for a state update: run the waiting updates before the next generate batch."""
        with self._condition:
            self._expedite = True
            self._condition.notify()

    def queue_depth(self) -> int:
        return len(self._generate) + len(self._update)

    def close(self) -> None:
        with self._condition:
            self._running = False
            self._condition.notify()
        self._thread.join(timeout=30)

    # -- worker ---------------------------------------------------------------------------------------------------
    def _report_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels("generate").set(len(self._generate))
            self.metrics.queue_depth.labels("update").set(len(self._update))

    def _updates_due(self) -> bool:
        waited = time.monotonic() - self._update[0].enqueued_at
        return self.update_delay <= 0 or len(self._update) >= self.max_batch_size or waited >= self.update_delay

    def _take(self) -> tuple[str, list[_Job]] | None:
        """Under the lock: the next batch to run (replies first), or None."""
        if self._update and (self._expedite or not self._generate and self._updates_due()):
            queue, kind = self._update, "update"
        elif self._generate:
            queue, kind = self._generate, "generate"
        else:
            return None
        batch = [queue.popleft() for _ in range(min(len(queue), self.max_batch_size))]
        self._expedite = self._expedite and bool(self._update)  # expedited until the waiting updates have run
        self._report_depth()
        return kind, batch

    def _loop(self) -> None:
        while True:
            with self._condition:
                taken = self._take()
                while taken is None and self._running:
                    timeout = None
                    if self._update:
                        timeout = max(0.0, self.update_delay - (time.monotonic() - self._update[0].enqueued_at))
                    self._condition.wait(timeout)
                    taken = self._take()
                if taken is None:
                    return
            kind, batch = taken
            if self.metrics is not None:
                self.metrics.batch_size.labels(kind).observe(len(batch))
            try:
                if kind == "generate":
                    results = self.backend.generate([j.state for j in batch], [j.ids for j in batch],
                                                    [j.params for j in batch],
                                                    lambda row, token, jobs=batch: jobs[row].on_token(token))  # fmt: skip
                else:
                    results = self.backend.update([j.state for j in batch], [j.ids for j in batch])
            except Exception as error:  # noqa: BLE001 - every job of the batch fails with it; the worker goes on
                for job in batch:
                    job.future.set_exception(error)
                continue
            for job, result in zip(batch, results):
                job.future.set_result(result)
