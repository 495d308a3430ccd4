"""Tests of the diverse synthetic style and its template split (`trainers/synthetic.py`), of the side-by-side
held-out-template evaluation (`scripts/eval_memory.py --paraphrase_data`) and of several training sources
(`trainers.data.source_weights` / `cut_validation` / `mix_sources`, `trainers.cli.load_train_and_validation`)."""

import hashlib
import json
import re

import numpy as np
import pytest

from trainers import synthetic
from trainers.memory_eval import normalise, wilson_interval
from trainers.synthetic import (
    HELD_OUT_EVERY,
    chance_level,
    diverse_attributes,
    generate_dialogues,
    generate_pretrain,
    generate_sft,
    value_pools,
    write_jsonl,
    write_synthetic_data,
)


def _strings(rows):
    """Every query / answer / text string of generated rows."""
    for row in rows:
        if "text" in row:
            yield row["text"]
            continue
        yield row["query"]
        yield row["answer"]
        for turn in row.get("interactions", []):
            yield turn["query"]
            yield turn["answer"]


def _all_values(attribute):
    return {value for split in synthetic.SPLITS for value in value_pools(split, "diverse")[attribute]}


def _template_regex(templates):
    """One regex matching any of `templates` in full (first letter in either case, as `_fill` writes it); group
    `i + 1` is template `i`'s value."""
    parts = []
    for template in templates:
        body = re.escape(template).replace(re.escape("{v}"), "(.+)").replace(re.escape("{a}"), "an?")
        if template[0].isalpha():
            body = f"[{template[0].upper()}{template[0].lower()}]" + body[1:]
        elif template.startswith("{a}"):
            body = "[Aa]" + body[1:]
        parts.append(body)
    return re.compile("|".join(f"(?:{part})" for part in parts))


def _kinds(attribute):
    return {"statements": attribute.statements, "acks": attribute.acks, "questions": attribute.questions,
            "answers": attribute.answers}  # fmt: skip


def test_basic_style_output_is_unchanged():
    """The default style's rows (every preset measured so far) are bit-identical to the generator before the
    diverse style existed: a sha256 of dialogues (mixed, test, long-range), SFT and pre-training rows."""
    digest = hashlib.sha256()
    for args in (dict(split="train"), dict(split="test", max_turns=10),
                 dict(split="train", long_range=True, min_turns=2, max_turns=2, max_distance=1)):  # fmt: skip
        digest.update(json.dumps(generate_dialogues(300, seed=3, **args)).encode())
    digest.update(json.dumps(generate_sft(300, seed=1)).encode())
    digest.update(json.dumps(generate_pretrain(300, seed=1)).encode())
    assert digest.hexdigest() == "d6a62691e00a7845054ae7d95884102142c2352d1be8bdbef36e39f52210eeac"


def test_every_diverse_template_renders():
    """Every template of both sets, filled with a value of every shape its attribute has, is one sentence: no brace
    left, the value inside, a capital first letter, closing punctuation; tens of templates per attribute and kind."""
    for template_set in synthetic.TEMPLATE_SETS:
        attributes = diverse_attributes(template_set)
        assert len(attributes) == 14
        for attribute in attributes:
            pool = value_pools("test", "diverse")[attribute.name]
            samples = {pool[0], pool[-1], min(pool, key=len), max(pool, key=len)}
            for kind, templates in _kinds(attribute).items():
                assert len(templates) >= (20 if template_set == "train" else 10), (attribute.name, kind)
                assert len(set(templates)) == len(templates)
                for template in templates:
                    for value in samples:
                        text = synthetic._fill(template, value)
                        assert "{" not in text and "}" not in text, text
                        assert (text[0].isupper() or text.startswith(value)) and text[-1] in ".?!", text
                        if kind != "questions":
                            assert value in text, (template, value)
                        else:
                            assert value not in text


def test_template_split_share_and_disjoint_template_sets():
    """Held-out templates are those whose core or frame index is 3 mod 4: 43 % of all; the two sets share none."""
    train, held = diverse_attributes("train"), diverse_attributes("held_out")
    count = lambda attributes: sum(len(t) for a in attributes for t in _kinds(a).values())  # noqa: E731
    assert HELD_OUT_EVERY == 4
    assert (count(train), count(held)) == (2436, 1820)
    for a, b in zip(train, held):
        for kind in _kinds(a):
            assert not set(_kinds(a)[kind]) & set(_kinds(b)[kind])
    # the example phrasing is in one set only
    assert "Do you recall {q}?".replace("{q}", "what my cat is called") in diverse_attributes("train")[1].questions


@pytest.fixture(scope="module")
def diverse_training_rows():
    return {"dialogues": generate_dialogues(400, seed=0, split="train", style="diverse", max_turns=8),
            "long_range": generate_dialogues(100, seed=0, split="train", style="diverse", long_range=True,
                                             min_turns=2, max_turns=2, max_distance=1),
            "sft": generate_sft(400, seed=0, style="diverse"),
            "pretrain": generate_pretrain(200, seed=0, style="diverse")}  # fmt: skip


def test_no_held_out_template_occurs_in_any_training_row(diverse_training_rows):
    """Checked on rendered rows: no query / answer of the training dialogues or SFT rows is a held-out template with
    a value of its attribute, and no pre-training text contains one; the same matcher finds the held-out templates in
    every statement and question of the paraphrase test set (so it can fail)."""
    held = {a.name: a for a in diverse_attributes("held_out")}
    def pieces(template):  # its literal text, but the first letter (either case in a row)
        return [c for c in re.split(r"\{v\}|\{a\}", template[1:] if template[0].isalpha() else template) if c]

    matchers = {  # attribute -> [(literal pieces, regex)] per held-out template
        name: [(pieces(t), _template_regex([t])) for templates in _kinds(a).values() for t in templates]
        for name, a in held.items()
    }
    values = {name: _all_values(name) for name in held}

    def held_out_template_in(text, search):
        for name, templates in matchers.items():
            for pieces, regex in templates:
                if not all(piece in text for piece in pieces):
                    continue
                for match in (regex.finditer(text) if search else [regex.fullmatch(text)]):
                    if match and match.group(1) in values[name]:
                        return name, match.group(0)
        return None

    turns = [s for key in ("dialogues", "long_range", "sft") for s in _strings(diverse_training_rows[key])]
    assert len(turns) > 3000
    for text in turns:
        assert held_out_template_in(text, search=False) is None, text
    for text in _strings(diverse_training_rows["pretrain"]):
        assert held_out_template_in(text, search=True) is None, text
    paraphrase = generate_dialogues(60, seed=0, split="test", style="diverse", templates="held_out", max_turns=6)
    found = 0
    for row in paraphrase:
        turns = [(row["query"], row["answer"])] + [(t["query"], t["answer"]) for t in row["interactions"]]
        for probe in row["probes"]:
            question, answer = turns[probe["turn"]]
            assert held_out_template_in(answer, search=False) is not None, answer
            statement, _ = turns[probe["turn"] - probe["distance"]]
            assert held_out_template_in(statement, search=False) is not None, statement
            found += 1
            regex = _template_regex(held[probe["attribute"]].questions)
            assert regex.fullmatch(question), question
    assert found >= 60


def test_values_of_the_test_sets_never_occur_in_training(diverse_training_rows):
    """No validation / test value (any attribute) occurs in any training row at word boundaries (the recall match),
    and every probe of the two test sets expects a value of the test pools."""
    text = " " + " ".join(normalise(s) for rows in diverse_training_rows.values() for s in _strings(rows)) + " "
    held_out_values = [v for split in ("validation", "test") for pool in value_pools(split, "diverse").values()
                       for v in pool]  # fmt: skip
    assert len(held_out_values) == 14 * 300
    leaked = [v for v in held_out_values if f" {normalise(v)} " in text]
    assert leaked == []
    test_pools = value_pools("test", "diverse")
    for templates in ("train", "held_out"):
        for row in generate_dialogues(80, seed=1, split="test", style="diverse", templates=templates):
            for probe in row["probes"]:
                assert probe["expected"] in test_pools[probe["attribute"]]
    # no test value is a run of words of any training value (of any attribute): recall is earned by the value only
    train_values = " | ".join(normalise(v) for pool in value_pools("train", "diverse").values() for v in pool)
    test_values = [v for pool in value_pools("test", "diverse").values() for v in pool]
    assert [v for v in test_values if f" {normalise(v)} " in f" {train_values} "] == []


def test_diverse_values_have_varied_shapes():
    pools = value_pools("train", "diverse")
    names = pools["cat"]
    lengths = {len(name) for name in names}
    assert min(lengths) <= 4 and max(lengths) >= 10
    assert any(" " in v for v in pools["city"]) and any(" " not in v for v in pools["city"])
    assert any(v.isdigit() for v in pools["locker_code"]) and any(" " in v for v in pools["locker_code"])
    assert any(v.isdigit() for v in pools["room_number"]) and any("hundred" in v for v in pools["room_number"])
    assert any(len(v.split()) == 3 for v in pools["hobby"])
    assert chance_level("test", "diverse") == pytest.approx(1 / 200)


def test_diverse_generation_is_deterministic_by_seed():
    kwargs = dict(split="train", style="diverse", max_turns=7)
    first = generate_dialogues(30, seed=5, **kwargs)
    assert first == generate_dialogues(30, seed=5, **kwargs)
    assert first[:10] == generate_dialogues(10, seed=5, **kwargs)
    assert first != generate_dialogues(30, seed=6, **kwargs)
    assert generate_sft(20, seed=2, style="diverse") == generate_sft(20, seed=2, style="diverse")
    assert generate_pretrain(20, seed=2, style="diverse") != generate_pretrain(20, seed=3, style="diverse")
    in_template = generate_dialogues(20, seed=5, split="test", style="diverse")
    assert in_template != generate_dialogues(20, seed=5, split="test", style="diverse", templates="held_out")
    for row in first:  # the episode guarantees of the basic style hold
        turns = [row["query"]] + [t["query"] for t in row["interactions"]]
        for probe in row["probes"]:
            assert probe["expected"] in turns[probe["turn"] - probe["distance"]]
            others = [t for i, t in enumerate(turns) if i != probe["turn"] - probe["distance"]]
            assert all(f" {normalise(probe['expected'])} " not in f" {normalise(t)} " for t in others)


def test_style_and_template_arguments_are_checked():
    with pytest.raises(ValueError, match=r"style='fancy': expected one of \('basic', 'diverse'\)"):
        generate_dialogues(1, style="fancy")
    with pytest.raises(ValueError, match="templates='held_out' needs style='diverse'"):
        generate_dialogues(1, split="test", templates="held_out")
    with pytest.raises(ValueError, match="held-out templates never appear in training data"):
        generate_dialogues(1, split="train", style="diverse", templates="held_out")
    with pytest.raises(ValueError, match="templates='other'"):
        diverse_attributes("other")


def test_write_synthetic_data_diverse_writes_the_paraphrase_test_set(tmp_path):
    written = write_synthetic_data(tmp_path, num_train=4, num_validation=2, num_test=3, num_pretrain=4, num_sft=4,
                                   style="diverse")  # fmt: skip
    assert "dialogues_paraphrase_test" in written
    rows = [json.loads(line) for line in written["dialogues_paraphrase_test"].read_text().splitlines()]
    assert rows == generate_dialogues(3, 0, "test", style="diverse", templates="held_out")
    basic = write_synthetic_data(tmp_path / "basic", num_train=4, num_pretrain=4, num_sft=4)
    assert "dialogues_paraphrase_test" not in basic


# --------------------------------------------------------------------------------------------------------------------
# eval_memory: the in-template and held-out-template sets side by side


HAND_WRITTEN = [  # dialogues written by hand, in words no template of the generator uses
    {"query": "We adopted a cat and called her Lovo.", "answer": "What a sweet name.",
     "interactions": [{"query": "Do you recall what my cat is called?", "answer": "She is called Lovo."}],
     "probes": [{"turn": 1, "distance": 1, "attribute": "cat", "expected": "Lovo"}]},
    {"query": "I spent my childhood in Brackwater.", "answer": "Sounds like a lovely place.",
     "interactions": [{"query": "What's the weather like?", "answer": "I cannot tell, sorry."},
                      {"query": "Where did I grow up again?", "answer": "In Brackwater."}],
     "probes": [{"turn": 2, "distance": 2, "attribute": "city", "expected": "Brackwater"}]},
    {"query": "Our code for the gate is nine nine one two.", "answer": "Got it.",
     "interactions": [{"query": "And the gate code?", "answer": "It is nine nine one two."}],
     "probes": [{"turn": 1, "distance": 1, "attribute": "code", "expected": "nine nine one two"}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from modeling_rxt import RxTConfig, RxTForCausalLM
    from modeling_rxt.tokenization_rxt import check_rxt_tokenizer, train_rxt_tokenizer

    folder = tmp_path_factory.mktemp("model")
    texts = [row["text"] for row in generate_pretrain(200, seed=5, style="diverse")]
    tokenizer = train_rxt_tokenizer(texts, vocab_size=400, min_frequency=1)
    ids = {k: v for k, v in check_rxt_tokenizer(tokenizer).items() if v is not None}
    RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tokenizer), **ids)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


def test_eval_memory_reports_both_sets_with_exact_recall(saved_model, tmp_path, monkeypatch):
    """Recall is judged on the value only (any answer wording): scripted answers give exactly known recall on a
    hand-written held-out-template file and on a generated in-template file, reported side by side with Wilson
    intervals, and the PNG is written."""
    import eval_memory

    import trainers.memory_eval as memory_eval

    folder, tokenizer = saved_model
    in_template = generate_dialogues(4, seed=3, split="test", style="diverse", min_turns=2, max_turns=2,
                                     max_distance=1, long_range=True)  # fmt: skip
    write_jsonl(in_template, tmp_path / "in.jsonl")
    write_jsonl(HAND_WRITTEN, tmp_path / "paraphrase.jsonl")
    replies = {  # memory system: the cat and the code recalled in other words, the town missed; reset: nothing
        "Do you recall what my cat is called?": "Her name? Lovo, of course!",
        "Where did I grow up again?": "You grew up in Brackwat.",
        "And the gate code?": "NINE nine, one two.",
    }
    asked = [row["interactions"][0]["query"] for row in in_template]
    answers = [row["interactions"][0]["answer"] for row in in_template]
    replies.update({asked[0]: answers[0], asked[1]: answers[1], asked[2]: "I do not know."})  # 2 of 4 (3rd, 4th miss)
    state = {"reset": False}

    def fake_generate(model, tokens, prompts, max_new_tokens, cache=None):
        texts = [tokenizer.decode(p[2:-1]).strip() for p in prompts]
        out = ["Nice." if state["reset"] else replies.get(t, "Nice.") for t in texts]
        return [tokens.encode(t) for t in out], [True] * len(out)

    original = memory_eval.evaluate_system

    def evaluate_system(model, tokenizer_, rows, system, **kwargs):
        state["reset"] = system == "memory_reset"
        return original(model, tokenizer_, rows, system, **kwargs)

    monkeypatch.setattr(memory_eval, "_generate", fake_generate)
    monkeypatch.setattr(eval_memory, "evaluate_system", evaluate_system)
    output = tmp_path / "eval.json"
    result = eval_memory.main([str(folder), "--data", str(tmp_path / "in.jsonl"), "--paraphrase_data",
                               str(tmp_path / "paraphrase.jsonl"), "--output", str(output), "--batch_size", "2"])  # fmt: skip
    assert result["recall"] == {"1": 0.5} and result["counts"] == {"1": 4}
    assert tuple(result["ci95"]["memory"]["1"]) == wilson_interval(2, 4)
    paraphrase = result["paraphrase"]
    assert paraphrase["recall"] == {"1": 1.0, "2": 0.0} and paraphrase["counts"] == {"1": 2, "2": 1}
    assert paraphrase["recall_memory_reset"] == {"1": 0.0, "2": 0.0}
    assert tuple(paraphrase["ci95"]["memory"]["1"]) == wilson_interval(2, 2)
    assert paraphrase["n_dialogues"] == 3
    assert paraphrase["chance"] == pytest.approx((1 + 1 + 1) / 3)  # one value per attribute in the file
    saved = json.loads(output.read_text())
    assert saved["paraphrase"]["recall"] == {"1": 1.0, "2": 0.0}
    assert output.with_suffix(".png").stat().st_size > 0


def test_eval_memory_diverse_default_sets(monkeypatch):
    """Without --data, --style diverse evaluates the generated in-template and held-out-template test sets."""
    import eval_memory

    args = eval_memory.EvalArguments(model_dir="unused", style="diverse", num_dialogues=5, seed=9)
    rows, chance = eval_memory.load_rows(args)
    paraphrase, paraphrase_chance = eval_memory.load_paraphrase_rows(args)
    assert rows == generate_dialogues(5, seed=9, split="test", style="diverse")
    assert paraphrase == generate_dialogues(5, seed=9, split="test", style="diverse", templates="held_out")
    assert chance == paraphrase_chance == chance_level("test", "diverse")
    assert eval_memory.load_paraphrase_rows(eval_memory.EvalArguments(model_dir="unused")) is None


# --------------------------------------------------------------------------------------------------------------------
# Several training sources


def _source_file(path, name, count):
    write_jsonl([{"query": f"{name} question {i}", "answer": f"{name} answer {i}"} for i in range(count)], path)
    return str(path)


def _data_args(*argv):
    from trainers.cli import DataArguments, parse_arguments

    (data_args,) = parse_arguments((DataArguments,), list(argv))
    return data_args


def _load(data_args, seed=0):
    from trainers.cli import load_train_and_validation

    return load_train_and_validation(data_args, lambda rows, **kwargs: rows, None, 64, seed)


def test_source_specs_and_weights():
    from trainers.data import parse_source, source_weights

    assert parse_source("a.jsonl:0.7") == ("a.jsonl", 0.7)
    assert parse_source("org/dataset") == ("org/dataset", None)
    assert parse_source("C:/data/a.jsonl") == ("C:/data/a.jsonl", None)
    assert source_weights(["a.jsonl:1", "b.jsonl:3"]) == (["a.jsonl", "b.jsonl"], [1.0, 3.0])
    assert source_weights(["a.jsonl", "b.jsonl"], [2, 1]) == (["a.jsonl", "b.jsonl"], [2.0, 1.0])
    assert source_weights(["a.jsonl", "b.jsonl"]) == (["a.jsonl", "b.jsonl"], None)
    with pytest.raises(ValueError, match="mixing weight -1; expected a positive number"):
        parse_source("a.jsonl:-1")
    with pytest.raises(ValueError, match=r"weights for some sources only \(none for \['b.jsonl'\]\)"):
        source_weights(["a.jsonl:1", "b.jsonl"])
    with pytest.raises(ValueError, match="both as SOURCE:WEIGHT and as --train_file_weights"):
        source_weights(["a.jsonl:1", "b.jsonl:1"], [1, 1])
    with pytest.raises(ValueError, match="1 weights for 2 sources"):
        source_weights(["a.jsonl", "b.jsonl"], [1])


def test_single_source_is_loaded_unchanged(tmp_path):
    a = _source_file(tmp_path / "a.jsonl", "a", 7)
    train, validation = _load(_data_args("--train_file", a))
    assert validation is None
    assert train["query"] == [f"a question {i}" for i in range(7)]


def test_sources_without_weights_are_concatenated(tmp_path):
    a, b = _source_file(tmp_path / "a.jsonl", "a", 3), _source_file(tmp_path / "b.jsonl", "b", 2)
    train, _ = _load(_data_args("--train_file", a, b))
    assert train["query"] == ["a question 0", "a question 1", "a question 2", "b question 0", "b question 1"]


def _expected_interleave(sizes, probabilities, seed, stop_all):
    """The row order `interleave_datasets` documents for probabilities: sources drawn by
    `np.random.default_rng(seed).choice(len(sources), p=probabilities)` in blocks of 1000, each source read in order,
    stopping when the first (or, `stop_all`, every) source ran out; with `stop_all` a used-up source starts again."""
    rng = np.random.default_rng(seed)
    position, exhausted, order = [0] * len(sizes), [False] * len(sizes), []
    while True:
        for source in rng.choice(len(sizes), size=1000, p=probabilities):
            if (all if stop_all else any)(exhausted):
                return order
            order.append((int(source), position[source]))
            position[source] += 1
            if position[source] == sizes[source]:
                exhausted[source] = True
                position[source] = 0


@pytest.mark.parametrize("strategy", ["first_exhausted", "all_exhausted"])
def test_weighted_sources_are_mixed_exactly(tmp_path, strategy):
    """a.jsonl:3 b.jsonl:1 -> probabilities 0.75 / 0.25, drawn with the data seed: the exact row sequence; the same
    weights given as --train_file_weights give the same rows; another seed another order."""
    a, b = _source_file(tmp_path / "a.jsonl", "a", 40), _source_file(tmp_path / "b.jsonl", "b", 12)
    args = ("--mixing_stopping_strategy", strategy)
    train, _ = _load(_data_args("--train_file", f"{a}:3", f"{b}:1", *args), seed=11)
    expected = _expected_interleave([40, 12], [0.75, 0.25], 11, strategy == "all_exhausted")
    assert train["query"] == [f"{'ab'[s]} question {i}" for s, i in expected]
    from_a = sum(q.startswith("a ") for q in train["query"])
    assert 0.6 < from_a / len(train) < 0.9
    same, _ = _load(_data_args("--train_file", a, b, "--train_file_weights", "3", "1", *args), seed=11)
    assert same["query"] == train["query"]
    other, _ = _load(_data_args("--train_file", f"{a}:3", f"{b}:1", *args), seed=12)
    assert other["query"] != train["query"]


def test_validation_cut_takes_the_same_share_of_each_source(tmp_path):
    """10 % of each source (rounded up): 3 of 25 rows of a, 1 of 8 of b; the cut rows never train; deterministic by
    the seed; the same rows `Dataset.train_test_split(test_size=n, seed=seed)` cuts."""
    import datasets

    a, b = _source_file(tmp_path / "a.jsonl", "a", 25), _source_file(tmp_path / "b.jsonl", "b", 8)
    data_args = _data_args("--train_file", a, b, "--validation_split_percentage", "10")
    train, validation = _load(data_args, seed=4)
    assert len(validation) == 3 + 1 and len(train) == 22 + 7
    assert sum(q.startswith("a ") for q in validation["query"]) == 3
    assert not set(train["query"]) & set(validation["query"])
    assert set(train["query"]) | set(validation["query"]) == {f"{s} question {i}" for s, n in (("a", 25), ("b", 8))
                                                              for i in range(n)}  # fmt: skip
    expected = []
    for path, n in ((a, 3), (b, 1)):
        expected += datasets.load_dataset("json", data_files=path, split="train").train_test_split(test_size=n, seed=4)["test"]["query"]
    assert validation["query"] == expected
    again, validation_again = _load(data_args, seed=4)
    assert validation_again["query"] == validation["query"] and again["query"] == train["query"]
    assert _load(data_args, seed=5)[1]["query"] != validation["query"]


def test_validation_cut_errors(tmp_path):
    a = _source_file(tmp_path / "a.jsonl", "a", 1)
    with pytest.raises(ValueError, match="a.jsonl: 1 rows; cutting 10.0 % as validation would leave no training row"):
        _load(_data_args("--train_file", a, "--validation_split_percentage", "10"))
    with pytest.raises(ValueError, match="with --validation_file .*: expected one of them"):
        _load(_data_args("--train_file", a, "--validation_file", a, "--validation_split_percentage", "10"))
    write_jsonl([{"text": "hello"}], tmp_path / "t.jsonl")
    with pytest.raises(ValueError, match=r"columns \['text'\] differ from .*a.jsonl's \['answer', 'query'\]"):
        _load(_data_args("--train_file", a, str(tmp_path / "t.jsonl")))


def test_training_script_takes_several_weighted_sources_with_a_validation_cut(tmp_path):
    """End to end through a stage script: two episode files with weights and a 25 % validation cut from each."""
    import train_smat

    from modeling_rxt import RxTConfig
    from modeling_rxt.tokenization_rxt import train_rxt_tokenizer

    tokenizer = train_rxt_tokenizer([r["text"] for r in generate_pretrain(100, seed=1)], vocab_size=300,
                                    min_frequency=1)  # fmt: skip
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "cfg.json").write_text(json.dumps(RxTConfig.tiny(vocab_size=len(tokenizer)).to_dict()))
    write_jsonl(generate_dialogues(8, seed=1, max_turns=3), tmp_path / "a.jsonl")
    write_jsonl(generate_dialogues(4, seed=2, max_turns=3), tmp_path / "b.jsonl")
    trainer = train_smat.main(["--model_config", str(tmp_path / "cfg.json"), "--tokenizer_name_or_path",
                               str(tmp_path / "tok"), "--train_file", f"{tmp_path / 'a.jsonl'}:2",
                               f"{tmp_path / 'b.jsonl'}:1", "--validation_split_percentage", "25", "--output_dir",
                               str(tmp_path / "out"), "--max_steps", "1", "--per_device_train_batch_size", "2",
                               "--report_to", "none", "--use_cpu", "True", "--save_strategy", "no",
                               "--max_length", "128"])  # fmt: skip
    assert len(trainer.eval_dataset) == 2 + 1
    assert len(trainer.train_dataset) >= 3  # first_exhausted: until b's 3 training rows ran out
    assert not set(trainer.train_dataset["query"]) & set(trainer.eval_dataset["query"])
    assert trainer.state.global_step == 1


def test_quickstart_diverse_preset_is_the_quickstart_on_diverse_data():
    """The preset differs from `quickstart` only in the data style, the evaluation / chat sets, the max_length cap and
    phase A's length (varied wording needs 4000 fact → question steps, docs/experiments/memory-in-the-users-words.md);
    its turns fit that cap with the tokenizer the preset trains (sampled episodes of every set it writes)."""
    import quickstart

    from modeling_rxt.tokenization_rxt import train_rxt_tokenizer
    from trainers.memory_eval import dialogue_turns

    presets = quickstart.PRESETS
    base = json.loads((presets / "quickstart.json").read_text())
    diverse = json.loads((presets / "quickstart_diverse.json").read_text())
    assert diverse["data"] == {**base["data"], "style": "diverse"}
    assert diverse["eval"] == {**base["eval"], "style": "diverse"}
    assert diverse["chat"] == {**base["chat"], "style": "diverse", "templates": "held_out"}
    assert diverse["extra_dialogues"] == {k: {**v, "style": "diverse"} for k, v in base["extra_dialogues"].items()}
    assert diverse["model"] == base["model"] and diverse["baseline"]["args"] == base["baseline"]["args"]
    cap = diverse["stages"][0]["args"]["max_length"]
    for i, (a, b) in enumerate(zip(base["stages"], diverse["stages"], strict=True)):
        expected = {**a, "args": {**a["args"], "max_length": cap, **({"max_steps": 4000} if i == 0 else {})}}
        assert b == expected
    extra_phase_a = 4000 - base["stages"][0]["args"]["max_steps"]
    assert quickstart.baseline_steps(diverse) == quickstart.baseline_steps(base) + extra_phase_a
    texts = [row["text"] for row in generate_pretrain(diverse["data"]["num_pretrain"], seed=0, style="diverse")]
    tokenizer = train_rxt_tokenizer(texts, **diverse["tokenizer"])
    rows = [row for spec in diverse["extra_dialogues"].values() for row in quickstart.episode_set({**spec, "num_train": 300}, 0)]
    rows += generate_dialogues(300, seed=1, split="test", style="diverse", templates="held_out", max_turns=10)
    longest = max(len(tokenizer(q + a)["input_ids"]) + 4 for row in rows for q, a in dialogue_turns(row))
    assert longest <= cap, longest
