"""The RxT server as separate processes (`python -m serving`): a restart between turns keeps the STM bit-identical,
`kill -9` while memory updates are pending loses and corrupts nothing, and two replicas on one PostgreSQL database
share a conversation consistently (turn N is written once)."""

from __future__ import annotations

import signal
import threading

import httpx
import openai
import torch

from modeling_rxt.tokenization_rxt import render_query
from pg_fixture import postgres_db, postgres_url  # noqa: F401  (fixtures)
from serving import SQLiteStore
from serving.engine import SamplingParams
from serving_support import GREEDY, ProcessServer, read_memory, stm_of

QUERIES = ["my name is alice", "i live in paris", "what is my name", "where do i live", "alice 7"]


def client_of(server: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def reference_turns(ref, queries, stm=None):
    stm = ref.initial_state() if stm is None else stm
    texts = []
    for query in queries:
        prompt = ref.tokenizer(render_query(query), add_special_tokens=False)["input_ids"]
        (generation,) = ref.generate([stm], [prompt], [SamplingParams(6, 0.0)], lambda row, token: None)
        texts.append(ref.tokenizer.decode(generation.answer_ids, skip_special_tokens=True))
        (stm,) = ref.update([stm], [generation.update_ids])
    return texts, stm


def test_restart_keeps_the_stm_bit_identical_and_kill_9_loses_nothing(model_dir, ref, tmp_path):
    db = str(tmp_path / "state.sqlite3")
    # 1. two turns, then a graceful stop: pending memory updates finish before the process exits
    first = ProcessServer(model_dir, db, log=tmp_path / "first.log").wait_ready()
    try:
        client = client_of(first)
        response = None
        for query in QUERIES[:2]:
            response = client.responses.create(model="m", input=query, previous_response_id=response and response.id,
                                               **GREEDY)  # fmt: skip
        conversation_id = response.conversation.id
        before, turn = read_memory(first.url, conversation_id)
        assert turn == 2
    finally:
        assert first.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after its graceful shutdown
    # 2. restarted (with a long update delay, so that memory updates stay pending): the same STM bytes, and the
    #    conversation goes on; then kill -9 while the updates of three conversations are pending
    second = ProcessServer(model_dir, db, "--update-delay", "60", log=tmp_path / "second.log").wait_ready()
    replies = {}
    try:
        after, turn = read_memory(second.url, conversation_id)
        assert turn == 2 and after == before  # bit-identical: dtype and values kept exactly
        client = client_of(second)
        response = client.responses.create(model="m", input=QUERIES[2], previous_response_id=response.id, **GREEDY)
        replies[conversation_id] = response.output_text
        for query in QUERIES[3:]:
            other = client.responses.create(model="m", input=query, **GREEDY)
            replies[other.conversation.id] = other.output_text
    finally:
        second.kill9()
    store = SQLiteStore(db)
    for index, other_id in enumerate(replies):  # the killed server had answered these turns: all recorded
        row = store.get_conversation(other_id)
        turns = 3 if index == 0 else 1
        assert (row.turn_count, row.version) == (turns, turns - 1), "the update was not pending at the kill"
        assert [i.role for i in store.list_items(other_id, limit=100)] == ["user", "assistant"] * turns
    store.close()
    # 3. restarted again: the pending updates are re-applied from the recorded turns, once
    third = ProcessServer(model_dir, db, log=tmp_path / "third.log").wait_ready()
    try:
        scripts = [QUERIES[:3], [QUERIES[3]], [QUERIES[4]]]
        for (other_id, reply), script in zip(replies.items(), scripts):
            data, turn = read_memory(third.url, other_id)  # waits for the re-applied update
            assert turn == len(script)
            texts, stm = reference_turns(ref, script)
            assert texts[-1] == reply
            # re-applied in one batch with the other conversations: equal up to the float rounding of a batch
            torch.testing.assert_close(stm_of(data), stm, rtol=1e-5, atol=1e-6)
        assert httpx.get(third.url + "/health").json()["pending_memory_updates"] == 0
        response = client_of(third).responses.create(model="m", input="alice 9", previous_response_id=response.id,
                                                     **GREEDY)  # fmt: skip
        assert response.output_text == reference_turns(ref, [*QUERIES[:3], "alice 9"])[0][-1]
        assert read_memory(third.url, conversation_id)[1] == 4
    finally:
        third.stop()


def test_two_replicas_on_postgresql_share_a_conversation(model_dir, ref, tmp_path, postgres_db):  # noqa: F811
    servers = [ProcessServer(model_dir, postgres_db, log=tmp_path / f"replica{i}.log") for i in range(2)]
    try:
        for server in servers:
            server.wait_ready()
        clients = [client_of(server) for server in servers]
        response = None
        for index, query in enumerate(QUERIES):  # turns alternate between the replicas
            response = clients[index % 2].responses.create(model="m", input=query,
                                                           previous_response_id=response and response.id, **GREEDY)  # fmt: skip
        conversation_id = response.conversation.id
        texts, stm = reference_turns(ref, QUERIES)
        assert response.output_text == texts[-1]
        memories = [read_memory(server.url, conversation_id) for server in servers]
        assert memories[0] == memories[1] and memories[0][1] == len(QUERIES)
        assert torch.equal(stm_of(memories[0][0]), stm)
        for client in clients:
            items = client.conversations.items.list(conversation_id, order="asc", limit=100).data
            assert [i.content[0].text for i in items[::2]] == QUERIES
            assert [i.content[0].text for i in items[1::2]] == texts
        # both replicas asked for the next turn of the same conversation at once: turn N is written once
        every = []
        for round_ in range(3):
            outcomes = []

            def ask(client, text, outcomes):
                try:
                    r = client.responses.create(model="m", input=text, conversation=conversation_id, **GREEDY)
                    outcomes.append(("ok", r.id))
                except openai.ConflictError as error:
                    assert error.body["code"] == "conflict"
                    outcomes.append(("conflict", None))

            threads = [threading.Thread(target=ask, args=(client, f"race {round_} {tag}", outcomes))
                       for tag, client in enumerate(clients)]  # fmt: skip
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert len(outcomes) == 2 and any(kind == "ok" for kind, _ in outcomes)
            every += outcomes
        items = clients[0].conversations.items.list(conversation_id, order="asc", limit=100).data
        successes = 2 * len(QUERIES)
        races = [i for i in items[successes:]]
        assert [i.role for i in races] == ["user", "assistant"] * (len(races) // 2)
        assert len(races) // 2 == sum(kind == "ok" for kind, _ in every)  # every answered turn recorded once
        final, turn = read_memory(servers[1].url, conversation_id)
        assert turn == len(items) // 2 and final == read_memory(servers[0].url, conversation_id)[0]
    finally:
        for server in servers:
            server.stop()
