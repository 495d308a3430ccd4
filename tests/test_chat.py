"""Chat-level inference (docs/spec.md#inference): memory-update ids = prompt + generated ids, memory initialisation
from text (default / force / noise), RxT-Beta templates and thinking modes, batches, background updates."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LogitsProcessorList, PreTrainedTokenizerFast

from modeling_rxt import RxTCache, RxTChatSession
from modeling_rxt.tokenization_rxt import (
    RXT_SPECIAL_TOKENS,
    RXT_TEMPLATES,
    RXT_TOKEN_ID_FIELDS,
    render_system,
    render_turn_prompt,
)

A, T, EOS = (
    RXT_SPECIAL_TOKENS.index(RXT_TOKEN_ID_FIELDS[f]) for f in ("answer_token_id", "think_token_id", "eos_token_id")
)


def record_updates(session, monkeypatch):
    """Capture the (ids, mask) of every memory update of `session`."""
    calls, original = [], session.model.update_memory

    def wrapped(input_ids, attention_mask=None, stm=None):
        calls.append((input_ids.clone(), attention_mask.clone()))
        return original(input_ids, attention_mask, stm)

    monkeypatch.setattr(session.model, "update_memory", wrapped)
    return calls


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class EosAt:
    """Logits processor: row `row` emits [EOS] at generated step `step` (0-based)."""

    def __init__(self, prompt_length, row, step):
        self.at, self.row = prompt_length + step, row

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            scores = scores.clone()
            scores[self.row] = float("-inf")
            scores[self.row, EOS] = 0.0
        return scores


def single_turn(model, tokenizer, stm, prompt, max_new_tokens, **kwargs):
    """Reference: one unbatched generate from `stm` → generated ids (cut after the first [EOS])."""
    prompt_ids = torch.tensor([ids(tokenizer, prompt)])
    out = model.generate(prompt_ids, cache=RxTCache(stm=stm.clone()), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=EOS, pad_token_id=0, **kwargs)[0, prompt_ids.shape[1]:].tolist()  # fmt: skip
    return out[: out.index(EOS) + 1] if EOS in out else out


@pytest.mark.parametrize("background", [False, True])
def test_update_ids_are_prompt_plus_generated_batched(model, tokenizer, monkeypatch, background):
    session = RxTChatSession(model, tokenizer, batch_size=2, background_update=background)
    calls = record_updates(session, monkeypatch)
    queries = ["hi", "my name is alice and i live in paris"]  # different prompt lengths (left padding)
    prompts = [f"[BOS][Q]{q}[A]" for q in queries]
    longest = max(len(ids(tokenizer, p)) for p in prompts)
    stm = session.stm.clone()
    # row 1 stops with [EOS] after 2 tokens, row 0 runs to the length limit (no [EOS], docs/spec.md#one-turn)
    eos = LogitsProcessorList([EosAt(longest, row=1, step=2)])
    answers = session.interact(queries, max_new_tokens=6, logits_processor=eos)
    session.wait()
    (got_ids, got_mask), = calls
    generated = [single_turn(model, tokenizer, stm[:, :1], prompts[0], 6),
                 single_turn(model, tokenizer, stm[:, 1:], prompts[1], 6,
                             logits_processor=LogitsProcessorList([EosAt(len(ids(tokenizer, prompts[1])), 0, 2)]))]  # fmt: skip
    assert len(generated[0]) == 6 and EOS not in generated[0]
    assert len(generated[1]) == 3 and generated[1][-1] == EOS
    for row in range(2):
        expected = ids(tokenizer, prompts[row]) + generated[row]
        n = len(expected)
        assert got_ids[row, :n].tolist() == expected  # right-padded, compacted
        assert got_mask[row].tolist() == [1] * n + [0] * (got_ids.shape[1] - n)
        assert (got_ids[row, n:] == 0).all()
        assert answers[row] == tokenizer.decode([t for t in generated[row] if t != EOS], skip_special_tokens=True)
    assert got_ids.shape[1] == max(len(ids(tokenizer, p)) + len(g) for p, g in zip(prompts, generated))
    # the new STM is exactly the update from those ids
    expected_stm = model.update_memory(got_ids, got_mask, stm)
    torch.testing.assert_close(session.stm, expected_stm)


def test_init_stm_default_force_noise(model, tokenizer):
    session = RxTChatSession(model, tokenizer, batch_size=2)
    texts = ["my name is alice", "alice"]  # 8 tokens (= S) and fewer (right-padded to S in force mode)
    rendered = [session.render_system(t) for t in texts]
    assert rendered[0] == f"[BOS][Q]{texts[0]}[A][EOS]" == render_system(texts[0])
    rows = [ids(tokenizer, r) for r in rendered]
    slots = model.config.stm_shape[1]
    assert len(rows[0]) == slots and len(rows[1]) < slots
    padded = torch.tensor([r + [0] * (slots - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (slots - len(r)) for r in rows])
    # default: one memory-attention update from a fresh initial STM
    session.interact(["hi", "hello"], max_new_tokens=2)
    stm = session.init_stm(texts)
    torch.testing.assert_close(stm, model.update_memory(padded, mask, model.initial_stm(2)))
    assert torch.equal(session.stm, stm)
    # force: ED copied into the STM (T == S; shorter texts right-padded to S)
    forced = session.init_stm(texts, force=True)
    torch.testing.assert_close(forced, model.encode(padded, mask), rtol=0, atol=0)
    torch.testing.assert_close(forced[:, :1], model.encode(padded[:1]))  # row with T == S: its own ED
    exact = torch.randint(11, len(tokenizer), (1, slots))
    torch.testing.assert_close(model.init_stm(exact, force=True), model.encode(exact), rtol=0, atol=0)
    text = texts[0]
    with pytest.raises(ValueError, match=rf"T={slots + 1} tokens and the STM S={slots} slots"):
        model.init_stm(torch.randint(11, len(tokenizer), (1, slots + 1)), force=True)
    with pytest.raises(ValueError, match=r"T=\d+ tokens and the STM S=8"):
        session.init_stm("my name is alice and i live in paris number 7", force=True)
    # noise on ED changes the STM (both modes); seeded noise is reproducible
    for force in (False, True):
        clean = session.init_stm(text, force=force)
        noisy = session.init_stm(text, force=force, noise_level=0.5, generator=torch.Generator().manual_seed(1))
        again = session.init_stm(text, force=force, noise_level=0.5, generator=torch.Generator().manual_seed(1))
        assert not torch.allclose(clean, noisy) and torch.equal(noisy, again)
    # reset = the fresh initial STM; a turn after init works
    session.reset()
    assert torch.equal(session.stm, model.initial_stm(2))


def test_init_stm_beta_system_template_and_chat_template(model, tokenizer, monkeypatch):
    session = RxTChatSession(model, tokenizer, background_update=True)
    monkeypatch.setattr(model.config, "system_template", RXT_TEMPLATES["system_beta"])
    monkeypatch.setattr(model.config, "system_prompt_title", "RULES")
    assert session.render_system("be brief") == "[BOS][I]RULES\n\nbe brief[EOS]"
    calls = []
    original = model.encode
    monkeypatch.setattr(model, "encode", lambda i, m=None: calls.append(i.clone()) or original(i, m))
    session.init_stm("be brief")
    assert calls[0][0].tolist() == ids(tokenizer, "[BOS][I]RULES\n\nbe brief[EOS]")
    assert isinstance(session.interact("hi", max_new_tokens=2), str)
    # the chat template's system role renders with the config template when given, Alpha otherwise
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             system_template=model.config.system_template,
                                             system_prompt_title=model.config.system_prompt_title)  # fmt: skip
    assert rendered == "[BOS][I]RULES\n\nbe brief[EOS][BOS][Q]hi[A]"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "[BOS][Q]be brief[A][EOS][BOS][Q]hi"


def test_thinking_modes_first_token(model, tokenizer, monkeypatch):
    session = RxTChatSession(model, tokenizer, batch_size=2)
    queries = ["hi", "my name is alice"]
    calls = record_updates(session, monkeypatch)
    for mode, token in (("fast", A), ("extended", T)):
        stm = session.stm.clone()
        answers = session.interact(queries, thinking_mode=mode, internal="be brief", max_new_tokens=3)
        got, mask = calls[-1]
        for row, q in enumerate(queries):
            prompt = ids(tokenizer, f"[BOS][I]be brief[Q]{q}")
            assert got[row, : len(prompt) + 1].tolist() == prompt + [token]  # forced token is part of the output
            assert answers[row].startswith("[A]" if token == A else "[T]")
            # later tokens are generated normally: same as an unbatched generate after prompt + forced token
            forced = f"[BOS][I]be brief[Q]{q}" + ("[A]" if token == A else "[T]")
            rest = single_turn(model, tokenizer, stm[:, row : row + 1], forced, 2)
            assert got[row, len(prompt) + 1 : int(mask[row].sum())].tolist() == rest
    # auto: the larger of the [A]/[T] logits of one forward of the prompt, for the first token only
    for bias in (5.0, -5.0):
        with torch.no_grad():
            model.lm_head.bias[T] += bias
        try:
            stm = session.stm.clone()
            prompts = [f"[BOS][Q]{q}" for q in queries]
            logits = torch.stack([model(torch.tensor([ids(tokenizer, p)]), stm=stm[:, i : i + 1]).logits[0, -1]
                                  for i, p in enumerate(prompts)])  # fmt: skip
            expected = [T if row[T] > row[A] else A for row in logits.tolist()]
            session.interact(queries, thinking_mode="auto", max_new_tokens=2)
            got, _ = calls[-1]
            for row in range(2):
                assert got[row, len(ids(tokenizer, prompts[row]))].item() == expected[row]
            assert expected == ([T, T] if bias > 0 else [A, A])  # the bias flips the choice
        finally:
            with torch.no_grad():
                model.lm_head.bias[T] -= bias


def test_tool_result_turn_prompt(model, tokenizer, monkeypatch):
    assert render_turn_prompt("42", "tool_result") == "[BOS][U]42"
    assert render_turn_prompt("42", "tool_result", internal="cite it") == "[BOS][I]cite it[U]42"
    assert render_turn_prompt("hi", internal="x") == "[BOS][I]x[Q]hi"
    session = RxTChatSession(model, tokenizer, batch_size=2, background_update=True)
    calls = record_updates(session, monkeypatch)
    replies = session.tool_result(["42", "paris number 7"], internal=["cite it", None], thinking_mode="fast",
                                  max_new_tokens=3)  # fmt: skip
    session.wait()
    got, _ = calls[0]
    for row, prompt in enumerate(["[BOS][I]cite it[U]42", "[BOS][U]paris number 7"]):
        expected = ids(tokenizer, prompt) + [A]
        assert got[row, : len(expected)].tolist() == expected
        assert replies[row].startswith("[A]")
    assert isinstance(session.tool_result(["1", "2"], max_new_tokens=2), list)  # free first token


def test_missing_beta_tokens_and_bad_modes(model, tokenizer):
    backend = Tokenizer(models.BPE(unk_token=RXT_TOKEN_ID_FIELDS["unk_token_id"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = RXT_SPECIAL_TOKENS[:7]  # Alpha's tokens: no [T], [C], [U], [I]
    backend.train_from_iterator(["hello there"] * 5, trainers.BpeTrainer(
        vocab_size=280, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))  # fmt: skip
    named = {field[: -len("_id")]: RXT_TOKEN_ID_FIELDS[field]
             for field in ("pad_token_id", "unk_token_id", "bos_token_id", "eos_token_id", "mask_token_id")}  # fmt: skip
    alpha = PreTrainedTokenizerFast(tokenizer_object=backend, extra_special_tokens=special[5:], **named)
    session = RxTChatSession(model, alpha)
    assert isinstance(session.interact("hello", thinking_mode="fast", max_new_tokens=2), str)  # [A] is enough
    with pytest.raises(ValueError, match=r"thinking_mode='extended' needs the \[T\] token"):
        session.interact("hello", thinking_mode="extended")
    with pytest.raises(ValueError, match=r"thinking_mode='auto' needs the \[T\] token"):
        session.interact("hello", thinking_mode="auto")
    with pytest.raises(ValueError, match=r"tool-result turn needs the \[U\] token"):
        session.tool_result("42")
    with pytest.raises(ValueError, match=r"internal instruction needs the \[I\] token"):
        session.interact("hello", internal="x")
    with pytest.raises(ValueError, match="thinking_mode='slow'"):
        RxTChatSession(model, tokenizer).interact("hello", thinking_mode="slow")
