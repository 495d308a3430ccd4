"""Conversation orchestration between the HTTP layer, the engine and the store.

A turn of conversation C: wait until C's recorded turns are all written into memory (its own background update in
this process, or — recorded by another replica or before a crash — re-applied here from the recorded ids), decode
the new prompt against C's STM (batched with other conversations by the engine), record the turn with its memory
update pending (compare-and-set on the turn number), answer, then update the memory in the background. Turns of one
conversation run in order (a per-conversation lock in this process, the store's compare-and-set across processes);
different conversations never wait on each other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np

from modeling_rxt.tokenization_rxt import (
    RXT_TEMPLATES,
    render_interaction,
    render_query,
    render_system,
    render_turn_prompt,
)

from .engine import Engine, Generation, RxTBackend, SamplingParams, StateMismatchError
from .metrics import Metrics
from .protocol import ApiError, new_id, not_found
from .store import ConflictError, ConversationRow, ItemRow, Store, TurnRecord

logger = logging.getLogger("serving")


@dataclass
class Limits:
    """Request limits (all enforced with a 400 naming the limit, except `max_queue`: 429)."""

    max_body_bytes: int = 1 << 20
    max_output_tokens: int = 256
    max_input_items: int = 256
    max_turns_in_flight: int = 256  # admitted turns (decoding or waiting for their conversation); beyond → 429
    max_batch_size: int = 16


@dataclass
class Interaction:
    """One memory write: its token ids and the transcript items (id, role, text) it adds."""

    ids: list[int]
    items: list[tuple[str, str, str]]


class StaleTurn(Exception):
    """The conversation moved past the turn a request continues from (it is at `turn` now)."""

    def __init__(self, turn: int):
        super().__init__(f"the conversation is at turn {turn}")
        self.turn = turn


def ids_to_bytes(ids: list[int]) -> bytes:
    return np.asarray(ids, dtype="<i4").tobytes()


def bytes_to_ids(data: bytes) -> list[int]:
    return np.frombuffer(data, dtype="<i4").tolist()


class Service:
    def __init__(self, backend: RxTBackend, engine: Engine, store: Store, metrics: Metrics, limits: Limits,
                 model_name: str, state_cache_bytes: int = 1 << 30):  # fmt: skip
        self.backend, self.engine, self.store, self.metrics, self.limits = backend, engine, store, metrics, limits
        self.model_name = model_name
        self.tokenizer = backend.tokenizer
        config = backend.model.config
        self.system_template = getattr(config, "system_template", None) or RXT_TEMPLATES["system_alpha"]
        self.system_title = getattr(config, "system_prompt_title", None) or "SYSTEM INSTRUCTIONS"
        self.has_internal = getattr(config, "internal_token_id", None) is not None
        self._locks: dict[str, list] = {}  # conversation id → [lock, users]
        self._pending: dict[str, asyncio.Task] = {}
        self._states: OrderedDict[str, tuple[int, object]] = OrderedDict()  # conversation → (version, STM) LRU
        self._state_cache_bytes = state_cache_bytes  # STMs kept in memory (saves reading the latest from the store)
        self._cached_bytes = 0
        self.in_flight = 0
        self._initial_bytes = backend.serialize(backend.initial_state())

    # -- helpers --------------------------------------------------------------------------------------------------
    async def db(self, op: str, fn: Callable, *args):
        start = time.perf_counter()
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            self.metrics.store_latency.labels(op).observe(time.perf_counter() - start)

    @asynccontextmanager
    async def _lock(self, conversation_id: str):
        entry = self._locks.setdefault(conversation_id, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                self._locks.pop(conversation_id, None)

    def enter(self) -> None:
        """Bounded admission: beyond `max_turns_in_flight` turns the server answers 429 with Retry-After. Pair with
        `leave()` when the turn is over."""
        if self.in_flight >= self.limits.max_turns_in_flight:
            self.metrics.rejected.inc()
            raise ApiError(429, f"The server is at its limit of {self.limits.max_turns_in_flight} turns in flight; "
                           "retry after the time in the Retry-After header.", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"})  # fmt: skip
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)

    def leave(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _remember(self, conversation_id: str, version: int, stm) -> None:
        previous = self._states.pop(conversation_id, None)
        if previous is not None:
            self._cached_bytes -= previous[1].nbytes
        self._states[conversation_id] = (version, stm)
        self._cached_bytes += stm.nbytes
        while self._cached_bytes > self._state_cache_bytes and self._states:
            self._cached_bytes -= self._states.popitem(last=False)[1][1].nbytes

    def check_model(self, conversation: ConversationRow) -> None:
        if conversation.model_id != self.backend.model_id:
            raise ApiError(409, f"Conversation '{conversation.id}' holds memory written by model "
                           f"{conversation.model_id!r}; this server runs model {self.backend.model_id!r} (another "
                           "checkpoint or config), which cannot read it.", param="conversation",
                           code="model_mismatch")  # fmt: skip

    async def _load_state(self, conversation_id: str, version: int):
        cached = self._states.get(conversation_id)
        if cached is not None and cached[0] == version:
            return cached[1]
        data = await self.db("get_snapshot", self.store.get_snapshot, conversation_id, version)
        if data is None:
            raise ApiError(409, f"The memory of conversation '{conversation_id}' at turn {version} is no longer "
                           "stored.", code="snapshot_unavailable")  # fmt: skip
        try:
            stm = await asyncio.to_thread(self.backend.deserialize, data)
        except StateMismatchError as error:
            raise ApiError(409, f"Conversation '{conversation_id}': {error}", code="model_mismatch") from error
        self._remember(conversation_id, version, stm)
        return stm

    # -- memory: pending updates ---------------------------------------------------------------------------------
    async def apply_pending(self, conversation_id: str) -> None:
        """Write every recorded-but-unapplied turn of the conversation into memory, in order. Idempotent: a turn
        another process applied first is skipped (the store's compare-and-set)."""
        while True:
            version, turns = await self.db("pending_turns", self.store.pending_turns, conversation_id)
            if not turns:
                return
            stm = await self._load_state(conversation_id, version)
            for offset, blob in enumerate(turns):
                started = time.perf_counter()
                new = await asyncio.wrap_future(self.engine.submit_update(stm, bytes_to_ids(blob)))
                data = await asyncio.to_thread(self.backend.serialize, new)
                applied = await self.db("apply_turn", self.store.apply_turn, conversation_id, version + offset, data)
                if not applied:  # applied elsewhere (another replica): re-read where the memory is
                    break
                stm = new
                self._remember(conversation_id, version + offset + 1, new)
                self.metrics.update_lag.observe(time.perf_counter() - started)

    def _schedule(self, conversation_id: str) -> None:
        previous = self._pending.get(conversation_id)

        async def run():
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            try:
                await self.apply_pending(conversation_id)
            except Exception:  # the turn is recorded: the next turn (or a restart) re-applies it
                logger.exception("memory update of conversation %s failed; it stays pending", conversation_id)
            finally:
                if self._pending.get(conversation_id) is task:
                    del self._pending[conversation_id]

        task = asyncio.get_running_loop().create_task(run())
        self._pending[conversation_id] = task

    async def recover(self) -> int:
        """At start-up: re-apply the memory updates of turns recorded before a crash. Returns how many
        conversations had pending turns."""
        pending = await self.db("pending_conversations", self.store.pending_conversations)
        for conversation_id in pending:
            self._schedule(conversation_id)
        return len(pending)

    async def wait_idle(self) -> None:
        """Finish every pending memory update of this process (graceful shutdown)."""
        while self._pending:
            self.engine.expedite()
            await asyncio.gather(*list(self._pending.values()), return_exceptions=True)

    async def current_state(self, conversation_id: str) -> tuple[int, object]:
        """(turn number, STM) once every recorded turn of the conversation is in memory."""
        started = time.perf_counter()
        task = self._pending.get(conversation_id)
        if task is not None:
            self.engine.expedite()
            await asyncio.shield(task)
        conversation = await self.db("get_conversation", self.store.get_conversation, conversation_id)
        if conversation is None:
            raise not_found("conversation", conversation_id)
        waited = task is not None or conversation.pending > 0
        if conversation.pending:  # recorded by another replica, or before a crash
            self.engine.expedite()
            await self.apply_pending(conversation_id)
            conversation = await self.db("get_conversation", self.store.get_conversation, conversation_id)
        self.metrics.update_wait.observe(time.perf_counter() - started if waited else 0.0)
        return conversation.version, await self._load_state(conversation_id, conversation.version)

    # -- rendering ------------------------------------------------------------------------------------------------
    def interactions(self, messages: list[tuple[str, str]]) -> list[Interaction]:
        """Messages (role, text) → memory writes: a system / developer message is rendered with the model's system
        template; a user message with the assistant message after it is one interaction `[BOS][Q]q[A]a[EOS]`; a
        lone user (assistant) message is an interaction with an empty answer (query)."""
        out, i = [], 0
        while i < len(messages):
            role, text = messages[i]
            item = (new_id("msg"), role, text)
            if role in ("system", "developer"):
                out.append(Interaction(self.tokenize(render_system(text, self.system_template, self.system_title)), [item]))
                i += 1
            elif role == "user" and i + 1 < len(messages) and messages[i + 1][0] == "assistant":
                answer = messages[i + 1][1]
                out.append(Interaction(self.tokenize(render_interaction(text, answer)),
                                       [item, (new_id("msg"), "assistant", answer)]))  # fmt: skip
                i += 2
            else:
                query, answer = (text, "") if role == "user" else ("", text)
                out.append(Interaction(self.tokenize(render_interaction(query, answer)), [item]))
                i += 1
        for interaction in out:
            self.check_length(len(interaction.ids), 0, "input")
        return out

    def prompt_ids(self, text: str, internal: str | None = None) -> list[int]:
        if internal is not None:
            if not self.has_internal:
                raise ApiError(400, "instructions on a continued conversation need a model whose tokenizer has the "
                               "[I] (internal instruction) token; this model's has none. Instructions of the first "
                               "request of a conversation are written into its memory.", param="instructions",
                               code="unsupported_parameter")  # fmt: skip
            return self.tokenize(render_turn_prompt(text, "query", internal) + "[A]")
        return self.tokenize(render_query(text))

    def history_prompt(self, messages: list[tuple[str, str]]) -> list[int]:
        """A stateless backend's prompt: the whole conversation with the tokenizer's chat template."""
        text = self.tokenizer.apply_chat_template([{"role": role, "content": content} for role, content in messages],
                                                  add_generation_prompt=True, tokenize=False)  # fmt: skip
        return self.tokenize(text)

    def stateless_request(self, param: str) -> ApiError:
        return ApiError(400, "This server's model keeps no conversation state (it re-reads the history): send the "
                        "whole conversation instead of a conversation or previous_response_id.", param=param,
                        code="unsupported_parameter")  # fmt: skip

    def check_length(self, prompt_tokens: int, max_output_tokens: int, param: str) -> None:
        limit = self.backend.max_tokens
        if prompt_tokens + max_output_tokens > limit:
            raise ApiError(400, f"The {param} is {prompt_tokens} tokens" + (
                f" and max_output_tokens is {max_output_tokens}" if max_output_tokens else "") +
                f"; the model's limit is {limit} tokens per interaction (prompt + answer).", param=param,
                code="context_length_exceeded")  # fmt: skip

    def sampling(self, max_output_tokens: int | None, temperature: float | None, top_p: float | None,
                 prompt_tokens: int, param: str = "max_output_tokens") -> SamplingParams:  # fmt: skip
        limit = self.limits.max_output_tokens
        if max_output_tokens is not None and max_output_tokens > limit:
            raise ApiError(400, f"{param}={max_output_tokens} exceeds this server's limit of {limit} tokens.",
                           param=param, code="max_output_tokens_exceeded")  # fmt: skip
        if max_output_tokens is None:
            max_output_tokens = max(1, min(limit, self.backend.max_tokens - prompt_tokens))
        self.check_length(prompt_tokens, max_output_tokens, "input")
        return SamplingParams(max_output_tokens, 1.0 if temperature is None else temperature,
                              1.0 if top_p is None else top_p)  # fmt: skip

    # -- conversations ------------------------------------------------------------------------------------------
    async def create_conversation(self, owner: str, metadata: dict, items: list[ItemRow] = (),
                                  stm: bytes | None = None) -> ConversationRow:  # fmt: skip
        return await self.db("create_conversation", self.store.create_conversation, new_id("conv"), owner,
                             self.backend.model_id, metadata, stm or self._initial_bytes, list(items))  # fmt: skip

    async def fork(self, owner: str, conversation: ConversationRow, turn_index: int, metadata: dict) -> ConversationRow:
        """A new conversation starting from the STM after turn `turn_index` of `conversation`, with its transcript
        up to that turn."""
        await self.current_state(conversation.id)
        data = await self.db("get_snapshot", self.store.get_snapshot, conversation.id, turn_index + 1)
        if data is None:
            kept = await self.db("snapshot_versions", self.store.snapshot_versions, conversation.id)
            raise ApiError(409, f"Cannot continue from this response: the memory after its turn {turn_index + 1} of "
                           f"conversation '{conversation.id}' is no longer stored (this server keeps the last "
                           f"{self.store.keep_snapshots} snapshots per conversation, --keep-snapshots; stored turns: "
                           f"{kept}).", param="previous_response_id", code="snapshot_unavailable")  # fmt: skip
        items = await self.db("list_items", self.store.list_items, conversation.id, None, 1 << 30, False, turn_index)
        copies = [ItemRow(new_id("msg"), "", 0, -1, item.role, item.content, item.created_at) for item in items]
        return await self.create_conversation(owner, metadata, copies, data)

    async def _record(self, conversation_id: str, version: int, turns: list[TurnRecord], kind: str) -> None:
        try:
            await self.db("record_turns", self.store.record_turns, conversation_id, version, turns)
        except ConflictError as error:
            raise ApiError(409, str(error), code="conflict") from error
        self.metrics.turns.labels(kind).inc(len(turns))
        self._schedule(conversation_id)

    async def write(self, conversation_id: str, interactions: list[Interaction]) -> None:
        """Record memory writes (no generation); the memory is updated in the background."""
        async with self._lock(conversation_id):
            version, _ = await self.current_state(conversation_id)
            await self._record(conversation_id, version, [TurnRecord(ids_to_bytes(i.ids), i.items) for i in interactions],
                               "write")  # fmt: skip

    async def turn(self, conversation_id: str | None, writes: list[Interaction], prompt: list[int],
                   params: SamplingParams, on_token: Callable[[int], None],
                   finish: Callable[[Generation, int], TurnRecord] | None, state=None,
                   expected_turn: int | None = None) -> Generation:  # fmt: skip
        """One generated turn. `conversation_id` None: an unrecorded turn from `state` (default: the initial STM);
        with `finish` None: an unrecorded turn from the conversation's memory. Otherwise `writes` are recorded into
        the conversation first, the reply is generated from its memory, and `finish(generation, turn_index)` builds
        the record (response + items) stored before the memory update. `expected_turn`: raise `StaleTurn` unless the
        conversation is at that turn (a previous_response_id that another request has continued meanwhile)."""
        if conversation_id is None or finish is None:
            if conversation_id is not None:
                _, state = await self.current_state(conversation_id)
            stm = state if state is not None else self.backend.initial_state()
            for write in writes:
                stm = await asyncio.wrap_future(self.engine.submit_update(stm, write.ids))
            return await asyncio.wrap_future(self.engine.submit_generate(stm, prompt, params, on_token))
        async with self._lock(conversation_id):
            version, stm = await self.current_state(conversation_id)
            if expected_turn is not None and version != expected_turn:
                raise StaleTurn(version)
            if writes:
                await self._record(conversation_id, version, [TurnRecord(ids_to_bytes(w.ids), w.items) for w in writes],
                                   "write")  # fmt: skip
                version, stm = await self.current_state(conversation_id)
            generation = await asyncio.wrap_future(self.engine.submit_generate(stm, prompt, params, on_token))
            self.metrics.tokens.inc(len(generation.answer_ids))
            record = finish(generation, version)
            record.interaction = ids_to_bytes(generation.update_ids)
            await self._record(conversation_id, version, [record], "generate")
        return generation
