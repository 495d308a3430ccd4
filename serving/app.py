"""The FastAPI app: OpenAI-compatible Responses, Conversations and Chat Completions endpoints over `Service`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Backend, Engine, Generation
from .metrics import Metrics
from .protocol import (
    ApiError,
    ChatCompletionCreate,
    ConversationCreate,
    ConversationUpdate,
    ItemsCreate,
    ResponseCreate,
    chat_chunk,
    chat_completion,
    conversation_object,
    item_list,
    message_item,
    new_id,
    not_found,
    response_object,
    response_usage,
)
from .service import Interaction, Limits, Service, StaleTurn
from .store import ConversationRow, Store, TurnRecord

CONVERSATION_HEADER = "X-Conversation-Id"


@dataclass
class Target:
    """Where a turn runs: a conversation to record it in (None: unrecorded, from `state` or the initial STM);
    `parent` = (conversation, turn index) when it continues a previous_response_id at the head of its conversation
    (if another request continues that response first, this turn forks from it); `fresh`: a new conversation."""

    conversation: ConversationRow | None
    metadata: dict
    state: object = None
    parent: tuple[ConversationRow, int] | None = None
    fresh: bool = False


class _Feed:
    """Tokens of one turn, handed from the engine thread to the event loop, decoded incrementally."""

    def __init__(self, service: Service, started: float, endpoint: str):
        self.loop, self.service, self.started, self.endpoint = asyncio.get_running_loop(), service, started, endpoint
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []
        self.sent = ""
        self.first = True

    def on_token(self, token: int) -> None:  # engine thread
        if self.first:
            self.first = False
            self.service.metrics.ttft.labels(self.endpoint).observe(time.perf_counter() - self.started)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def delta(self, token: int) -> str:
        self.ids.append(token)
        text = self.service.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):  # an incomplete UTF-8 character: wait
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def flush(self, final_text: str) -> str:
        delta = final_text[len(self.sent) :] if final_text.startswith(self.sent) else ""
        self.sent = final_text
        return delta

    async def deltas(self, task: asyncio.Task) -> AsyncIterator[str]:
        """Text deltas until `task` (the turn) is done."""
        waiter = asyncio.ensure_future(self.queue.get())
        while True:
            done, _ = await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                if delta := self.delta(waiter.result()):
                    yield delta
                waiter = asyncio.ensure_future(self.queue.get())
            elif self.queue.empty():
                waiter.cancel()
                return


class BodyLimit:
    """ASGI middleware: a request body above `limit` bytes → 400 `body_too_large`, by its Content-Length up front or
    while a chunked body is read (the body is read here, at most `limit` bytes, and handed on)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        size = int(length) if length.isdigit() else 0
        chunks, more = [], not length.isdigit() or size > 0
        while more and size <= self.limit:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)  # disconnected
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
            size = max(size, sum(map(len, chunks)))
        if size > self.limit:
            error = ApiError(400, f"The request body is {'over ' if more else ''}{size} bytes; this server's limit "
                             f"is {self.limit} bytes.", code="body_too_large")  # fmt: skip
            return await JSONResponse(error.body(), status_code=400)(scope, receive, send)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _sse(event: dict) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def create_app(backend: Backend, store: Store, api_keys: list[str] | None = None, limits: Limits | None = None,
               model_name: str | None = None, update_delay: float = 0.0, state_cache_bytes: int = 1 << 30) -> FastAPI:  # fmt: skip
    """Build the app. `api_keys`: accepted Bearer keys (none: no authentication); each key owns what it creates.
    `update_delay`: see `Engine`; `state_cache_bytes`: STMs kept in memory besides the store."""
    limits = limits or Limits()
    metrics = Metrics()
    engine = Engine(backend, limits.max_batch_size, update_delay, metrics)
    model_name = model_name or "rxt"
    service = Service(backend, engine, store, metrics, limits, model_name, state_cache_bytes)
    owners = {key: hashlib.sha256(key.encode()).hexdigest()[:32] for key in api_keys or []}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.recovered = await service.recover()
        yield
        await service.wait_idle()
        engine.close()
        store.close()

    app = FastAPI(title="RxT server", lifespan=lifespan)
    app.state.service = service

    # -- errors, limits, authentication ------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        type_tags = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}  # union branches in `loc`
        location = [str(part) for part in first.get("loc", ())[1:]
                    if not (isinstance(part, str) and (part.lower() in type_tags or "[" in part))]  # fmt: skip
        param = ".".join(location) or None
        message = f"Invalid request: {first.get('msg')}" + (f" (at '{param}')" if param else "")
        if first.get("type") == "json_invalid":
            param = None
            message = f"The request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        return JSONResponse(ApiError(400, message, param=param, code="invalid_request").body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        body = ApiError(500, f"Internal server error: {type(error).__name__}: {error}", type="server_error",
                        code="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = f"{error.detail}: {request.method} {request.url.path}"
        return JSONResponse(ApiError(error.status_code, message, code=code).body(), status_code=error.status_code)

    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)

    def owner_of(request: Request) -> str:
        if not owners:
            return ""
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else None
        if key not in owners:
            raise ApiError(401, "Missing or incorrect API key: send 'Authorization: Bearer <key>' with a key this "
                           "server accepts.", code="invalid_api_key")  # fmt: skip
        return owners[key]

    async def owned_conversation(conversation_id: str, owner: str, param: str | None = None) -> ConversationRow:
        conversation = await service.db("get_conversation", store.get_conversation, conversation_id)
        if conversation is None or conversation.owner != owner:
            raise not_found("conversation", conversation_id, param)
        return conversation

    def check_items(count: int, what: str) -> None:
        if count > limits.max_input_items:
            raise ApiError(400, f"{what} has {count} items; this server's limit is {limits.max_input_items}.",
                           param=what, code="too_many_items")  # fmt: skip

    # -- health, metrics, models ------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "model_id": backend.model_id,
                "pending_memory_updates": len(service._pending), "turns_in_flight": service.in_flight}  # fmt: skip

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(owner: str = Depends(owner_of)):
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "rxt"}]}

    # -- responses --------------------------------------------------------------------------------------------
    async def run_turn(owner: str, target: Target, writes: list[Interaction], prompt: list[int], params, feed: _Feed,
                       finish) -> asyncio.Task:  # fmt: skip
        """Start the turn as its own task (it finishes, and is recorded, even if the client goes away)."""
        service.enter()

        async def run():
            try:
                conversation_id = target.conversation.id if target.conversation else None
                expected = target.parent[1] + 1 if target.parent and finish is not None else None
                try:
                    generation = await service.turn(conversation_id, writes, prompt, params, feed.on_token, finish,
                                                    target.state, expected)  # fmt: skip
                except StaleTurn:  # another request continued that response first: this one forks from it
                    parent, turn_index = target.parent
                    target.conversation = await service.fork(owner, parent, turn_index, target.metadata)
                    generation = await service.turn(target.conversation.id, writes, prompt, params, feed.on_token,
                                                    finish, None)  # fmt: skip
                metrics.turn_latency.labels(feed.endpoint).observe(time.perf_counter() - feed.started)
                return generation
            finally:
                service.leave()

        return asyncio.get_running_loop().create_task(run())

    async def resolve(owner: str, previous_response_id: str | None, conversation_id: str | None, store_turn: bool,
                      metadata: dict) -> Target:  # fmt: skip
        if previous_response_id and conversation_id:
            raise ApiError(400, "Pass either previous_response_id or conversation, not both.",
                           param="previous_response_id", code="invalid_request")  # fmt: skip
        if previous_response_id:
            found = await service.db("get_response", store.get_response, previous_response_id)
            if found is None or found[0] != owner:
                raise not_found("response", previous_response_id, "previous_response_id")
            _, parent_id, turn_index, _ = found
            parent = await service.db("get_conversation", store.get_conversation, parent_id)
            if parent is None:
                raise ApiError(404, f"The conversation of response '{previous_response_id}' was deleted.",
                               param="previous_response_id", code="not_found")  # fmt: skip
            service.check_model(parent)
            latest = parent.head_response_id == previous_response_id and parent.turn_count == turn_index + 1
            if latest:
                return Target(parent, metadata, parent=(parent, turn_index))
            if store_turn:
                return Target(await service.fork(owner, parent, turn_index, metadata), metadata)
            data = await service.db("get_snapshot", store.get_snapshot, parent.id, turn_index + 1)
            if data is None:
                raise ApiError(409, f"The memory after response '{previous_response_id}' is no longer stored.",
                               param="previous_response_id", code="snapshot_unavailable")  # fmt: skip
            return Target(None, metadata, state=await asyncio.to_thread(backend.deserialize, data))
        if conversation_id:
            conversation = await owned_conversation(conversation_id, owner, "conversation")
            service.check_model(conversation)
            return Target(conversation, metadata)
        if store_turn:
            return Target(await service.create_conversation(owner, metadata), metadata, fresh=True)
        return Target(None, metadata, fresh=True)

    @app.post("/v1/responses")
    async def create_response(body: ResponseCreate, owner: str = Depends(owner_of)):
        started = time.perf_counter()
        messages = [("user", body.input)] if isinstance(body.input, str) else [(m.role, m.text()) for m in body.input]
        check_items(len(messages), "input")
        if not messages or messages[-1][0] != "user" or not messages[-1][1]:
            raise ApiError(400, "The last input item must be a non-empty user message (the query of this turn).",
                           param="input", code="invalid_input")  # fmt: skip
        prompt_text = messages[-1][1]
        if backend.reads_history:
            if body.previous_response_id or body.conversation_id():
                raise service.stateless_request("previous_response_id" if body.previous_response_id else "conversation")
            if body.instructions:
                messages = [("system", body.instructions), *messages]
            body.store = False
        writes = service.interactions(messages[:-1]) if not backend.reads_history else []
        # every check before `resolve`, which may create a conversation (or a fork)
        continued = bool(body.previous_response_id or body.conversation_id())
        if body.instructions and continued and not backend.reads_history:
            service.prompt_ids(prompt_text, body.instructions)  # 400 without an [I] token
        checked = service.history_prompt(messages) if backend.reads_history else service.prompt_ids(prompt_text)
        service.sampling(body.max_output_tokens, body.temperature, body.top_p, len(checked))
        target = await resolve(owner, body.previous_response_id, body.conversation_id(), body.store,
                               body.metadata or {})  # fmt: skip
        internal = None
        if body.instructions and not backend.reads_history:
            if target.fresh:  # a new conversation: the instructions initialise its memory
                writes = service.interactions([("system", body.instructions)]) + writes
            else:
                internal = body.instructions
        prompt = service.history_prompt(messages) if backend.reads_history else service.prompt_ids(prompt_text, internal)
        params = service.sampling(body.max_output_tokens, body.temperature, body.top_p, len(prompt))
        response_id, output_id, created = new_id("resp"), new_id("msg"), time.time()

        def build(status: str, output_text: str | None, usage=None, reason=None, error=None) -> dict:
            item = message_item(output_id, "assistant", output_text, status) if output_text is not None else None
            conversation_id = target.conversation.id if target.conversation and body.store else None
            return response_object(response_id, model_name, created, status, item, body, conversation_id, usage,
                                   params.max_new_tokens, params.temperature, params.top_p, reason, error)  # fmt: skip

        def final(generation: Generation) -> dict:
            text = service.decode(generation.answer_ids)
            incomplete = generation.finish_reason == "length"
            return build("incomplete" if incomplete else "completed", text,
                         response_usage(len(prompt), len(generation.answer_ids)),
                         "max_output_tokens" if incomplete else None)  # fmt: skip

        def finish(generation: Generation, turn_index: int) -> TurnRecord:
            text = service.decode(generation.answer_ids)
            return TurnRecord(b"", [(new_id("msg"), "user", prompt_text), (output_id, "assistant", text)],
                              response_id, final(generation), owner)  # fmt: skip

        feed = _Feed(service, started, "responses")
        task = await run_turn(owner, target, writes, prompt, params, feed, finish if body.store else None)
        if not body.stream:
            generation = await task
            return JSONResponse(final(generation))

        async def events() -> AsyncIterator[bytes]:
            sequence = 0

            def event(kind: str, **fields) -> bytes:
                nonlocal sequence
                sequence += 1
                return _sse({"type": kind, "sequence_number": sequence - 1, **fields})

            yield event("response.created", response=build("in_progress", None))
            yield event("response.in_progress", response=build("in_progress", None))
            yield event("response.output_item.added", output_index=0,
                        item=message_item(output_id, "assistant", "", "in_progress") | {"content": []})  # fmt: skip
            part = {"type": "output_text", "text": "", "annotations": []}
            yield event("response.content_part.added", item_id=output_id, output_index=0, content_index=0, part=part)
            async for delta in feed.deltas(task):
                yield event("response.output_text.delta", item_id=output_id, output_index=0, content_index=0,
                            delta=delta, logprobs=[])  # fmt: skip
            try:
                generation = task.result()
            except ApiError as error:
                yield event("response.failed", response=build("failed", None, error={"code": error.code,
                                                                                   "message": error.message}))
                return
            except Exception as error:  # noqa: BLE001 - reported to the client in the stream
                yield event("response.failed", response=build("failed", None, error={"code": "server_error",
                                                                                   "message": str(error)}))
                return
            body_final = final(generation)
            text = body_final["output"][0]["content"][0]["text"]
            if delta := feed.flush(text):
                yield event("response.output_text.delta", item_id=output_id, output_index=0, content_index=0,
                            delta=delta, logprobs=[])  # fmt: skip
            yield event("response.output_text.done", item_id=output_id, output_index=0, content_index=0, text=text,
                        logprobs=[])  # fmt: skip
            yield event("response.content_part.done", item_id=output_id, output_index=0, content_index=0,
                        part=body_final["output"][0]["content"][0])  # fmt: skip
            yield event("response.output_item.done", output_index=0, item=body_final["output"][0])
            kind = "response.completed" if body_final["status"] == "completed" else "response.incomplete"
            yield event(kind, response=body_final)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, owner: str = Depends(owner_of)):
        found = await service.db("get_response", store.get_response, response_id)
        if found is None or found[0] != owner:
            raise not_found("response", response_id)
        return found[3]

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, owner: str = Depends(owner_of)):
        found = await service.db("get_response", store.get_response, response_id)
        if found is None or found[0] != owner:
            raise not_found("response", response_id)
        await service.db("delete_response", store.delete_response, response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    # -- conversations ----------------------------------------------------------------------------------------
    def item_json(item) -> dict:
        return message_item(item.id, item.role, item.content)

    @app.post("/v1/conversations")
    async def create_conversation(body: ConversationCreate | None = Body(default=None),  # noqa: B008 - FastAPI idiom
                                  owner: str = Depends(owner_of)):  # fmt: skip
        body = body or ConversationCreate()
        items = [(m.role, m.text()) for m in body.items or []]
        check_items(len(items), "items")
        writes = service.interactions(items)
        conversation = await service.create_conversation(owner, body.metadata or {})
        if writes:
            service.enter()
            try:
                await service.write(conversation.id, writes)
            finally:
                service.leave()
        return conversation_object(conversation.id, conversation.created_at, conversation.metadata)

    @app.get("/v1/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str, owner: str = Depends(owner_of)):
        conversation = await owned_conversation(conversation_id, owner)
        return conversation_object(conversation.id, conversation.created_at, conversation.metadata)

    @app.post("/v1/conversations/{conversation_id}")
    async def update_conversation(conversation_id: str, body: ConversationUpdate, owner: str = Depends(owner_of)):
        await owned_conversation(conversation_id, owner)
        conversation = await service.db("set_metadata", store.set_metadata, conversation_id, body.metadata)
        if conversation is None:
            raise not_found("conversation", conversation_id)
        return conversation_object(conversation.id, conversation.created_at, conversation.metadata)

    @app.delete("/v1/conversations/{conversation_id}")
    async def delete_conversation(conversation_id: str, owner: str = Depends(owner_of)):
        await owned_conversation(conversation_id, owner)
        await service.db("delete_conversation", store.delete_conversation, conversation_id)
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    @app.post("/v1/conversations/{conversation_id}/items")
    async def add_items(conversation_id: str, body: ItemsCreate, owner: str = Depends(owner_of)):
        conversation = await owned_conversation(conversation_id, owner)
        service.check_model(conversation)
        check_items(len(body.items), "items")
        if not body.items:
            raise ApiError(400, "items is empty: expected at least one message.", param="items", code="invalid_input")
        writes = service.interactions([(m.role, m.text()) for m in body.items])
        service.enter()
        try:
            await service.write(conversation_id, writes)
        finally:
            service.leave()
        created = [message_item(i, role, text) for write in writes for i, role, text in write.items]
        return item_list(created, False)

    @app.get("/v1/conversations/{conversation_id}/items")
    async def list_items(conversation_id: str, owner: str = Depends(owner_of), after: str | None = None,
                         limit: int = Query(default=20, ge=1, le=100), order: str = Query(default="desc",
                                                                                           pattern="^(asc|desc)$")):  # fmt: skip
        await owned_conversation(conversation_id, owner)
        after_seq = None
        if after is not None:
            item = await service.db("get_item", store.get_item, after)
            if item is None or item.conversation_id != conversation_id:
                raise not_found("item", after, "after")
            after_seq = item.seq
        rows = await service.db("list_items", store.list_items, conversation_id, after_seq, limit + 1,
                                order == "desc")  # fmt: skip
        return item_list([item_json(row) for row in rows[:limit]], len(rows) > limit)

    @app.get("/v1/conversations/{conversation_id}/memory")
    async def get_memory(conversation_id: str, owner: str = Depends(owner_of)):
        """Extension: the conversation's current STM as safetensors bytes (after its pending updates)."""
        conversation = await owned_conversation(conversation_id, owner)
        service.check_model(conversation)
        version, stm = await service.current_state(conversation_id)
        data = await asyncio.to_thread(backend.serialize, stm)
        return Response(data, media_type="application/octet-stream", headers={"X-Memory-Turn": str(version)})

    # -- chat completions -------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionCreate, request: Request, owner: str = Depends(owner_of)):
        started = time.perf_counter()
        messages = [(m.role, m.text()) for m in body.messages]
        check_items(len(messages), "messages")
        for index, (role, _) in enumerate(messages):
            if role == "tool":
                raise ApiError(400, "messages with role 'tool' are not supported by this server.",
                               param=f"messages.{index}.role", code="unsupported_parameter")  # fmt: skip
        if messages[-1][0] != "user" or not messages[-1][1]:
            raise ApiError(400, "The last message must be a non-empty user message.", param="messages",
                           code="invalid_input")  # fmt: skip
        named = request.headers.get(CONVERSATION_HEADER) or body.conversation
        if backend.reads_history:
            if named:
                raise service.stateless_request("conversation")
            target, writes = Target(None, {}), []
            prompt = service.history_prompt(messages)
            body.store = False
        elif named:
            target, writes = Target(await owned_conversation(named, owner, "conversation"), {}), []
            service.check_model(target.conversation)
        else:
            writes = service.interactions(messages[:-1])
        if not backend.reads_history:
            prompt = service.prompt_ids(messages[-1][1])
        params = service.sampling(body.max_completion_tokens or body.max_tokens, body.temperature, body.top_p,
                                  len(prompt), "max_completion_tokens" if body.max_completion_tokens else "max_tokens")  # fmt: skip
        if not named and not backend.reads_history:  # after the checks: this creates the conversation
            target = await resolve(owner, None, None, body.store, body.metadata or {})
        completion_id, created = new_id("chatcmpl"), time.time()
        conversation_id = target.conversation.id if target.conversation and body.store else None
        headers = {CONVERSATION_HEADER: conversation_id} if conversation_id else {}

        def finish(generation: Generation, turn_index: int) -> TurnRecord:
            text = service.decode(generation.answer_ids)
            return TurnRecord(b"", [(new_id("msg"), "user", messages[-1][1]), (new_id("msg"), "assistant", text)])

        feed = _Feed(service, started, "chat.completions")
        task = await run_turn(owner, target, writes, prompt, params, feed, finish if body.store else None)
        if not body.stream:
            generation = await task
            return JSONResponse(chat_completion(completion_id, model_name, created, service.decode(generation.answer_ids),
                                                generation.finish_reason, len(prompt), len(generation.answer_ids),
                                                conversation_id), headers=headers)  # fmt: skip

        async def chunks() -> AsyncIterator[bytes]:
            def chunk(**fields) -> bytes:
                return f"data: {json.dumps(chat_chunk(completion_id, model_name, created, conversation_id=conversation_id, **fields))}\n\n".encode()

            yield chunk(delta={"role": "assistant", "content": ""}, finish_reason=None)
            async for delta in feed.deltas(task):
                yield chunk(delta={"content": delta}, finish_reason=None)
            try:
                generation = task.result()
            except ApiError as error:
                yield f"data: {json.dumps(error.body())}\n\n".encode()
                return
            if delta := feed.flush(service.decode(generation.answer_ids)):
                yield chunk(delta={"content": delta}, finish_reason=None)
            yield chunk(delta={}, finish_reason=generation.finish_reason)
            if body.stream_options and body.stream_options.include_usage:
                usage = {"prompt_tokens": len(prompt), "completion_tokens": len(generation.answer_ids),
                         "total_tokens": len(prompt) + len(generation.answer_ids)}  # fmt: skip
                yield chunk(delta={}, finish_reason=None, usage=usage, choices=False)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream", headers=headers)

    return app
