"""Reliability of the model and chat-session API: checked STM and inputs wherever they enter (clear ValueErrors before
any compute), STM files and broken weights named by path, strict top-level config, thread-safe session state, one
answer per conversation, and RxT control tokens in user text never turned into control tokens."""

import os
import threading

import pytest
import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaConfig, LogitsProcessorList

from modeling_rxt import RxTCache, RxTChatSession, RxTConfig, RxTForCausalLM
from modeling_rxt.tokenization_rxt import RXT_SPECIAL_TOKENS, RXT_TEMPLATES


def prompt_ids(batch=2, length=5, vocab=300):
    return torch.randint(11, vocab, (batch, length), generator=torch.Generator().manual_seed(batch * 10 + length))


@pytest.fixture
def no_compute(model, monkeypatch):
    """Fail the test if the embedding runs (the checks must come before any compute)."""

    def compute(*args, **kwargs):
        raise AssertionError("computed before the inputs were checked")

    monkeypatch.setattr(model.model.embed_tokens, "forward", compute)


# -- STM validation wherever it enters ---------------------------------------------------------------------------
def bad_stms(model):
    stm = model.initial_stm(2)
    nan = stm.clone()
    nan[1, 0, 3, 5] = float("nan")
    inf = stm.clone()
    inf[0, 1, 0, 0] = float("inf")
    return {
        "NaN or Inf": nan,
        "NaN or Inf ": inf,
        r"expected \[L=2, batch, S=8, D=32\]": torch.cat([stm, stm[:1]]),  # an extra layer
        r"shape \(2, 2, 9, 32\)": torch.cat([stm, stm[:, :, :1]], dim=2),  # an extra slot
        "D=32": stm[..., :16],
        "stm batch 3 does not fit the input batch 2": model.initial_stm(3),
        "dtype torch.float64, expected the model's dtype torch.float32": stm.double(),
        "expected a floating dtype": stm.long(),
        "is on meta, expected the model's device cpu": torch.empty(stm.shape, device="meta"),
    }


@pytest.mark.parametrize("problem", list(range(9)))
def test_bad_stm_in_a_cache_is_refused_by_forward_and_generate(model, problem, no_compute):
    match, stm = list(bad_stms(model).items())[problem]
    ids = prompt_ids()
    with pytest.raises(ValueError, match=match.strip()):
        model(ids, cache=RxTCache(stm=stm))
    with pytest.raises(ValueError, match=match.strip()):
        model.generate(ids, cache=RxTCache(stm=stm), max_new_tokens=2, do_sample=False)
    if "batch" not in match:  # a stm argument is checked the same way
        with pytest.raises(ValueError, match=match.strip()):
            model(ids, stm=stm)


@pytest.mark.parametrize("problem", [0, 2, 3, 6])
def test_bad_stm_is_refused_by_update_memory(model, problem, no_compute):
    match, stm = list(bad_stms(model).items())[problem]
    with pytest.raises(ValueError, match=match.strip()):
        model.update_memory(prompt_ids(), None, RxTCache(stm=stm))
    with pytest.raises(ValueError, match=match.strip()):
        model(prompt_ids(), stm=stm, mode="memory_update")


def test_stm_finiteness_checked_once_per_turn_not_per_token(model, monkeypatch):
    """One fused isfinite() over the STM and one aminmax over the ids when a turn enters; decode steps add none."""
    counts = {"isfinite": 0, "aminmax": 0}
    for name in counts:
        original = getattr(torch, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, counted)
    model.generate(prompt_ids(1), cache=RxTCache(stm=model.initial_stm(1)), max_new_tokens=6, min_new_tokens=6,
                   do_sample=False)  # fmt: skip
    assert counts == {"isfinite": 1, "aminmax": 1}


# -- input checks before any compute -----------------------------------------------------------------------------
def test_bad_inputs_are_refused_before_compute(model, no_compute):
    ids = prompt_ids()
    cases = [
        (dict(input_ids=ids, attention_mask=torch.ones(2, 4)), r"attention_mask has shape \(2, 4\), expected \(2, 5\)"),
        (dict(input_ids=ids, attention_mask=torch.ones(3, 5)), r"attention_mask has shape \(3, 5\)"),
        (dict(input_ids=ids, attention_mask=torch.zeros(2, 5)), "attention_mask is all zeros"),
        (dict(input_ids=ids.clone().index_fill_(1, torch.tensor([2]), 300)), r"token id 300, expected ids in \[0, 300\)"),
        (dict(input_ids=ids.clone().index_fill_(1, torch.tensor([0]), -1)), r"token id -1"),
        (dict(input_ids=ids.float()), "integer token ids, got dtype torch.float32"),
        (dict(input_ids=ids.bool()), "integer token ids"),
        (dict(inputs_embeds=torch.zeros(2, 5, 16)), r"inputs_embeds has shape \(2, 5, 16\), expected \[batch, tokens, D=32\]"),
        (dict(input_ids=ids, labels=ids[:, :4]), r"labels has shape \(2, 4\), expected \(2, 5\)"),
        (dict(input_ids=ids, labels=ids.float()), "labels must be integer token ids"),
        (dict(input_ids=ids, cache=(torch.zeros(1), torch.zeros(1))), "legacy tuple-of-tensors cache"),
        (dict(input_ids=ids, cache=RxTCache(), past_key_values=RxTCache()), "Both `past_key_values` and `cache` are set"),
    ]  # fmt: skip
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            model(**kwargs)
    with pytest.raises(ValueError, match=r"token id 300"):
        model.update_memory(ids.clone().fill_(300))
    with pytest.raises(ValueError, match=r"token id 300"):
        model.generate(ids.clone().fill_(300), cache=RxTCache(), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"cache must be an RxTCache .*got tuple"):
        model.generate(ids, cache=((torch.zeros(1),),), max_new_tokens=2)


def test_valid_inputs_still_work(model):
    ids = prompt_ids()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    out = model(ids, attention_mask=mask, labels=ids)
    assert out.logits.shape == (2, 5, 300) and torch.isfinite(out.loss)
    generated = model.generate(ids, attention_mask=mask, cache=RxTCache(), max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 8)


# -- configs and folders -----------------------------------------------------------------------------------------
def test_top_level_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"RxTConfig: unknown field\(s\) \['memory_attention_varient'\]"):
        RxTConfig.tiny(memory_attention_varient="simple")
    fields = RxTConfig.tiny().to_dict()
    fields["stm_int"] = "zeros"
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['stm_int'\]"):
        RxTConfig(**fields)
    del fields["stm_int"]
    assert RxTConfig(**fields).stm_shape == (2, 8, 32)  # a saved config's own keys are all known


def test_stateless_config_rejects_unknown_fields(tmp_path):
    from modeling_rxt import RxTStatelessConfig, RxTStatelessForCausalLM

    with pytest.raises(ValueError, match=r"RxTStatelessConfig: unknown field\(s\) \['rope_layot'\]"):
        RxTStatelessConfig.from_rxt_config(RxTConfig.tiny(), rope_layot="split")
    config = RxTStatelessConfig.from_rxt_config(RxTConfig.tiny())
    RxTStatelessForCausalLM(config).save_pretrained(tmp_path)  # a saved folder's own keys are all known
    assert RxTStatelessConfig.from_pretrained(tmp_path).to_dict() == config.to_dict() | {
        k: v for k, v in RxTStatelessConfig.from_pretrained(tmp_path).to_dict().items() if k not in config.to_dict()
    }
    fields = config.to_dict()
    fields["tie_word_embedings"] = True
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['tie_word_embedings'\]"):
        RxTStatelessConfig(**fields)


def test_from_pretrained_refuses_another_model_type(tmp_path, monkeypatch):
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4).save_pretrained(tmp_path)
    built = []
    monkeypatch.setattr(RxTConfig, "validate_model", lambda self: built.append(self))
    for load in (RxTConfig.from_pretrained, RxTForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=rf"{tmp_path} holds a config of model_type='llama', expected 'rxt'"):
            load(str(tmp_path))
    assert built == []  # refused before an RxTConfig was built


def test_unreadable_weights_name_the_folder(tmp_path):
    model = RxTForCausalLM(RxTConfig.tiny())
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    for broken in (data[: len(data) // 2], b"not a safetensors file at all"):
        weights.write_bytes(broken)
        with pytest.raises(ValueError, match=rf"from_pretrained\({tmp_path}\): a weights file is unreadable .*"
                                             r"\['model.safetensors'\]. Expected complete safetensors"):  # fmt: skip
            RxTForCausalLM.from_pretrained(str(tmp_path))


# -- STM files ---------------------------------------------------------------------------------------------------
def saved_session(model, tokenizer, path, batch_size=1):
    session = RxTChatSession(model, tokenizer, batch_size=batch_size)
    session.interact("my name is alice" if batch_size == 1 else ["my name is alice"] * batch_size, max_new_tokens=3)
    session.save(str(path))
    return session.stm.clone()


def test_broken_stm_files_name_the_path(model, tokenizer, tmp_path):
    good = tmp_path / "good.safetensors"
    stm = saved_session(model, tokenizer, good)
    data = good.read_bytes()
    truncated, text, pickled, other = (tmp_path / n for n in ("cut.safetensors", "x.txt", "stm.pt", "other.safetensors"))
    truncated.write_bytes(data[:-10])
    text.write_text("hello")
    torch.save({"stm": stm}, pickled)
    save_file({"memory": stm}, str(other))
    cases = [
        (truncated, "is not a complete safetensors file"),
        (text, "is not a complete safetensors file"),
        (pickled, "is a torch.save archive/pickle, not safetensors"),
        (other, r"is a safetensors file without an 'stm' tensor \(tensors \['memory'\]\)"),
    ]
    for path, what in cases:
        with pytest.raises(ValueError, match=f"{path} {what}.*expected a safetensors file with an 'stm' tensor"):
            RxTChatSession.load(model, tokenizer, str(path))
    with pytest.raises(FileNotFoundError, match="missing.safetensors: no such file"):
        RxTChatSession.load(model, tokenizer, str(tmp_path / "missing.safetensors"))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"stm": stm[:, :, :4].contiguous()}, str(wrong))
    with pytest.raises(ValueError, match=rf"{wrong}: stm has shape \(2, 1, 4, 32\), expected"):
        RxTChatSession.load(model, tokenizer, str(wrong))
    assert torch.equal(RxTChatSession.load(model, tokenizer, good).stm, stm)


def test_stm_file_of_another_dtype_is_refused_or_converted_explicitly(model, tokenizer, tmp_path):
    stm = saved_session(model, tokenizer, tmp_path / "s.safetensors")
    double = tmp_path / "double.safetensors"
    save_file({"stm": stm.double()}, str(double))
    with pytest.raises(ValueError, match=f"{double} holds an STM in torch.float64, but the model runs in torch.float32"):
        RxTChatSession.load(model, tokenizer, str(double))
    converted = RxTChatSession.load(model, tokenizer, str(double), convert_dtype=True)
    assert converted.stm.dtype == torch.float32 and torch.equal(converted.stm, stm)


def test_load_batch_size_is_honoured_or_refused(model, tokenizer, tmp_path):
    single = saved_session(model, tokenizer, tmp_path / "one.safetensors")
    pair = saved_session(model, tokenizer, tmp_path / "two.safetensors", batch_size=2)
    repeated = RxTChatSession.load(model, tokenizer, str(tmp_path / "one.safetensors"), batch_size=3)
    assert repeated.stm.shape[1] == 3 and all(torch.equal(repeated.stm[:, i : i + 1], single) for i in range(3))
    assert len(repeated.interact(["a", "b", "c"], max_new_tokens=2)) == 3
    assert torch.equal(RxTChatSession.load(model, tokenizer, tmp_path / "two.safetensors", batch_size=2).stm, pair)
    with pytest.raises(ValueError, match="batch_size=3 but the STM holds 2 conversations; expected batch_size=2"):
        RxTChatSession.load(model, tokenizer, str(tmp_path / "two.safetensors"), batch_size=3)
    with pytest.raises(ValueError, match="batch_size=0: expected a positive integer"):
        RxTChatSession(model, tokenizer, batch_size=0)


# -- session: one answer per conversation, lock ------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(do_sample=True, num_return_sequences=2), "num_return_sequences=2"),
        (dict(num_beams=2), "num_beams=2"),
        (dict(generation_config=GenerationConfig(num_beams=3, max_new_tokens=3)), "num_beams=3"),
        (dict(cache=RxTCache()), "cache= is set by the session"),
    ],
)
def test_session_keeps_one_answer_per_conversation(model, tokenizer, kwargs, match):
    session = RxTChatSession(model, tokenizer)
    session.interact("my name is alice", max_new_tokens=3)
    before = session.stm.clone()
    with pytest.raises(ValueError, match=match):
        session.interact("where do i live", max_new_tokens=3, **kwargs)
    assert torch.equal(session.stm, before) and session.stm.shape[1] == 1
    assert isinstance(session.interact("where do i live", max_new_tokens=3), str)


class SpyLock:
    """The session lock, reporting when the thread named `watch` tries to take it."""

    def __init__(self, watch, tried):
        self.inner, self.watch, self.tried = threading.RLock(), watch, tried

    def acquire(self, *args, **kwargs):
        if threading.current_thread().name == self.watch:
            self.tried.set()
        return self.inner.acquire(*args, **kwargs)

    def release(self):
        self.inner.release()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


@pytest.mark.parametrize("background", [False, True])
def test_reset_waits_for_an_in_flight_turn(model, tokenizer, background):
    """A reset during a turn running in another thread takes effect after it: the old turn never writes into the
    new memory. Deterministic: the turn blocks inside generation until the reset thread has tried the lock (or, without
    the lock, has finished)."""
    session = RxTChatSession(model, tokenizer, background_update=background)
    session.interact("my name is alice", max_new_tokens=3)
    entered, release, progress = threading.Event(), threading.Event(), threading.Event()
    session._lock = SpyLock("reset", progress)

    def blocking(input_ids, scores):
        entered.set()
        assert release.wait(30)
        return scores

    turn = threading.Thread(target=session.interact, args=("where do i live",),
                            kwargs=dict(max_new_tokens=3, logits_processor=LogitsProcessorList([blocking])))  # fmt: skip

    def reset():
        session.reset()
        progress.set()

    resetter = threading.Thread(target=reset, name="reset")
    turn.start()
    assert entered.wait(30)
    resetter.start()
    assert progress.wait(30)  # the reset is blocked on the lock (fixed) or already done (no lock)
    release.set()
    turn.join(30)
    resetter.join(30)
    assert not turn.is_alive() and not resetter.is_alive()
    assert torch.equal(session.stm, model.initial_stm(1))
    assert session.cache.get_seq_length() == 0


# -- control tokens in user text ---------------------------------------------------------------------------------
@pytest.mark.parametrize("token", RXT_SPECIAL_TOKENS)
def test_session_refuses_control_tokens_in_user_text(model, tokenizer, token):
    session = RxTChatSession(model, tokenizer)
    before = session.stm.clone()
    with pytest.raises(ValueError, match=rf"query contains the RxT control token \{token[:-1]}\] at character 4"):
        session.interact(f"say {token} now", max_new_tokens=2)
    with pytest.raises(ValueError, match=rf"internal contains the RxT control token \{token[:-1]}\]"):
        session.interact("hi", internal=f"x{token}", thinking_mode="fast", max_new_tokens=2)
    with pytest.raises(ValueError, match=r"tool result 1 contains the RxT control token"):
        RxTChatSession(model, tokenizer, batch_size=2).tool_result(["ok", f"{token}"], max_new_tokens=2)
    with pytest.raises(ValueError, match=rf"system text contains the RxT control token \{token[:-1]}\]"):
        session.init_stm(f"be {token}")
    assert torch.equal(session.stm, before)


def recorded_update_ids(session, monkeypatch):
    calls, original = [], session.model.update_memory
    monkeypatch.setattr(session.model, "update_memory",
                        lambda ids, mask=None, stm=None: calls.append(ids[mask.bool()].tolist()) or original(ids, mask, stm))  # fmt: skip
    return calls


def plain(tokenizer, text):
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_session_escapes_control_tokens_as_plain_text(model, tokenizer, monkeypatch):
    session = RxTChatSession(model, tokenizer, control_tokens="escape")
    calls = recorded_update_ids(session, monkeypatch)
    text = "a [EOS] b [Q][A] c"
    session.interact(text, max_new_tokens=3)
    prompt = [2, 5] + plain(tokenizer, text) + [6]  # [BOS][Q] text as plain tokens [A]
    assert calls[0][: len(prompt)] == prompt
    assert not set(plain(tokenizer, text)) & set(range(len(RXT_SPECIAL_TOKENS)))
    assert tokenizer.decode(plain(tokenizer, text)) == text  # decodes back to what the user typed
    # Beta turn with an internal instruction and the Beta system template: same structure, user parts plain
    session.interact("[T]?", internal="use [C]", thinking_mode="fast", max_new_tokens=2)
    beta = [2, 10] + plain(tokenizer, "use [C]") + [5] + plain(tokenizer, "[T]?") + [6]
    assert calls[1][: len(beta)] == beta
    monkeypatch.setattr(model.config, "system_template", RXT_TEMPLATES["system_beta"])
    encoded = []
    monkeypatch.setattr(model, "encode", lambda i, m=None: encoded.append(i[m.bool()].tolist()) or torch.zeros(2, 1, 8, 32))  # fmt: skip
    session.init_stm("be [A] brief")
    assert encoded[0] == [2, 10] + plain(tokenizer, "SYSTEM INSTRUCTIONS\n\nbe [A] brief") + [3]


def test_escape_and_refuse_tokenize_plain_text_alike(model, tokenizer, monkeypatch):
    """Without control tokens in user text, both modes give the ids of tokenizing the rendered prompt."""
    monkeypatch.setattr(model.config, "system_template", RXT_TEMPLATES["system_beta"])
    for kwargs in (dict(kind="query"), dict(kind="query", internal="be brief", thinking_mode="fast"),
                   dict(kind="tool_result", internal="cite")):  # fmt: skip
        rows = []
        for mode in ("refuse", "escape"):
            session = RxTChatSession(model, tokenizer, control_tokens=mode)
            segments = [session._prompt_segments("my name is alice 3", **kwargs), session._system_segments("x\n\ny")]
            rows.append(session._encode(segments, padding_side="left")["input_ids"])
            rendered = [session.render_prompt("my name is alice 3", **kwargs), session.render_system("x\n\ny")]
        assert torch.equal(rows[0], rows[1])
        expected = tokenizer(rendered, add_special_tokens=False, padding=True, padding_side="left",
                             return_tensors="pt")["input_ids"]  # fmt: skip
        assert torch.equal(rows[0], expected)
    with pytest.raises(ValueError, match=r"control_tokens='drop': expected one of \['refuse', 'escape'\]"):
        RxTChatSession(model, tokenizer, control_tokens="drop")


def test_chat_template_refuses_control_tokens_unless_allowed(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "what is [A]?"}]  # fmt: skip
    with pytest.raises(Exception, match=r"message 2 \(user\) contains the control token \[A\]; expected plain text"):
        tokenizer.apply_chat_template(messages, tokenize=False)
    for token in RXT_SPECIAL_TOKENS:
        with pytest.raises(Exception, match=rf"message 0 \(assistant\) contains the control token \{token[:-1]}\]"):
            tokenizer.apply_chat_template([{"role": "assistant", "content": f"x{token}"}], tokenize=False)
    verbatim = tokenizer.apply_chat_template(messages, tokenize=False, control_tokens="allow")
    assert verbatim == "[BOS][Q]hi[A]ok[EOS][BOS][Q]what is [A]?"
    assert tokenizer.apply_chat_template(messages[:2], tokenize=False) == "[BOS][Q]hi[A]ok[EOS]"
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
