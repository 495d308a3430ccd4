"""The RxT server (serving/) against the official `openai` client, unchanged, on a live uvicorn server (127.0.0.1, a
free port) with a real SQLite store: Responses (previous_response_id, streaming, forking), Conversations, Chat
Completions, API keys, bad inputs, batching of concurrent conversations and a bounded load test."""

from __future__ import annotations

import asyncio
import re
import threading

import httpx
import openai
import pytest
import torch

from modeling_rxt.tokenization_rxt import (
    render_interaction,
    render_query,
    render_system,
)
from serving import Limits, SQLiteStore, create_app, load_rxt_backend
from serving.engine import SamplingParams, StateMismatchError
from serving_support import GREEDY, ThreadServer, read_memory, stm_of


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    backend = load_rxt_backend(str(model_dir))
    store = SQLiteStore(str(tmp_path_factory.mktemp("db") / "state.sqlite3"), keep_snapshots=4)
    server = ThreadServer(create_app(backend, store, limits=Limits(max_body_bytes=200_000, max_input_items=32),
                                     model_name="tiny-rxt"))  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def tokens(ref, text):
    return ref.tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_turns(ref, queries, stm=None, max_new_tokens=6):
    """Each query answered greedily from the previous STM (only the new query is read), then written to memory."""
    stm = ref.initial_state() if stm is None else stm
    texts = []
    for query in queries:
        (generation,) = ref.generate([stm], [tokens(ref, render_query(query))],
                                     [SamplingParams(max_new_tokens, 0.0)], lambda row, token: None)  # fmt: skip
        texts.append(ref.tokenizer.decode(generation.answer_ids, skip_special_tokens=True))
        (stm,) = ref.update([stm], [generation.update_ids])
    return texts, stm


def memory(server, conversation_id):
    return stm_of(read_memory(server.url, conversation_id)[0])


def metric(server, name, **labels) -> float:
    text = httpx.get(server.url + "/metrics").text
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}" + (rf"\{{{re.escape(selector)}\}}" if selector else "") + r" ([0-9.e+-]+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


QUERIES = ["my name is alice", "i live in paris", "what is my name"]


def test_multi_turn_previous_response_id_stream_and_not(server, client, ref):
    results = {}
    for stream in (False, True):
        previous, texts, conversation_id = None, [], None
        for query in QUERIES:
            if stream:
                events = list(client.responses.create(model="tiny-rxt", input=query, previous_response_id=previous,
                                                      stream=True, **GREEDY))  # fmt: skip
                kinds = [event.type for event in events]
                assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                                     "response.content_part.added"]  # fmt: skip
                assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done",
                                        "response.output_item.done"]  # fmt: skip
                assert kinds[-1] in ("response.completed", "response.incomplete")
                assert [event.sequence_number for event in events] == list(range(len(events)))
                response = events[-1].response
                streamed = "".join(event.delta for event in events if event.type == "response.output_text.delta")
                assert streamed == response.output_text == events[-4].text
            else:
                response = client.responses.create(model="tiny-rxt", input=query, previous_response_id=previous,
                                                   **GREEDY)  # fmt: skip
            assert response.usage.input_tokens == len(tokens(ref, render_query(query)))  # only the new query
            if previous is not None:
                assert response.conversation.id == conversation_id
            conversation_id, previous = response.conversation.id, response.id
            texts.append(response.output_text)
        results[stream] = texts, conversation_id, previous
    assert results[False][0] == results[True][0]
    expected_texts, expected_stm = reference_turns(ref, QUERIES)
    assert results[False][0] == expected_texts
    for _, conversation_id, last in results.values():
        assert torch.equal(memory(server, conversation_id), expected_stm)
        assert client.responses.retrieve(last).output_text == expected_texts[-1]
    # a deleted response cannot be read or continued; its conversation stays
    client.responses.delete(last)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(last)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny-rxt", input="hi", previous_response_id=last, **GREEDY)


def test_fork_from_an_older_response_and_snapshot_limit(server, client, ref):
    first = client.responses.create(model="tiny-rxt", input=QUERIES[0], **GREEDY)
    second = client.responses.create(model="tiny-rxt", input=QUERIES[1], previous_response_id=first.id, **GREEDY)
    fork = client.responses.create(model="tiny-rxt", input=QUERIES[2], previous_response_id=first.id, **GREEDY)
    assert fork.conversation.id != first.conversation.id  # a new branch
    texts, stm = reference_turns(ref, [QUERIES[0], QUERIES[2]])
    assert fork.output_text == texts[1]
    assert torch.equal(memory(server, fork.conversation.id), stm)
    # the original conversation is untouched and still continues from its latest response
    assert torch.equal(memory(server, first.conversation.id), reference_turns(ref, QUERIES[:2])[1])
    items = client.conversations.items.list(fork.conversation.id, order="asc")
    assert [(i.role, i.content[0].text) for i in items.data] == [
        ("user", QUERIES[0]), ("assistant", first.output_text), ("user", QUERIES[2]), ("assistant", fork.output_text)]
    third = client.responses.create(model="tiny-rxt", input="hi", previous_response_id=second.id, **GREEDY)
    assert third.conversation.id == first.conversation.id
    # the server keeps 4 snapshots per conversation: after 5 turns, turn 1's STM is gone → 409 naming the limit
    previous = third.id
    for query in ("a", "b"):
        previous = client.responses.create(model="tiny-rxt", input=query, previous_response_id=previous, **GREEDY).id
    with pytest.raises(openai.ConflictError, match="keeps the last 4 snapshots"):
        client.responses.create(model="tiny-rxt", input="x", previous_response_id=first.id, **GREEDY)


def test_two_requests_continuing_one_response_at_once_fork(server, client, ref):
    first = client.responses.create(model="tiny-rxt", input=QUERIES[0], **GREEDY)
    results = {}

    def ask(query):
        results[query] = client.responses.create(model="tiny-rxt", input=query, previous_response_id=first.id,
                                                 **GREEDY)  # fmt: skip

    threads = [threading.Thread(target=ask, args=(query,)) for query in QUERIES[1:]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    conversations = {query: response.conversation.id for query, response in results.items()}
    assert sorted(c == first.conversation.id for c in conversations.values()) == [False, True]  # one continues
    for query, conversation_id in conversations.items():  # each answered from the memory after `first` only
        texts, stm = reference_turns(ref, [QUERIES[0], query])
        assert results[query].output_text == texts[1]
        assert torch.equal(memory(server, conversation_id), stm)


def test_conversations_endpoints_write_memory_without_generating(server, client, ref):
    generated = metric(server, "rxt_batch_size_count", kind="generate")
    conversation = client.conversations.create(
        items=[{"type": "message", "role": "system", "content": "be brief"},
               {"type": "message", "role": "user", "content": "my name is alice"},
               {"type": "message", "role": "assistant", "content": "hello alice"}],
        metadata={"topic": "intro"})  # fmt: skip
    assert conversation.metadata == {"topic": "intro"} and conversation.id.startswith("conv_")
    added = client.conversations.items.create(conversation.id, items=[
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "i live in paris"}]}])  # fmt: skip
    assert [item.role for item in added.data] == ["user"]
    stm = ref.initial_state()
    for text in (render_system("be brief", ref.model.config.system_template),
                 render_interaction("my name is alice", "hello alice"), render_interaction("i live in paris", "")):
        (stm,) = ref.update([stm], [tokens(ref, text)])
    assert torch.equal(memory(server, conversation.id), stm)
    assert metric(server, "rxt_batch_size_count", kind="generate") == generated  # memory written, nothing generated
    response = client.responses.create(model="tiny-rxt", input="what is my name", conversation=conversation.id,
                                       **GREEDY)  # fmt: skip
    assert response.conversation.id == conversation.id
    texts, stm = reference_turns(ref, ["what is my name"], stm)
    assert response.output_text == texts[0] and torch.equal(memory(server, conversation.id), stm)
    updated = client.conversations.update(conversation.id, metadata={"topic": "names"})
    assert updated.metadata == {"topic": "names"} == client.conversations.retrieve(conversation.id).metadata
    everything = client.conversations.items.list(conversation.id, order="asc", limit=100).data
    assert [i.role for i in everything] == ["system", "user", "assistant", "user", "user", "assistant"]
    page = client.conversations.items.list(conversation.id, order="asc", limit=4)
    assert page.has_more and [i.id for i in page.data] == [i.id for i in everything[:4]]
    rest = client.conversations.items.list(conversation.id, order="asc", limit=4, after=page.data[-1].id)
    assert not rest.has_more and [i.id for i in rest.data] == [i.id for i in everything[4:]]
    newest = client.conversations.items.list(conversation.id, limit=1)  # default order: newest first
    assert newest.data[0].id == everything[-1].id
    deleted = client.conversations.delete(conversation.id)
    assert deleted.deleted and deleted.id == conversation.id
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conversation.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny-rxt", input="hi", previous_response_id=response.id, **GREEDY)


def test_chat_completions_replay_once_then_only_the_new_message(server, client, ref):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "my name is alice"},
                {"role": "assistant", "content": "hello alice"}, {"role": "user", "content": "i live in paris"}]  # fmt: skip
    raw = client.chat.completions.with_raw_response.create(model="tiny-rxt", messages=messages, temperature=0,
                                                           max_tokens=6)  # fmt: skip
    completion = raw.parse()
    conversation_id = raw.headers["x-conversation-id"]
    assert completion.conversation == conversation_id and conversation_id.startswith("conv_")
    assert completion.object == "chat.completion" and completion.choices[0].finish_reason in ("stop", "length")
    stm = ref.initial_state()
    for text in (render_system("be brief", ref.model.config.system_template),
                 render_interaction("my name is alice", "hello alice")):
        (stm,) = ref.update([stm], [tokens(ref, text)])
    texts, stm = reference_turns(ref, ["i live in paris"], stm)
    assert completion.choices[0].message.content == texts[0]
    assert completion.usage.prompt_tokens == len(tokens(ref, render_query("i live in paris")))
    # the next call names the conversation and sends only the new message (streamed)
    stream = client.chat.completions.create(model="tiny-rxt", messages=[{"role": "user", "content": "what is my name"}],
                                            temperature=0, max_tokens=6, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_headers={"X-Conversation-Id": conversation_id})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    texts, stm = reference_turns(ref, ["what is my name"], stm)
    assert text == texts[0]
    assert torch.equal(memory(server, conversation_id), stm)
    # the extension field works too, and the transcript holds every message once
    client.chat.completions.create(model="tiny-rxt", messages=[{"role": "user", "content": "bye"}], max_tokens=2,
                                   extra_body={"conversation": conversation_id})  # fmt: skip
    roles = [i.role for i in client.conversations.items.list(conversation_id, order="asc", limit=100).data]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user", "assistant"]


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


BAD_INPUTS = [
    # (method, path, json body or raw bytes, status, code, param, message fragment)
    ("POST", "/v1/responses", b"{not json", 400, "invalid_request", None, "not valid JSON"),
    ("POST", "/v1/responses", {"input": 5}, 400, "invalid_request", "input", "Invalid request"),
    ("POST", "/v1/responses", {"input": []}, 400, "invalid_input", "input", "user message"),
    ("POST", "/v1/responses", {"input": "hi", "max_output_tokens": 100000}, 400, "max_output_tokens_exceeded",
     "max_output_tokens", "limit of 256 tokens"),
    ("POST", "/v1/responses", {"input": "alice " * 300}, 400, "context_length_exceeded", "input",
     "limit is 256 tokens"),
    ("POST", "/v1/responses", {"input": "hi", "temperature": 5}, 400, "invalid_request", "temperature", ""),
    ("POST", "/v1/responses", {"input": "hi", "previous_response_id": "resp_x"}, 404, "not_found",
     "previous_response_id", "resp_x"),
    ("POST", "/v1/responses", {"input": "hi", "conversation": "conv_x"}, 404, "not_found", "conversation", "conv_x"),
    ("POST", "/v1/responses", {"input": "hi", "conversation": "conv_x", "previous_response_id": "resp_x"}, 400,
     "invalid_request", "previous_response_id", "not both"),
    ("POST", "/v1/responses", {"input": [{"role": "user", "content": "hi"}] * 40}, 400, "too_many_items", "input",
     "limit is 32"),
    ("POST", "/v1/responses", {"input": "x" * 300_000}, 400, "body_too_large", None, "limit is 200000 bytes"),
    ("GET", "/v1/responses/resp_x", None, 404, "not_found", None, "resp_x"),
    ("DELETE", "/v1/responses/resp_x", None, 404, "not_found", None, "resp_x"),
    ("GET", "/v1/conversations/conv_x", None, 404, "not_found", None, "conv_x"),
    ("GET", "/v1/conversations/conv_x/items", None, 404, "not_found", None, "conv_x"),
    ("POST", "/v1/conversations/conv_x/items", {"items": [{"role": "user", "content": "hi"}]}, 404, "not_found",
     None, "conv_x"),
    ("POST", "/v1/conversations", {"items": [{"role": "robot", "content": "hi"}]}, 400, "invalid_request",
     "items.0.role", ""),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "invalid_request", "messages", ""),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "invalid_input",
     "messages", "last message"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400,
     "invalid_request", "n", ""),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "1"}, {"role": "user", "content": "x"}]},
     400, "unsupported_parameter", "messages.0.role", "tool"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9999}, 400,
     "max_output_tokens_exceeded", "max_tokens", "limit of 256"),
    ("GET", "/v1/nothing", None, 404, "not_found", None, "/v1/nothing"),
]


def test_chunked_body_over_the_limit(server):
    def chunks():
        yield b'{"input": "'
        for _ in range(30):
            yield b"x" * 10_000
        yield b'"}'

    response = httpx.post(server.url + "/v1/responses", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers  # sent chunked: the limit is checked while reading
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "body_too_large" and "limit is 200000 bytes" in error["message"], error


@pytest.mark.parametrize("method,path,body,status,code,param,fragment", BAD_INPUTS)
def test_bad_inputs_get_documented_status_and_error_body(server, method, path, body, status, code, param, fragment):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else (
        {"json": body} if body is not None else {})  # fmt: skip
    response = httpx.request(method, server.url + path, timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert (error["code"], error["param"]) == (code, param), error
    assert fragment in error["message"], error


def test_refused_requests_create_no_conversation(server):
    import sqlite3

    def conversations():
        path = server.server.config.app.state.service.store.path
        with sqlite3.connect(path) as connection:
            return connection.execute("SELECT COUNT(*) FROM rxt_conversations").fetchone()[0]

    before = conversations()
    for body, path in (({"input": "alice " * 300}, "/v1/responses"),
                       ({"input": "hi", "max_output_tokens": 255}, "/v1/responses"),
                       ({"input": "hi", "instructions": "x", "previous_response_id": "resp_x"}, "/v1/responses"),
                       ({"messages": [{"role": "user", "content": "alice " * 300}]}, "/v1/chat/completions")):
        assert httpx.post(server.url + path, json=body).status_code in (400, 404)
    assert conversations() == before


def test_instructions_and_model_mismatch(server, client, ref, model_dir):
    # instructions of a new conversation initialise its memory from text (the system template)
    response = client.responses.create(model="tiny-rxt", input="hi", instructions="be brief", **GREEDY)
    (stm,) = ref.update([ref.initial_state()], [tokens(ref, render_system("be brief", ref.model.config.system_template))])
    assert torch.equal(memory(server, response.conversation.id), reference_turns(ref, ["hi"], stm)[1])
    # this tiny tokenizer has no [I] token: instructions on a continued conversation are refused, not ignored
    with pytest.raises(openai.BadRequestError, match=r"\[I\]"):
        client.responses.create(model="tiny-rxt", input="hi", instructions="x", previous_response_id=response.id)
    # an STM written by another model or config is refused with both identities named
    other = load_rxt_backend(str(model_dir))
    other.model_id = "another-model"
    with pytest.raises(StateMismatchError, match="written by model 'another-model'.*this server runs model"):
        ref.deserialize(other.serialize(other.initial_state()))
    store = server.server.config.app.state.service.store
    store.create_conversation("conv_foreign", "", "another-model", {}, other.serialize(other.initial_state()))
    with pytest.raises(openai.ConflictError, match="written by model 'another-model'") as raised:
        client.responses.create(model="tiny-rxt", input="hi", conversation="conv_foreign")
    assert raised.value.body["code"] == "model_mismatch"


def test_api_keys_isolate_owners_and_queue_bound_answers_429(model_dir, tmp_path):
    backend = load_rxt_backend(str(model_dir))
    store = SQLiteStore(str(tmp_path / "keys.sqlite3"))
    server = ThreadServer(create_app(backend, store, api_keys=["key-a", "key-b"],
                                     limits=Limits(max_turns_in_flight=2, max_batch_size=2)))  # fmt: skip
    try:
        a = openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0)
        b = openai.OpenAI(base_url=server.url + "/v1", api_key="key-b", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="API key"):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(server.url + "/v1/models").status_code == 401
        response = a.responses.create(model="rxt", input="my name is alice", **GREEDY)
        conversation_id = response.conversation.id
        assert len(response.id) >= 48 and len(conversation_id) >= 48  # 192 random bits
        for attempt in (lambda: b.responses.retrieve(response.id),
                        lambda: b.responses.create(model="rxt", input="hi", previous_response_id=response.id),
                        lambda: b.responses.create(model="rxt", input="hi", conversation=conversation_id),
                        lambda: b.conversations.retrieve(conversation_id),
                        lambda: b.conversations.items.list(conversation_id),
                        lambda: b.conversations.delete(conversation_id),
                        lambda: b.chat.completions.create(model="rxt", messages=[{"role": "user", "content": "x"}],
                                                          extra_headers={"X-Conversation-Id": conversation_id})):  # fmt: skip
            with pytest.raises(openai.NotFoundError):  # existence is not leaked
                attempt()
        assert a.conversations.retrieve(conversation_id).id == conversation_id
        # more turns than the server admits at once → 429 with Retry-After, the others succeed
        statuses = []

        def one(index):
            r = httpx.post(server.url + "/v1/responses", headers={"Authorization": "Bearer key-a"}, timeout=60,
                           json={"input": f"my name is alice {index}", "max_output_tokens": 40, "temperature": 0})  # fmt: skip
            statuses.append((r.status_code, r.headers.get("retry-after"), r.json()))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert {status for status, _, _ in statuses} == {200, 429}, statuses
        for status, retry_after, body in statuses:
            if status == 429:
                assert retry_after == "1" and body["error"]["code"] == "queue_full"
                assert body["error"]["type"] == "rate_limit_error"
    finally:
        server.stop()


def run_conversation(client, queries, barrier=None):
    previous, texts = None, []
    for query in queries:
        if barrier is not None:
            barrier.wait()
        response = client.responses.create(model="tiny-rxt", input=query, previous_response_id=previous, **GREEDY)
        previous = response.id
        texts.append(response.output_text)
    return response.conversation.id, texts


def test_concurrent_conversations_are_batched_without_cross_talk(server, client):
    scripts = [[f"my name is alice {i}", f"i live in paris number {i * 7}", "what is my name", f"alice {i + 1}"]
               for i in range(16)]  # fmt: skip
    sequential = [run_conversation(client, script) for script in scripts]
    before = {kind: (metric(server, "rxt_batch_size_count", kind=kind),
                     metric(server, "rxt_batch_size_bucket", kind=kind, le="1.0")) for kind in ("generate", "update")}  # fmt: skip
    barrier, results = threading.Barrier(16), [None] * 16

    def worker(index):
        results[index] = run_conversation(client, scripts[index], barrier)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (seq_id, seq_texts), (par_id, par_texts) in zip(sequential, results):
        assert par_texts == seq_texts
        torch.testing.assert_close(memory(server, par_id), memory(server, seq_id), rtol=1e-5, atol=1e-6)
    for kind in ("generate", "update"):
        count = metric(server, "rxt_batch_size_count", kind=kind) - before[kind][0]
        single = metric(server, "rxt_batch_size_bucket", kind=kind, le="1.0") - before[kind][1]
        assert count - single > 0, f"no {kind} batch of more than one conversation"
        assert count < 64, f"{kind}: {count} batches for 64 turns: nothing was batched"


def test_load_64_conversations_8_turns_zero_errors(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

        async def conversation(index):
            previous = None
            for turn in range(8):
                response = await client.responses.create(model="tiny-rxt", input=f"alice {index} turn {turn}",
                                                         previous_response_id=previous, max_output_tokens=4)  # fmt: skip
                previous = response.id
            return response.conversation.id

        ids = await asyncio.gather(*(conversation(i) for i in range(64)))
        await client.close()
        return ids

    conversation_ids = asyncio.run(main())
    assert len(set(conversation_ids)) == 64
    for conversation_id in conversation_ids:
        _, turn = read_memory(server.url, conversation_id)
        assert turn == 8  # every turn recorded and written into memory
    with httpx.Client() as http:
        counts = [len(http.get(f"{server.url}/v1/conversations/{c}/items", params={"limit": 100}).json()["data"])
                  for c in conversation_ids]  # fmt: skip
    assert counts == [16] * 64


def test_terminal_chat_local_and_against_the_server(server, model_dir, ref, tmp_path):
    import io

    import chat as chat_script  # scripts/chat.py

    for chat in (chat_script.LocalChat(str(model_dir), 6, 0.0), chat_script.RemoteChat(server.url, None, 6, 0.0)):
        out = io.StringIO()
        saved = tmp_path / f"{type(chat).__name__}.safetensors"
        stats = chat_script.run(chat, [QUERIES[0], QUERIES[1], "/stats", f"/save {saved}", "/reset", "/nope", "/quit",
                                       "never read"], out)  # fmt: skip
        texts, stm = reference_turns(ref, QUERIES[:2])
        lines = out.getvalue().splitlines()
        assert lines[:2] == texts  # streamed replies, one line per turn
        assert len(stats) == 2 and all(turn["latency_s"] >= turn["ttft_s"] > 0 for turn in stats)
        assert lines[2].startswith("turn 1: ") and lines[4] == f"STM norm: {float(stm.norm()):.4f}"
        assert lines[5] == f"(saved to {saved})" and lines[6] == "(memory reset)"
        assert lines[7].startswith("unknown command /nope") and len(lines) == 8
        torch.testing.assert_close(stm_of(saved.read_bytes()), stm, rtol=0, atol=0)
        after_reset = io.StringIO()
        chat_script.run(chat, [QUERIES[1]], after_reset)
        assert after_reset.getvalue().splitlines() == reference_turns(ref, [QUERIES[1]])[0]
    # /load restores a saved conversation (local model)
    out = io.StringIO()
    chat_script.run(chat_script.LocalChat(str(model_dir), 6, 0.0), [f"/load {saved}", QUERIES[2]], out)
    assert out.getvalue().splitlines()[1] == reference_turns(ref, [QUERIES[2]], stm)[0][0]


def test_llama_baselines_run_through_the_same_server(model_dir, tmp_path):
    """The benchmark baselines: a Llama keeping each conversation's KV cache (kv) answers exactly like one re-reading
    the resent history (history), through the same endpoints, engine and store."""
    from bench_common import llama_like  # scripts/bench_common.py
    from transformers import AutoTokenizer

    from modeling_rxt import RxTConfig
    from serving import load_backend

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    llama_dir = tmp_path / "llama"
    llama_like(RxTConfig.tiny(vocab_size=len(tokenizer)), max_positions=1024).save_pretrained(llama_dir)
    tokenizer.save_pretrained(llama_dir)
    servers = {mode: ThreadServer(create_app(load_backend(str(llama_dir), baseline_mode=mode),
                                             SQLiteStore(str(tmp_path / f"{mode}.sqlite3"))))
               for mode in ("kv", "history")}  # fmt: skip
    try:
        kv, history = (openai.OpenAI(base_url=servers[m].url + "/v1", api_key="x", max_retries=0) for m in servers)
        previous, messages, lengths = None, [], []
        for query in QUERIES:
            response = kv.responses.create(model="m", input=query, previous_response_id=previous, **GREEDY)
            previous = response.id
            messages.append({"role": "user", "content": query})
            resent = history.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=6)
            assert resent.choices[0].message.content == response.output_text
            assert resent.usage.prompt_tokens > response.usage.input_tokens or len(messages) == 1
            messages.append({"role": "assistant", "content": resent.choices[0].message.content})
            data, turn = read_memory(servers["kv"].url, response.conversation.id)
            lengths.append(load_safetensors_kv(data).shape[3])
            assert turn == len(lengths)
        assert lengths == sorted(lengths) and len(set(lengths)) == len(QUERIES)  # the KV cache grows every turn
        with pytest.raises(openai.BadRequestError, match="keeps no conversation state"):
            history.responses.create(model="m", input="hi", previous_response_id=previous)
    finally:
        for server in servers.values():
            server.stop()


def load_safetensors_kv(data: bytes) -> torch.Tensor:
    from safetensors.torch import load

    return load(data)["kv"]
