"""Tests of the RxT tokenizer (`modeling_rxt/tokenization_rxt.py`) and `scripts/train_tokenizer.py`."""

import json
import os
import subprocess
import sys
import time

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from conftest import REPO_ROOT
from modeling_rxt.tokenization_rxt import (
    RXT_CHAT_TEMPLATE,
    RXT_SPECIAL_TOKENS,
    RXT_TOKEN_ID_FIELDS,
    check_rxt_tokenizer,
    render_interaction,
    render_query,
    train_rxt_tokenizer,
)

EXPECTED_IDS = {field: i for i, field in enumerate(RXT_TOKEN_ID_FIELDS)}  # the table's order fixes the ids
NAMED = ("pad_token_id", "unk_token_id", "bos_token_id", "eos_token_id", "mask_token_id")  # tokenizer attributes
NON_ASCII = "Zażółć gęślą jaźń — 42 °C"


def _corpus():
    from pydoc_data.topics import topics

    return list(topics.values())


def _subprocess_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def tokenizer():
    corpus = _corpus()
    assert sum(len(text) for text in corpus) > 400_000  # the ~0.5 MB corpus the speed requirement is about
    start = time.perf_counter()
    tok = train_rxt_tokenizer(corpus, vocab_size=1024, min_frequency=2)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"training on ~0.5 MB took {elapsed:.2f}s"
    return tok


def _plain_bpe_tokenizer(special_tokens):
    backend = Tokenizer(models.BPE(unk_token=RXT_TOKEN_ID_FIELDS["unk_token_id"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["hello world, a tiny corpus"] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_special_token_ids(tokenizer):
    assert RXT_SPECIAL_TOKENS == list(RXT_TOKEN_ID_FIELDS.values()) and len(RXT_SPECIAL_TOKENS) == 11
    assert tokenizer.convert_tokens_to_ids(RXT_SPECIAL_TOKENS) == list(range(11))
    assert [getattr(tokenizer, field[: -len("_id")]) for field in NAMED] == [RXT_TOKEN_ID_FIELDS[f] for f in NAMED]
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    assert (tokenizer.eos_token_id, tokenizer.mask_token_id) == (3, 4)
    assert set(tokenizer.all_special_ids) == set(range(11))
    assert len(tokenizer) == 1024
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == 1024
    assert check_rxt_tokenizer(tokenizer) == EXPECTED_IDS


def test_chat_template_two_turns(tokenizer):
    messages = [
        {"role": "user", "content": "Hi there?"},
        {"role": "assistant", "content": " Hello!"},
        {"role": "user", "content": "What is 2+2"},
        {"role": "assistant", "content": "4."},
    ]
    expected = "[BOS][Q]Hi there?[A] Hello![EOS][BOS][Q]What is 2+2[A]4.[EOS]"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    assert expected == render_interaction("Hi there?", " Hello!") + render_interaction("What is 2+2", "4.")


def test_chat_template_system_message(tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because."},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "[BOS][Q]You are terse.[A][EOS][BOS][Q]Why?[A]Because.[EOS]"
    assert rendered == render_interaction("You are terse.", "") + render_interaction("Why?", "Because.")


def test_chat_template_generation_prompt(tokenizer):
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"},
    ]
    with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert with_prompt == "[BOS][Q]first[A]one[EOS][BOS][Q]second[A]"
    assert with_prompt == render_interaction("first", "one") + render_query("second")
    assert with_prompt.endswith("[A]")
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert without_prompt == "[BOS][Q]first[A]one[EOS][BOS][Q]second"
    single = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}], tokenize=False, add_generation_prompt=True
    )
    assert single == render_query("q") == "[BOS][Q]q[A]"


def test_chat_template_irregular_conversations(tokenizer):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": [{"type": "text", "text": "b"}, {"type": "text", "text": "c"}]},
        {"role": "assistant", "content": "x"},
        {"role": "assistant", "content": "y"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "[BOS][Q]a[A][EOS][BOS][Q]bc[A]x[EOS][BOS][Q][A]y[EOS]"
    with pytest.raises(Exception, match="unsupported role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_tokenized_interaction_ids(tokenizer):
    interaction = tokenizer(render_interaction("How warm is it?", " 42 °C"))["input_ids"]
    assert interaction[:2] == [2, 5]
    assert interaction[-1] == 3
    assert interaction.count(6) == 1
    assert all(i >= 11 for i in interaction[2:-1] if i != 6)

    prompt = tokenizer(render_query("How warm is it?"))["input_ids"]
    assert prompt[:2] == [2, 5]
    assert prompt[-1] == 6
    assert interaction[: len(prompt)] == prompt

    # apply_chat_template(tokenize=True) gives the same ids, and marks answer + [EOS] as generated
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How warm is it?"}, {"role": "assistant", "content": " 42 °C"}],
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert chat["input_ids"] == interaction
    answer_start = interaction.index(6) + 1
    assert chat["assistant_masks"] == [0] * answer_start + [1] * (len(interaction) - answer_start)


def test_no_automatic_special_tokens(tokenizer):
    text = "plain text"
    with_special = tokenizer(text, add_special_tokens=True)["input_ids"]
    assert with_special == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(i >= 11 for i in with_special)
    pair = tokenizer("first", "second", add_special_tokens=True)["input_ids"]
    assert pair == tokenizer("first", "second", add_special_tokens=False)["input_ids"]
    assert all(i >= 11 for i in pair)


def test_special_tokens_split_inside_text(tokenizer):
    ids = tokenizer("x[Q]y[A]z[T][C][U][I]")["input_ids"]
    assert [i for i in ids if i < 11] == [5, 6, 7, 8, 9, 10]


@pytest.mark.parametrize("text", [NON_ASCII, "  leading spaces,\ttabs\nand newlines\n\n", "emoji 🚀 and 中文"])
def test_round_trip_decode(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert 1 not in ids  # byte-level: nothing is unknown
    assert tokenizer.decode(ids) == text
    rendered = render_interaction(text, text)
    assert tokenizer.decode(tokenizer(rendered)["input_ids"]) == rendered
    assert tokenizer.decode(tokenizer(rendered)["input_ids"], skip_special_tokens=True) == text + text


def test_right_padding(tokenizer):
    batch = tokenizer(["[BOS][Q]a[A]", "[BOS][Q]a much longer query[A]"], padding=True)
    short, long = batch["input_ids"]
    assert len(short) == len(long)
    assert short[-1] == 0 and short[:2] == [2, 5]
    assert batch["attention_mask"][0][-1] == 0


def test_save_and_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == RXT_CHAT_TEMPLATE
    assert check_rxt_tokenizer(reloaded) == EXPECTED_IDS
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 2, 3)
    assert reloaded.padding_side == "right"
    messages = [{"role": "user", "content": NON_ASCII}]
    rendered = reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == render_query(NON_ASCII)
    assert reloaded(rendered)["input_ids"] == tokenizer(rendered)["input_ids"]
    assert reloaded.decode(reloaded(NON_ASCII)["input_ids"]) == NON_ASCII
    assert all(i >= 11 for i in reloaded(NON_ASCII, add_special_tokens=True)["input_ids"])


def test_check_rejects_tokenizer_without_rxt_tokens():
    plain = _plain_bpe_tokenizer(RXT_SPECIAL_TOKENS[:5])  # [PAD] … [MASK]
    with pytest.raises(ValueError) as excinfo:
        check_rxt_tokenizer(plain)
    message = str(excinfo.value)
    assert str(RXT_SPECIAL_TOKENS[5:7]) in message  # the missing [Q], [A]
    assert f"{RXT_SPECIAL_TOKENS[0]}'," not in message.split("expected")[0]
    assert "train_rxt_tokenizer" in message

    nothing = _plain_bpe_tokenizer([])
    with pytest.raises(ValueError) as excinfo:
        check_rxt_tokenizer(nothing)
    assert str(RXT_SPECIAL_TOKENS[:7]) in str(excinfo.value)  # all seven required tokens


def test_check_optional_tokens_absent():
    required_only = _plain_bpe_tokenizer(RXT_SPECIAL_TOKENS[:7])
    ids = check_rxt_tokenizer(required_only)
    assert ids == {key: (value if value <= 6 else None) for key, value in EXPECTED_IDS.items()}


def test_train_rejects_too_small_vocab():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_rxt_tokenizer(["some text"], vocab_size=100)


def test_cli_default_corpus(tmp_path):
    output = tmp_path / "tok"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "train_tokenizer.py"), "--output", str(output)]
        + ["--vocab-size", "512"],
        cwd=tmp_path,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    loaded = AutoTokenizer.from_pretrained(output)
    assert len(loaded) == 512
    assert check_rxt_tokenizer(loaded) == EXPECTED_IDS
    assert loaded.chat_template == RXT_CHAT_TEMPLATE
    assert loaded.decode(loaded(NON_ASCII)["input_ids"]) == NON_ASCII


def test_cli_jsonl_and_text_inputs(tmp_path):
    import train_tokenizer
    jsonl = tmp_path / "data.jsonl"
    records = [
        {"text": "alpha"},
        {"query": "beta?", "answer": "gamma"},
        {"interactions": [{"query": "delta", "answer": "epsilon"}, {"query": "zeta", "answer": "eta"}]},
    ]
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    text = tmp_path / "notes.txt"
    text.write_text("line one\nline two\n", encoding="utf-8")
    assert list(train_tokenizer.iter_file_texts(str(jsonl))) == [
        "alpha", "beta?", "gamma", "delta", "epsilon", "zeta", "eta"
    ]  # fmt: skip
    assert list(train_tokenizer.iter_file_texts(str(text))) == ["line one\n", "line two\n"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:1: no text found"):
        list(train_tokenizer.iter_file_texts(str(bad)))

    output = tmp_path / "tok"
    train_tokenizer.main(["--input", str(jsonl), str(text), "--output", str(output), "--min-frequency", "1"])
    loaded = AutoTokenizer.from_pretrained(output)
    assert check_rxt_tokenizer(loaded) == EXPECTED_IDS
    assert "epsilon" in loaded.decode(loaded("epsilon")["input_ids"])
    assert len(loaded) > 267  # merges were learned from the files
