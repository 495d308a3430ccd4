"""serving/ building blocks without HTTP: the state store's compare-and-set and snapshot pruning on SQLite and
PostgreSQL, the engine's per-row sampling and its update scheduling."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pg_fixture import postgres_db, postgres_url  # noqa: F401  (fixtures)
from serving.engine import Engine, SamplingParams, _PerRowSampling
from serving.store import ConflictError, PostgresStore, SQLiteStore, TurnRecord


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        store = SQLiteStore(str(tmp_path / "state.sqlite3"), keep_snapshots=2)
    else:
        store = PostgresStore(request.getfixturevalue("postgres_db"), keep_snapshots=2)
    yield store
    store.close()


def turn(text: str, response_id: str | None = None) -> TurnRecord:
    return TurnRecord(text.encode(), [(f"msg_{text}_q", "user", text), (f"msg_{text}_a", "assistant", "ok")],
                      response_id, {"id": response_id} if response_id else None, "owner")  # fmt: skip


def test_turns_are_written_once_in_order_and_snapshots_pruned(store):
    store.create_conversation("conv_a", "owner", "model-1", {"k": "v"}, b"stm0")
    store.record_turns("conv_a", 0, [turn("t0", "resp_0")])
    with pytest.raises(ConflictError, match="another request wrote it first"):
        store.record_turns("conv_a", 0, [turn("t0bis")])  # turn 0 again: refused
    with pytest.raises(ConflictError):
        store.record_turns("conv_a", 1, [turn("t1")])  # turn 0's memory is still pending
    assert store.pending_turns("conv_a") == (0, [b"t0"])
    assert store.pending_conversations() == ["conv_a"]
    assert not store.apply_turn("conv_a", 1, b"stm2")  # out of order
    assert store.apply_turn("conv_a", 0, b"stm1")
    assert not store.apply_turn("conv_a", 0, b"other")  # re-applying is a no-op
    assert store.get_snapshot("conv_a", 1) == b"stm1" and store.pending_conversations() == []
    store.record_turns("conv_a", 1, [turn("t1", "resp_1"), turn("t2")])  # a turn + a memory write, atomically
    assert store.apply_turn("conv_a", 1, b"stm2") and store.apply_turn("conv_a", 2, b"stm3")
    assert store.snapshot_versions("conv_a") == [2, 3]  # keep_snapshots=2
    row = store.get_conversation("conv_a")
    assert (row.turn_count, row.version, row.head_response_id, row.metadata) == (3, 3, "resp_1", {"k": "v"})
    items = store.list_items("conv_a", limit=100)
    assert [i.content for i in items] == ["t0", "ok", "t1", "ok", "t2", "ok"]
    assert [i.seq for i in items] == list(range(6))
    newest_first = store.list_items("conv_a", after_seq=4, limit=10, descending=True)  # items before seq 4
    assert [i.content for i in newest_first] == ["ok", "t1", "ok", "t0"]
    assert store.get_response("resp_1") == ("owner", "conv_a", 1, {"id": "resp_1"})
    assert store.delete_conversation("conv_a") and store.get_conversation("conv_a") is None
    assert store.get_response("resp_1") is not None  # responses outlive their conversation
    with pytest.raises(ConflictError, match="no longer exists"):
        store.record_turns("conv_a", 3, [turn("t3")])


def test_concurrent_writers_record_turn_n_once(store):
    store.create_conversation("conv_b", "owner", "model-1", {}, b"stm0")
    outcomes = []

    def writer(tag):
        try:
            store.record_turns("conv_b", 0, [turn(f"w{tag}")])
            outcomes.append("ok")
        except ConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["conflict"] * 7 + ["ok"]
    assert store.get_conversation("conv_b").turn_count == 1 and len(store.list_items("conv_b")) == 2


def test_per_row_sampling_greedy_rows_and_top_p():
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0], [0.0, 0.1, 0.2, 5.0]])
    out = _PerRowSampling([SamplingParams(4, 0.0), SamplingParams(4, 2.0, 0.6), SamplingParams(4, 1.0, 1.0)],
                          "cpu")(None, scores)  # fmt: skip
    assert torch.isfinite(out[0]).tolist() == [False, True, False, False]  # greedy: the argmax only
    probs = (scores[1] / 2.0).softmax(-1)  # temperature 2: [0.19, 0.51, 0.31, 0.11] sorted 1, 2, 0, 3
    assert probs[1] < 0.6 < probs[1] + probs[2]
    assert torch.isfinite(out[1]).tolist() == [False, True, True, False]  # smallest set reaching top_p
    torch.testing.assert_close(out[1, [1, 2]], scores[1, [1, 2]] / 2.0)
    torch.testing.assert_close(out[2], scores[2])  # temperature 1, top_p 1: untouched


class _CountingBackend:
    def __init__(self):
        self.batches = []

    def update(self, states, interactions):
        self.batches.append(len(states))
        return [state + 1 for state in states]


def test_engine_batches_updates_waits_for_delay_and_expedite():
    backend = _CountingBackend()
    engine = Engine(backend, max_batch_size=4, update_delay=60.0)
    try:
        futures = [engine.submit_update(torch.zeros(1), [1]) for _ in range(3)]
        time.sleep(0.3)
        assert not any(f.done() for f in futures)  # waiting to join a larger batch
        started = time.monotonic()
        engine.expedite()  # a turn needs one of them
        assert [f.result(timeout=10).item() for f in futures] == [1, 1, 1]
        assert time.monotonic() - started < 5 and backend.batches == [3]
        more = [engine.submit_update(torch.zeros(1), [1]) for _ in range(6)]  # a full batch runs at once
        assert more[3].result(timeout=10).item() == 1 and backend.batches[1] == 4
        engine.expedite()
        assert all(f.result(timeout=10).item() == 1 for f in more)
    finally:
        engine.close()
