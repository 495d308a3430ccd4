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

from modeling_rxt import CACHE_KWARG


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
    update_ids: list[int]  # prompt + generated ids up to and including [EOS] (docs/spec.md#one-turn)


class Backend(Protocol):
    """What the engine and the server need from a model: its identity, tokenizer, per-interaction token limit,
    whether a turn reads the whole resent history (`reads_history`, stateless) or only the new prompt against the
    conversation's state; the state ↔ bytes; batched generation from several states; batched state updates."""

    model: object
    tokenizer: object
    model_id: str
    reads_history: bool
    max_tokens: int

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


def pack_state(state: torch.Tensor, name: str, model_id: str) -> bytes:
    """A conversation's state as safetensors bytes, with the model identity in the header (no pickle)."""
    identity = json.dumps({"format": f"rxt-serving-{name}", "model_id": model_id}, sort_keys=True)
    # one metadata key: safetensors writes a metadata map in no fixed order, and the bytes must be reproducible
    return save_safetensors({name: state.detach().contiguous().cpu()}, metadata={"rxt": identity})


def unpack_state(data: bytes, name: str, model_id: str) -> torch.Tensor:
    """The inverse of `pack_state`; a StateMismatchError names both models when another model wrote it."""
    try:
        header_length = int.from_bytes(data[:8], "little")
        metadata = json.loads(json.loads(data[8 : 8 + header_length])["__metadata__"]["rxt"])
    except (ValueError, KeyError, TypeError) as error:
        raise StateMismatchError(f"the stored state is not a '{name}' written by this server (no 'rxt' metadata in "
                                 "its safetensors header).") from error  # fmt: skip
    if metadata.get("model_id") != model_id:
        raise StateMismatchError(
            f"the stored state was written by model {metadata.get('model_id')!r}, but this server runs model "
            f"{model_id!r} (another checkpoint or config); it cannot be used with this model."
        )
    tensors = load_safetensors(data)
    if name not in tensors:
        raise StateMismatchError(f"the stored state holds {sorted(tensors)}, expected a '{name}' tensor.")
    return tensors[name]


def pad_rows(rows: list[list[int]], pad_id: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows → `ids [B, T]`, `mask [B, T]`, padded on the left or the right with `pad_id`."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):  # one copy per conversation, not per token
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def split_generations(prompts, output: torch.Tensor, prompt_width: int, limits, eos_ids) -> list[Generation]:
    """Per row: the answer ids (up to the first [EOS], or `limit` tokens), why it stopped, prompt + answer + [EOS]."""
    results = []
    for prompt, row, limit in zip(prompts, output[:, prompt_width:].tolist(), limits):
        row = row[:limit]
        stop = next((i for i, token in enumerate(row) if token in eos_ids), None)
        answer = row if stop is None else row[:stop]
        results.append(Generation(answer, "length" if stop is None else "stop",
                                  prompt + (row if stop is None else row[: stop + 1])))  # fmt: skip
    return results


def generate_kwargs(params: list[SamplingParams], prompt_width: int, on_token, eos_ids: set[int], pad_id: int,
                    device) -> dict:  # fmt: skip
    """`generate()` arguments for rows with their own sampling, length limit and token callback."""
    limits = [p.max_new_tokens for p in params]
    kwargs = {"do_sample": False}
    if any(p.temperature > 0 for p in params):
        kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0,
                  "logits_processor": LogitsProcessorList([_PerRowSampling(params, device)])}  # fmt: skip
    return {
        **kwargs,
        "max_new_tokens": max(limits),
        "stopping_criteria": StoppingCriteriaList([_PerRowLength(prompt_width, limits, device)]),
        "eos_token_id": sorted(eos_ids),
        "pad_token_id": pad_id,
        "streamer": _RowStreamer(on_token, limits, eos_ids),
    }


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

    reads_history = False

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
        return pack_state(state, "stm", self.model_id)

    def deserialize(self, data: bytes) -> torch.Tensor:
        stm = unpack_state(data, "stm", self.model_id)
        if stm.dim() != 4 or (stm.shape[0], stm.shape[2], stm.shape[3]) != self.stm_shape or stm.shape[1] != 1:
            raise StateMismatchError(
                f"the stored STM has shape {tuple(stm.shape)}, expected [L, 1, S, D] = "
                f"[{self.stm_shape[0]}, 1, {self.stm_shape[1]}, {self.stm_shape[2]}]."
            )
        return stm.to(device=self.device, dtype=self.dtype)

    # -- batched work -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, states, prompts, params, on_token) -> list[Generation]:
        from modeling_rxt import RxTCache

        input_ids, attention_mask = pad_rows(prompts, self.pad_id, left=True, device=self.device)  # [B, P]
        width = input_ids.shape[1]
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=RxTCache(stm=torch.cat(states, dim=1)),  # [L, B, S, D]: one STM per row
            **generate_kwargs(params, width, on_token, self.eos_ids, self.pad_id, self.device),
        )
        return split_generations(prompts, output, width, [p.max_new_tokens for p in params], self.eos_ids)

    @torch.no_grad()
    def update(self, states, interactions) -> list[torch.Tensor]:
        input_ids, attention_mask = pad_rows(interactions, self.pad_id, left=False, device=self.device)  # [B, T]
        new = self.model.update_memory(input_ids, attention_mask, torch.cat(states, dim=1))  # [L, B, S, D]
        return [new[:, i : i + 1].clone() for i in range(new.shape[1])]


class CausalLMBackend:
    """A stock decoder-only model (e.g. `LlamaForCausalLM`) served through the same engine, as the baselines of
    `scripts/bench_serve.py`.

    - `mode="history"`: stateless. The client resends the conversation and the prompt of every turn is all of it
      (`reads_history`), re-read from scratch — how `transformers serve` serves a chat model.
    - `mode="kv"`: the state of a conversation is its KV cache `[layers, 2, Hkv, T, hd]` (what prefix caching keeps
      at best). A turn decodes the new prompt after the cached KV; the state update after the reply extends the
      cache with the turn's prompt + answer (one forward over them against the cache, off the latency path).
    """

    def __init__(self, model, tokenizer, model_id: str, mode: str):
        if mode not in ("history", "kv"):
            raise ValueError(f"mode={mode!r}: expected 'history' or 'kv'.")
        self.model, self.tokenizer, self.model_id, self.mode = model.eval(), tokenizer, model_id, mode
        self.reads_history = mode == "history"
        config = model.config
        self.pad_id = config.pad_token_id or 0
        eos = config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @property
    def max_tokens(self) -> int:
        return self.model.config.max_position_embeddings

    def initial_state(self) -> torch.Tensor:
        return torch.zeros(self.layers, 2, self.kv_heads, 0, self.head_dim, dtype=self.dtype, device=self.device)

    def serialize(self, state: torch.Tensor) -> bytes:
        return pack_state(state, "kv", self.model_id)

    def deserialize(self, data: bytes) -> torch.Tensor:
        kv = unpack_state(data, "kv", self.model_id)
        expected = (self.layers, 2, self.kv_heads, self.head_dim)
        if kv.dim() != 5 or (kv.shape[0], kv.shape[1], kv.shape[2], kv.shape[4]) != expected:
            raise StateMismatchError(f"the stored KV cache has shape {tuple(kv.shape)}, expected [layers, 2, Hkv, T, "
                                     f"hd] = [{self.layers}, 2, {self.kv_heads}, T, {self.head_dim}].")  # fmt: skip
        return kv.to(device=self.device, dtype=self.dtype)

    def _cache(self, states: list[torch.Tensor]):
        """The rows' KV caches left-padded to the longest → (DynamicCache or None, past mask `[B, T]`)."""
        from transformers import DynamicCache

        width = max(state.shape[3] for state in states)
        mask = torch.zeros(len(states), width, dtype=torch.long, device=self.device)
        if width == 0:
            return None, mask
        padded = torch.zeros(self.layers, 2, len(states), self.kv_heads, width, self.head_dim, dtype=self.dtype,
                             device=self.device)  # fmt: skip
        for row, state in enumerate(states):  # one copy per conversation
            length = state.shape[3]
            padded[:, :, row, :, width - length :] = state
            mask[row, width - length :] = 1
        cache = DynamicCache()
        for layer in range(self.layers):
            cache.update(padded[layer, 0], padded[layer, 1], layer)  # [B, Hkv, T, hd]
        return cache, mask

    @torch.no_grad()
    def generate(self, states, prompts, params, on_token) -> list[Generation]:
        cache, past_mask = self._cache(states)
        prompt_ids, prompt_mask = pad_rows(prompts, self.pad_id, left=True, device=self.device)  # [B, P]
        past_ids = torch.full_like(past_mask, self.pad_id)  # stand-ins for the cached tokens (not read)
        input_ids = torch.cat([past_ids, prompt_ids], dim=1)  # [B, T + P]
        attention_mask = torch.cat([past_mask, prompt_mask], dim=1)
        width = input_ids.shape[1]
        kwargs = {CACHE_KWARG: cache} if cache is not None else {}
        output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                     **generate_kwargs(params, width, on_token, self.eos_ids, self.pad_id, self.device),
                                     **kwargs)  # fmt: skip
        return split_generations(prompts, output, width, [p.max_new_tokens for p in params], self.eos_ids)

    @torch.no_grad()
    def update(self, states, interactions) -> list[torch.Tensor]:
        if self.reads_history:
            return states
        cache, past_mask = self._cache(states)
        new_ids, new_mask = pad_rows(interactions, self.pad_id, left=True, device=self.device)  # [B, N]
        mask = torch.cat([past_mask, new_mask], dim=1)  # [B, T + N]
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, past_mask.shape[1] :]  # [B, N]
        output = self.model(input_ids=new_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            **({CACHE_KWARG: cache} if cache is not None else {}))  # fmt: skip
        layers = getattr(output, CACHE_KWARG).layers
        kv = torch.stack([torch.stack([layer.keys, layer.values]) for layer in layers])  # [layers, 2, B, H, T+N, hd]
        keep = mask.bool()
        return [kv[:, :, row][:, :, :, keep[row]].contiguous() for row in range(len(states))]


def load_backend(model_dir: str, device: str = "cpu", dtype: str | None = None, baseline_mode: str = "kv"):
    """Load a checkpoint folder (model + tokenizer) for serving: an RxT model → `RxTBackend`; another causal LM
    (e.g. Llama, the benchmark baselines) → `CausalLMBackend(mode=baseline_mode)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_rxt  # noqa: F401  (registers the RxT Auto classes)

    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    weights = sorted(Path(model_dir).glob("*.safetensors"))
    identity = model_fingerprint(model.config.to_dict(), weights)
    if model.config.model_type == "rxt":
        return RxTBackend(model, tokenizer, identity)
    return CausalLMBackend(model, tokenizer, identity, baseline_mode)


def load_rxt_backend(model_dir: str, device: str = "cpu", dtype: str | None = None) -> RxTBackend:
    """Load an RxT checkpoint folder (model + tokenizer) for serving."""
    backend = load_backend(model_dir, device, dtype)
    if not isinstance(backend, RxTBackend):
        raise TypeError(f"{model_dir} holds a {type(backend.model).__name__}, expected an RxT model.")
    return backend


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
