"""Fault injection for `RxTChatSession`: an exception at each point of a turn (tokenizing, each generate step, the
streamer, decoding, memory encode, memory write, the next turn's memory K/V, the background thread). After each, the
STM is bit for bit the one before the failed turn, the turn state is empty, the error reached the right caller, and
the next turn gives exactly what a session that never saw the failed turn gives."""

import pytest
import torch
from transformers import LogitsProcessorList, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from modeling_rxt import RxTChatSession, tokenization_rxt

NEW_TOKENS = 4


class Injected(Exception):
    """The fault raised by the tests (never raised by the library)."""


def started_session(model, tokenizer, background=False, batch_size=1):
    """A session one turn into the conversation (non-initial STM, next turn's memory K/V projected)."""
    session = RxTChatSession(model, tokenizer, batch_size=batch_size, background_update=background)
    session.interact(query(batch_size, "my name is alice"), max_new_tokens=NEW_TOKENS)
    session.wait()
    return session


def query(batch_size, text):
    return text if batch_size == 1 else [f"{text} {i}" for i in range(batch_size)]


def assert_untouched_and_next_turn_works(session, before, model, tokenizer):
    """STM bit for bit as before, no turn state left; the next turn equals that of a session that starts from
    `before` and never saw the failed turn."""
    assert torch.equal(session.stm, before)
    assert session.cache.get_seq_length() == 0
    batch_size = before.shape[1]
    control = RxTChatSession(model, tokenizer, stm=before.clone())
    expected = control.interact(query(batch_size, "where do i live"), max_new_tokens=NEW_TOKENS)
    got = session.interact(query(batch_size, "where do i live"), max_new_tokens=NEW_TOKENS)
    assert got == expected
    assert torch.equal(session.stm, control.stm)


class RaiseAtStep:
    """Logits processor raising at generated step `step` (0-based)."""

    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.step + 1:
            raise Injected(f"logits processor at step {self.step}")
        return scores


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("step", range(NEW_TOKENS))
def test_logits_processor_raises_at_each_step(model, tokenizer, step, batch_size):
    session = started_session(model, tokenizer, batch_size=batch_size)
    before = session.stm.clone()
    with pytest.raises(Injected):
        session.interact(query(batch_size, "i live in paris"), max_new_tokens=NEW_TOKENS,
                         logits_processor=LogitsProcessorList([RaiseAtStep(step)]))  # fmt: skip
    assert_untouched_and_next_turn_works(session, before, model, tokenizer)


@pytest.mark.parametrize("step", range(NEW_TOKENS))
def test_forward_raises_at_each_step(model, tokenizer, step, monkeypatch):
    session = started_session(model, tokenizer)
    before = session.stm.clone()
    calls, forward = [], model.forward

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == step + 1:  # call 1 = prompt (step 0), then one call per generated token
            raise Injected(f"forward at step {step}")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing)
    with pytest.raises(Injected):
        session.interact("i live in paris", max_new_tokens=NEW_TOKENS + 2)
    monkeypatch.undo()
    assert_untouched_and_next_turn_works(session, before, model, tokenizer)


class DisconnectingStreamer(BaseStreamer):
    """A streamer whose client goes away at its `fail_at`-th `put` (put 1 = the prompt)."""

    def __init__(self, fail_at, error=ConnectionResetError):
        self.fail_at, self.error, self.puts, self.ended = fail_at, error, 0, False

    def put(self, value):
        self.puts += 1
        if self.puts == self.fail_at:
            raise self.error("client disconnected")

    def end(self):
        self.ended = True


@pytest.mark.parametrize("fail_at", [1, 2, NEW_TOKENS])
def test_streamer_raises_mid_generation(model, tokenizer, fail_at):
    session = started_session(model, tokenizer)
    before = session.stm.clone()
    streamer = DisconnectingStreamer(fail_at)
    with pytest.raises(ConnectionResetError):
        session.interact("i live in paris", streamer=streamer, max_new_tokens=NEW_TOKENS)
    assert streamer.ended  # the session closes the stream of a failed turn
    assert_untouched_and_next_turn_works(session, before, model, tokenizer)


def test_keyboard_interrupt_in_streamer(model, tokenizer):
    session = started_session(model, tokenizer, background=True)
    before = session.stm.clone()
    with pytest.raises(KeyboardInterrupt):
        session.interact("i live in paris", streamer=DisconnectingStreamer(2, KeyboardInterrupt), max_new_tokens=4)
    assert_untouched_and_next_turn_works(session, before, model, tokenizer)


def test_failed_generation_releases_a_streamer_reader(model, tokenizer, monkeypatch):
    """A reader iterating a TextIteratorStreamer stops when the turn fails instead of waiting forever."""
    session = started_session(model, tokenizer)
    before = session.stm.clone()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=10)
    with pytest.raises(Injected):
        session.interact("i live in paris", streamer=streamer, max_new_tokens=NEW_TOKENS,
                         logits_processor=LogitsProcessorList([RaiseAtStep(2)]))  # fmt: skip
    assert isinstance("".join(streamer), str)  # terminates (the original code raised queue.Empty after the timeout)
    assert_untouched_and_next_turn_works(session, before, model, tokenizer)


def test_tokenizing_raises(model, tokenizer, monkeypatch):
    session = started_session(model, tokenizer)
    before = session.stm.clone()

    def failing(*args, **kwargs):
        raise Injected("tokenizer")

    monkeypatch.setattr(tokenization_rxt, "tokenize_segments", failing, raising=False)
    monkeypatch.setattr(type(tokenizer), "__call__", failing)
    with pytest.raises(Injected):
        session.interact("i live in paris", max_new_tokens=NEW_TOKENS)
    monkeypatch.undo()
    assert_untouched_and_next_turn_works(session, before, model, tokenizer)


def test_decoding_the_answer_raises(model, tokenizer, monkeypatch):
    session = started_session(model, tokenizer)
    before = session.stm.clone()

    def failing(*args, **kwargs):
        raise Injected("batch_decode")

    monkeypatch.setattr(tokenizer, "batch_decode", failing)
    with pytest.raises(Injected):
        session.interact("i live in paris", max_new_tokens=NEW_TOKENS)
    monkeypatch.undo()
    assert_untouched_and_next_turn_works(session, before, model, tokenizer)


def memory_fault(model, monkeypatch, point):
    """Make one stage of the memory update raise: `encode` (memory encoder), `write` (memory attention) or `kv`
    (projecting the next turn's memory K/V from the new STM, after it was computed)."""

    def failing(*args, **kwargs):
        raise Injected(f"memory {point}")

    target = {"encode": model.model.encoder, "write": model.model.memory_attention, "kv": model}[point]
    monkeypatch.setattr(target, "prepare_memory_kv" if point == "kv" else "forward", failing)


@pytest.mark.parametrize("point", ["encode", "write", "kv"])
def test_foreground_memory_update_raises_to_the_caller(model, tokenizer, monkeypatch, point):
    session = started_session(model, tokenizer)
    before = session.stm.clone()
    memory_fault(model, monkeypatch, point)
    with pytest.raises(Injected, match=f"memory {point}"):  # the turn's own error, not a later "background" one
        session.interact("i live in paris", max_new_tokens=NEW_TOKENS)
    monkeypatch.undo()
    session.wait()  # nothing left to report
    assert_untouched_and_next_turn_works(session, before, model, tokenizer)


@pytest.mark.parametrize("point", ["encode", "write", "kv"])
def test_background_memory_update_failure_is_raised_once_naming_the_turn(model, tokenizer, monkeypatch, point):
    session = started_session(model, tokenizer, background=True)  # turn 1 done
    before = session.stm.clone()
    memory_fault(model, monkeypatch, point)
    answer = session.interact("i live in paris", max_new_tokens=NEW_TOKENS)  # turn 2: answered, update fails later
    assert isinstance(answer, str)
    session._update_thread.join()
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="turn 2 failed") as raised:  # the next call sees it ...
        session.interact("where do i live", max_new_tokens=NEW_TOKENS)
    assert isinstance(raised.value.__cause__, Injected) and raised.value.turn == 2
    session.wait()  # ... once
    assert_untouched_and_next_turn_works(session, before, model, tokenizer)


@pytest.mark.parametrize("call", ["wait", "stm", "save", "init_stm"])
def test_background_failure_surfaces_at_every_waiting_call(model, tokenizer, monkeypatch, tmp_path, call):
    session = started_session(model, tokenizer, background=True)
    before = session.stm.clone()
    memory_fault(model, monkeypatch, "write")
    session.interact("i live in paris", max_new_tokens=NEW_TOKENS)
    session._update_thread.join()
    monkeypatch.undo()
    actions = {"wait": session.wait, "stm": lambda: session.stm, "save": lambda: session.save(tmp_path / "s.pt"),
               "init_stm": lambda: session.init_stm("be brief")}  # fmt: skip
    with pytest.raises(RuntimeError, match="turn 2 failed"):
        actions[call]()
    assert not (tmp_path / "s.pt").exists()  # nothing was saved / initialised by the failing call
    assert_untouched_and_next_turn_works(session, before, model, tokenizer)


def test_reset_discards_a_background_failure(model, tokenizer, monkeypatch):
    session = started_session(model, tokenizer, background=True)
    memory_fault(model, monkeypatch, "encode")
    session.interact("i live in paris", max_new_tokens=NEW_TOKENS)
    session._update_thread.join()
    monkeypatch.undo()
    session.reset()
    assert torch.equal(session.stm, model.initial_stm(1))
    assert isinstance(session.interact("hello", max_new_tokens=2), str)


@pytest.mark.parametrize("point", ["encode", "write"])
def test_init_stm_failure_keeps_the_conversation(model, tokenizer, monkeypatch, point):
    session = started_session(model, tokenizer)
    before = session.stm.clone()
    memory_fault(model, monkeypatch, point)
    with pytest.raises(Injected):
        session.init_stm("be brief")
    monkeypatch.undo()
    assert_untouched_and_next_turn_works(session, before, model, tokenizer)
