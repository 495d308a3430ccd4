"""Tests of the synthetic recall data (`trainers/synthetic.py`, `scripts/make_synthetic_data.py`) and of the loading,
validation and collators of `trainers/data.py`."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from modeling_rxt.tokenization_rxt import train_rxt_tokenizer
from trainers.data import (
    IGNORE_INDEX,
    EpisodeCollator,
    InteractionCollator,
    JointLMCollator,
    encode_interaction,
    encode_text,
    load_rows,
    tokenize_texts,
    truncate_episode,
    validate_rows,
)
from trainers.synthetic import (
    ATTRIBUTES,
    SPLITS,
    _fill,
    chance_level,
    generate_dialogues,
    generate_pretrain,
    generate_sft,
    other_template,
    value_pools,
    write_synthetic_data,
)

PAD, BOS, EOS, MASK, Q, A = 0, 2, 3, 4, 5, 6
SENTENCES = [
    "hi there, how are you?",
    "yo, fine thanks.",
    "hello there my friend",
    "my cat is called Brindle.",
    "what is my cat called?",
    "your cat is called Brindle.",
] * 3


@pytest.fixture(scope="module")
def tok():
    return train_rxt_tokenizer(SENTENCES, vocab_size=300, min_frequency=1)


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def all_turns(row):
    return [(row["query"], row["answer"])] + [(t["query"], t["answer"]) for t in row["interactions"]]


# ---------------------------------------------------------------------------------------------------------- generator


def test_generator_is_deterministic_and_seeded():
    assert generate_dialogues(30, seed=1, split="train") == generate_dialogues(30, seed=1, split="train")
    assert generate_dialogues(30, seed=1, split="train") != generate_dialogues(30, seed=2, split="train")
    assert generate_dialogues(5, seed=1) == generate_dialogues(30, seed=1)[:5]
    assert generate_sft(20, seed=3) == generate_sft(20, seed=3) != generate_sft(20, seed=4)
    assert generate_pretrain(20, seed=3) == generate_pretrain(20, seed=3) != generate_pretrain(20, seed=4)


def test_value_pools_disjoint_between_splits_and_chance():
    pools = {split: value_pools(split) for split in SPLITS}
    assert len(ATTRIBUTES) >= 8 and set(pools["train"]) == {a.name for a in ATTRIBUTES}
    union = {split: set() for split in SPLITS}
    for split in SPLITS:
        for name, values in pools[split].items():
            assert len(values) == len(set(values)) >= 100, (split, name)
            assert all(1 <= len(v.split()) <= 3 for v in values)
            union[split] |= set(values)
        assert len(union[split]) == sum(len(v) for v in pools[split].values())  # no value shared by two attributes
    assert not union["train"] & union["test"]
    assert not union["train"] & union["validation"]
    assert not union["validation"] & union["test"]
    for split in SPLITS:
        expected = sum(1 / len(v) for v in pools[split].values()) / len(pools[split])
        assert chance_level(split) == pytest.approx(expected)
    assert chance_level("test") == pytest.approx(0.005)


@pytest.mark.parametrize("split", SPLITS)
def test_dialogue_probes(split):
    rows = generate_dialogues(300, seed=7, split=split, min_turns=2, max_turns=10, max_distance=8)
    pool_values = {v for values in value_pools(split).values() for v in values}
    distances = set()
    for row in rows:
        turns = all_turns(row)
        assert 2 <= len(turns) <= 10
        assert row["probes"], row
        asked = [p["attribute"] for p in row["probes"]]
        assert len(asked) == len(set(asked))
        for probe in row["probes"]:
            assert 1 <= probe["distance"] <= 8
            assert 0 <= probe["turn"] - probe["distance"] and probe["turn"] < len(turns)
            assert probe["expected"] in pool_values
            assert probe["expected"] in turns[probe["turn"]][1]  # reference answer of the question turn
            assert probe["expected"] in turns[probe["turn"] - probe["distance"]][0]  # statement turn
            mentioned = [k for k, (q, a) in enumerate(turns) if probe["expected"].lower() in (q + " " + a).lower()]
            assert mentioned == [probe["turn"] - probe["distance"], probe["turn"]]  # nowhere else
            assert probe["expected"] not in turns[probe["turn"]][0]  # the question does not give it away
            distances.add(probe["distance"])
    assert distances == set(range(1, 9))


def test_long_range_dialogues():
    rows = generate_dialogues(50, seed=0, split="test", min_turns=3, max_turns=8, max_distance=6, long_range=True)
    for row in rows:
        turns = all_turns(row)
        (probe,) = row["probes"]
        assert probe["turn"] == len(turns) - 1 == probe["distance"] and 2 <= probe["distance"] <= 6
        assert probe["expected"] in turns[0][0] and probe["expected"] in turns[-1][1]
        assert all(probe["expected"] not in q + a for q, a in turns[1:-1])
    with pytest.raises(ValueError, match="min_turns"):
        generate_dialogues(1, min_turns=1)


def test_other_template_swaps_the_template_and_keeps_the_value():
    """Every acknowledgement / answer comes back in the attribute's other template with the same value (twice: the
    original); chit-chat, including answers that start like a template ("You are welcome ..."), is left alone."""
    for attribute in ATTRIBUTES:
        value = value_pools("test")[attribute.name][0]
        for templates in (attribute.acks, attribute.answers):
            assert len(templates) == 2  # the ceiling (scripts/eval_mrl.py) averages over exactly these two
            first, second = (_fill(template, value) for template in templates)
            assert (other_template(first), other_template(second)) == (second, first)
    rows = generate_dialogues(40, seed=3, split="validation")
    answers = [answer for row in rows for _, answer in all_turns(row)]
    swapped = [other_template(answer) for answer in answers]
    assert any(new != old for new, old in zip(swapped, answers))
    assert [other_template(new) for new in swapped] == answers
    for probe_row in rows:
        for probe in probe_row["probes"]:
            assert probe["expected"] in other_template(all_turns(probe_row)[probe["turn"]][1])
    assert other_template("You are welcome, happy to help.") == "You are welcome, happy to help."
    assert other_template("3 plus 4 is 7.") == "3 plus 4 is 7."


def test_cli_matches_api(tmp_path, tok):
    args = dict(seed=3, num_train=12, num_validation=4, num_test=6, min_turns=2, max_turns=5, max_distance=3,
                num_pretrain=20, num_sft=10)  # fmt: skip
    cli = [sys.executable, str(REPO_ROOT / "scripts" / "make_synthetic_data.py"), "--output-dir", str(tmp_path / "cli")]
    for key, value in args.items():
        cli += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "chance level" in result.stdout

    same = write_synthetic_data(tmp_path / "api", **args)
    other = write_synthetic_data(tmp_path / "other", **{**args, "seed": 4})
    names = ["pretrain_train", "pretrain_validation", "sft_train", "sft_validation",
             "dialogues_train", "dialogues_validation", "dialogues_test"]  # fmt: skip
    assert sorted(same) == sorted(names)
    for name in names:
        assert (tmp_path / "cli" / f"{name}.jsonl").read_bytes() == same[name].read_bytes(), name
    assert same["dialogues_train"].read_bytes() != other["dialogues_train"].read_bytes()

    # The files load with `load_rows`, validate, and collate.
    episodes = load_rows(same["dialogues_test"])
    assert len(episodes) == 6 and {"query", "answer", "interactions", "probes"} <= set(episodes.column_names)
    assert len(validate_rows(episodes, "episode", tok, max_length=256)) == 6
    batch = EpisodeCollator(tok)([episodes[i] for i in range(4)])
    assert batch["input_ids"].shape[:2] == (int(batch["num_turns"].max()), 4)
    assert len(validate_rows(load_rows(same["sft_train"]), "interaction", tok, max_length=256)) == 10
    assert len(validate_rows(load_rows(same["pretrain_train"]), "text", tok, max_length=512)) == 20

    # MRL step-count subsets: exactly n follow-ups per episode, CLI and API identical.
    result = subprocess.run(cli[:2] + ["--output-dir", str(tmp_path / "cli_mrl"), "--mrl-steps", "1,3", "--num-train",
                            "5", "--num-pretrain", "4", "--num-sft", "4"], capture_output=True, text=True, env=env,
                            timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    subsets = write_synthetic_data(tmp_path / "api_mrl", num_train=5, num_pretrain=4, num_sft=4, mrl_steps=[1, 3])
    for steps in (1, 3):
        for split in ("train", "validation", "test"):
            name = f"dialogues_steps-{steps}_{split}"
            assert (tmp_path / "cli_mrl" / f"{name}.jsonl").read_bytes() == subsets[name].read_bytes()
            rows = load_rows(subsets[name])
            assert all(len(r["interactions"]) == steps for r in rows) and all(r["probes"] for r in rows)
    with pytest.raises(ValueError, match="mrl_steps: 0"):
        write_synthetic_data(tmp_path / "bad", num_train=2, num_pretrain=2, num_sft=2, mrl_steps=[0])


# --------------------------------------------------------------------------------------------------------- collators


def test_interaction_labels_exact(tok):
    hi, yo = ids_of(tok, "hi"), ids_of(tok, "yo")
    long_q, long_a = ids_of(tok, "hello there"), ids_of(tok, "fine thanks")
    batch = JointLMCollator(tok, mask_prob=0.0, sft=True)(
        [{"query": "hi", "answer": "yo"}, {"query": "hello there", "answer": "fine thanks"}]
    )
    row0 = [BOS, Q, *hi, A, *yo, EOS]
    row1 = [BOS, Q, *long_q, A, *long_a, EOS]
    T = len(row1)
    assert len(row0) < T and batch["input_ids"].shape == (2, T)
    pad = T - len(row0)
    assert batch["input_ids"].tolist() == [row0 + [PAD] * pad, row1]
    assert batch["attention_mask"].tolist() == [[1] * len(row0) + [0] * pad, [1] * T]
    ignore = IGNORE_INDEX
    assert batch["labels"].tolist() == [
        [ignore] * (3 + len(hi)) + yo + [EOS] + [ignore] * pad,
        [ignore] * (3 + len(long_q)) + long_a + [EOS],
    ]
    assert batch["mlm_input_ids"].tolist() == batch["input_ids"].tolist()
    assert (batch["mlm_labels"] == ignore).all()
    assert set(batch) == {"input_ids", "attention_mask", "labels", "mlm_input_ids", "mlm_labels"}

    # InteractionCollator is the same; the reference SFT mask drops [EOS]; encode_interaction agrees.
    same = InteractionCollator(tok, mask_prob=0.0)([{"query": "hi", "answer": "yo"}])
    assert same["labels"].tolist() == [[ignore] * (3 + len(hi)) + yo + [EOS]]
    ref = JointLMCollator(tok, mask_prob=0.0, sft=True, label_mode="reference")([{"query": "hi", "answer": "yo"}])
    assert ref["labels"].tolist() == [[ignore] * (3 + len(hi)) + yo + [ignore]]
    assert encode_interaction(tok, "hi", "yo") == (row0, [ignore] * (3 + len(hi)) + yo + [EOS])


def test_pretraining_labels_exact(tok):
    a, b = ids_of(tok, "hi there"), ids_of(tok, "my cat is called Brindle.")
    batch = JointLMCollator(tok, mask_prob=0.0)([{"text": "hi there"}, {"text": "my cat is called Brindle."}])
    row0, row1 = [BOS, *a, EOS], [BOS, *b, EOS]
    pad = len(row1) - len(row0)
    assert batch["input_ids"].tolist() == [row0 + [PAD] * pad, row1]
    assert batch["labels"].tolist() == [row0 + [IGNORE_INDEX] * pad, row1]
    assert encode_text(tok, "hi there") == row0
    padded = JointLMCollator(tok, mask_prob=0.0, train_on_padding=True)([{"text": "hi there"}, {"text": "yo yo yo"}])
    assert torch.equal(padded["labels"], padded["input_ids"])


def test_mlm_masking(tok):
    rows = [{"text": "hi there"}, {"text": "my cat is called Brindle. what is my cat called?"}]
    batch = JointLMCollator(tok, mask_prob=0.5, seed=0)(rows)
    selected = batch["mlm_labels"] != IGNORE_INDEX
    assert 0 < selected.sum() < batch["attention_mask"].sum()
    assert not (selected & (batch["attention_mask"] == 0)).any()  # pads never selected
    assert (batch["mlm_input_ids"][selected] == MASK).all()
    assert torch.equal(batch["mlm_labels"][selected], batch["input_ids"][selected])
    assert torch.equal(batch["mlm_input_ids"][~selected], batch["input_ids"][~selected])
    assert (batch["input_ids"] != MASK).all()  # the decoder input stays unmasked
    # Reproducible given the seed; another seed gives other masks.
    again = JointLMCollator(tok, mask_prob=0.5, seed=0)(rows)
    assert torch.equal(again["mlm_input_ids"], batch["mlm_input_ids"])
    other = JointLMCollator(tok, mask_prob=0.5, seed=1)(rows)
    assert not torch.equal(other["mlm_labels"], batch["mlm_labels"])
    # mask_prob=1: every real position, special tokens included.
    full = JointLMCollator(tok, mask_prob=1.0, seed=0, sft=True)([{"query": "hi", "answer": "yo"}])
    assert (full["mlm_input_ids"] == MASK).all()
    assert torch.equal(full["mlm_labels"], full["input_ids"])


def test_overflow(tok):
    row = {"query": "hi", "answer": "my cat is called Brindle."}
    full, _ = encode_interaction(tok, row["query"], row["answer"])
    with pytest.raises(ValueError, match="exceeds max_length"):
        JointLMCollator(tok, sft=True, max_length=len(full) - 1)([row])
    cut = JointLMCollator(tok, sft=True, max_length=len(full) - 2, overflow="truncate", mask_prob=0.0)([row])
    assert cut["input_ids"].tolist() == [full[:-3] + [EOS]]
    assert cut["labels"][0, -1].item() == EOS
    text = encode_text(tok, "my cat is called Brindle.", max_length=4, overflow="truncate")
    assert len(text) == 4 and text[0] == BOS and text[-1] == EOS


def test_episode_collator(tok):
    rows = [
        {"query": "hi", "answer": "yo", "interactions": []},
        {"query": "hello there", "answer": "fine thanks",
         "interactions": [{"query": "what is my cat called?", "answer": "your cat is called Brindle."},
                          {"query": "hi", "answer": "yo"}]},
        {"query": "hi", "answer": "yo", "interactions": [{"query": "hello there", "answer": "yo"}]},
    ]  # fmt: skip
    batch = EpisodeCollator(tok)(rows)
    turn1 = encode_interaction(tok, "what is my cat called?", "your cat is called Brindle.")
    T = len(turn1[0])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (3, 3, T)
    assert batch["turn_mask"].tolist() == [[1, 1, 1], [0, 1, 1], [0, 1, 0]]
    assert batch["num_turns"].tolist() == [1, 3, 2]
    assert batch["input_ids"][1, 1].tolist() == turn1[0]
    assert batch["labels"][1, 1].tolist() == turn1[1]
    ids0, labels0 = encode_interaction(tok, "hi", "yo")
    pad = T - len(ids0)
    assert batch["input_ids"][0, 0].tolist() == ids0 + [PAD] * pad
    assert batch["labels"][0, 0].tolist() == labels0 + [IGNORE_INDEX] * pad
    assert batch["attention_mask"][0, 0].tolist() == [1] * len(ids0) + [0] * pad
    for k, b in [(1, 0), (2, 0), (2, 2)]:  # missing turns
        assert (batch["input_ids"][k, b] == PAD).all() and (batch["labels"][k, b] == IGNORE_INDEX).all()
        assert (batch["attention_mask"][k, b] == 0).all()
    assert ((batch["labels"] != IGNORE_INDEX).sum(-1) > 0).long().tolist() == batch["turn_mask"].tolist()

    # Episode-length schedule; probes are cut the same way by truncate_episode.
    collator = EpisodeCollator(tok, max_turns=1)
    assert collator(rows)["input_ids"].shape[:2] == (1, 3)
    collator.set_max_turns(2)
    short = collator(rows)
    assert short["turn_mask"].tolist() == [[1, 1, 1], [0, 1, 1]] and short["num_turns"].tolist() == [1, 2, 2]
    assert short["input_ids"].shape[-1] == T  # T is the longest turn kept
    row = {**rows[1], "probes": [{"turn": 1, "distance": 1}, {"turn": 2, "distance": 2}]}
    cut = truncate_episode(row, 2)
    assert len(cut["interactions"]) == 1 and cut["probes"] == [{"turn": 1, "distance": 1}]

    # Reference SMAT labels also train [A].
    ref = EpisodeCollator(tok, label_mode="reference")(rows[:1])
    assert ref["labels"][0, 0].tolist() == [IGNORE_INDEX] * (2 + len(ids_of(tok, "hi"))) + [A, *ids_of(tok, "yo"), EOS]


# -------------------------------------------------------------------------------------------- loading and validation


def test_validate_rows(tok, caplog):
    long_answer = "my cat is called Brindle. " * 20
    rows = [
        {"query": "hi", "answer": "yo"},
        {"query": "hi", "answer": None},
        {"query": "  ", "answer": "yo"},
        {"query": "hi", "answer": long_answer},
        {"query": "hello there", "answer": "fine thanks"},
    ]
    with pytest.raises(ValueError, match=r"row 1: field 'answer': missing"):
        validate_rows(rows, "interaction", tok, max_length=32)
    with pytest.raises(ValueError, match=r"row 1: field 'query': empty"):
        validate_rows(rows[:1] + rows[2:], "interaction", tok, max_length=32)
    with pytest.raises(ValueError, match=r"row 1: field 'query/answer': \d+ tokens exceed max_length=32"):
        validate_rows(rows[:1] + rows[3:], "interaction", tok, max_length=32)
    with caplog.at_level(logging.WARNING, logger="trainers.data"):
        kept = validate_rows(rows, "interaction", tok, max_length=32, on_error="skip")
    assert kept["query"] == ["hi", "hello there"]
    assert "skipped 3 of 5 interaction rows" in caplog.text
    assert len(validate_rows(rows[:1] + rows[4:], "interaction", tok, max_length=32)) == 2
    with pytest.raises(ValueError, match="all 2 interaction rows are invalid"):
        validate_rows(rows[1:3], "interaction", on_error="skip")

    with pytest.raises(ValueError, match=r"row 0: field 'answer': missing"):
        validate_rows([{"query": "hi"}], "interaction")
    with pytest.raises(ValueError, match=r"row 1: field 'text': empty"):
        validate_rows([{"text": "hi"}, {"text": ""}], "text")
    episodes = [
        {"query": "hi", "answer": "yo", "interactions": [{"query": "hi", "answer": "yo"}]},
        {"query": "hi", "answer": "yo",
         "interactions": [{"query": "hi", "answer": "yo"}, {"query": "hi", "answer": ""}]},
        {"query": "hi", "answer": "yo", "interactions": [{"query": "hi", "answer": long_answer}]},
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"row 1: field 'interactions\[1\]\.answer': empty"):
        validate_rows(episodes, "episode", tok, max_length=32)
    with pytest.raises(ValueError, match=r"row 2: field 'interactions\[0\]': \d+ tokens exceed"):
        validate_rows([episodes[0], episodes[0], episodes[2]], "episode", tok, max_length=32)
    with pytest.raises(ValueError, match="a tokenizer is needed"):
        validate_rows(episodes, "episode", max_length=32)


def test_tokenize_equals_the_tokenizer_call_with_or_without_the_backend_path(tok):
    """`tokenize_texts` calls a fast tokenizer's backend directly; a backend set to truncate (or pad) goes through
    `tokenizer(...)`, which ignores those settings unless asked — the same ids either way."""
    import copy

    texts = ["my cat is called Brindle", "hi", "hello there, my favourite colour is teal"]
    expected = tok(texts, add_special_tokens=False)["input_ids"]
    assert tokenize_texts(tok, texts) == expected
    truncating = copy.deepcopy(tok)
    truncating.backend_tokenizer.enable_truncation(2)
    assert tokenize_texts(truncating, texts) == expected


def test_validate_rows_length_column_is_what_the_collators_pad_to(tok):
    """`length_column` holds each row's size once its collator pads it alone: an episode's `[N, T]` block (turns x
    longest interaction), an interaction's `[BOS][Q]q[A]a[EOS]`, a text's `[BOS]text[EOS]`."""
    episodes = generate_dialogues(12, seed=2, min_turns=2, max_turns=5)
    checked = validate_rows(episodes, "episode", tok, length_column="length")
    collate = EpisodeCollator(tok)
    assert checked["length"] == [collate([row])["attention_mask"].numel() for row in episodes]
    assert len({len(row["interactions"]) for row in episodes}) > 1 and len(set(checked["length"])) > 1
    interactions = [{"query": "hi", "answer": "yo"}, {"query": "hello there", "answer": "my cat is called Brindle"}]
    lengths = validate_rows(interactions, "interaction", tok, max_length=64, length_column="n")["n"]
    assert lengths == [int(JointLMCollator(tok, sft=True)([row])["attention_mask"].sum()) for row in interactions]
    texts = [{"text": "hi"}, {"text": "my cat is called Brindle"}]
    assert validate_rows(texts, "text", tok, length_column="length")["length"] == [
        int(JointLMCollator(tok)([row])["attention_mask"].sum()) for row in texts]  # fmt: skip
    given = validate_rows([{**row, "length": 7} for row in texts], "text", tok, length_column="length")
    assert given["length"] == [7, 7]  # lengths that come with the rows are kept
    with pytest.raises(ValueError, match="a tokenizer is needed for length_column"):
        validate_rows(texts, "text", length_column="length")


def test_load_rows(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"query": "hi", "answer": "yo"}] * 3).to_parquet(str(tmp_path / "rows.parquet"))
    (tmp_path / "rows.json").write_text('[{"text": "a"}, {"text": "b"}]', encoding="utf-8")
    assert load_rows(tmp_path / "rows.parquet")["answer"] == ["yo"] * 3
    assert load_rows(str(tmp_path / "rows.json"))["text"] == ["a", "b"]
    with pytest.raises(FileNotFoundError):
        load_rows(tmp_path / "missing.jsonl")


def test_episode_collator_probe_window_keeps_fact_and_question():
    from trainers.data import EpisodeCollator, episode_turns

    tokenizer = train_rxt_tokenizer(SENTENCES, vocab_size=300, min_frequency=1)
    rows = generate_dialogues(40, seed=11, min_turns=4, max_turns=8, max_distance=3)
    collator = EpisodeCollator(tokenizer, max_turns=2, window="probe", seed=0)
    with_question = 0
    for row in rows:
        window = collator._turns(row)
        turns = episode_turns(row)
        assert len(window) <= 2
        start = next(i for i in range(len(turns)) if turns[i : i + len(window)] == window)
        fitting = [p for p in row["probes"] if p["distance"] == 1]
        if fitting:
            asked = [p for p in fitting if p["turn"] == start + len(window) - 1]
            assert asked and asked[0]["expected"] in window[0][0]  # the fact is in the window's first query
            with_question += 1
        else:
            assert window == turns[:2]
    assert with_question > 0
    with pytest.raises(ValueError, match="window='middle'"):
        EpisodeCollator(tokenizer, window="middle")


def test_episode_collator_probe_window_with_max_probe_distance_keeps_earlier_turns():
    from trainers.data import EpisodeCollator, episode_turns

    tokenizer = train_rxt_tokenizer(SENTENCES, vocab_size=300, min_frequency=1)
    rows = generate_dialogues(60, seed=12, min_turns=4, max_turns=8, max_distance=4)
    collator = EpisodeCollator(tokenizer, max_turns=6, window="probe", seed=0, max_probe_distance=1)
    ends_after_prefix = 0
    for row in rows:
        window, turns = collator._turns(row), episode_turns(row)
        near = [p for p in row["probes"] if p["distance"] == 1]
        if not near:
            assert window == turns[:6]
            continue
        end = len(window) - 1 + next(i for i in range(len(turns)) if turns[i : i + len(window)] == window)
        probe = next(p for p in near if p["turn"] == end)  # ends at a distance-1 question, never a farther one
        assert len(window) == min(6, probe["turn"] + 1)  # the turns before the fact are kept
        assert probe["expected"] in window[-2][0]
        ends_after_prefix += len(window) > 2
    assert ends_after_prefix > 0
    with pytest.raises(ValueError, match="max_probe_distance=0"):
        EpisodeCollator(tokenizer, window="probe", max_probe_distance=0)
