"""DMPO (docs/spec.md#dmpo): collator targets, the loss formula, memory built only from earlier accepted turns, the
frozen reference, gradients following the freezing options, a learnable preference set, validation, and the script."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM

from modeling_rxt import RxTConfig
from modeling_rxt.tokenization_rxt import check_rxt_tokenizer
from test_trainers import common_args, tiny_model, tokenizer  # noqa: F401  (tokenizer is a pytest fixture)
from trainers.data import encode_interaction
from trainers.dmpo import DMPOCollator, DMPOConfig, DMPOTrainer, validate_dmpo_rows
from trainers.smat import SMATConfig
from trainers.synthetic import generate_dialogues, write_jsonl

REJECTED = "I do not know, sorry."


def turn(query, accepted, rejected, neutral=None):
    row = {"query": query, "accepted": {"answer": accepted}, "rejected": {"answer": rejected}}
    if neutral is not None:
        row["neutral"] = {"answer": neutral}
    return row


def hand_rows():
    """Two episodes: 2 turns (a neutral answer in turn 1), then 1 turn."""
    return [
        {"interactions": [turn("My cat is called Brindle.", "Noted, Brindle.", "Whatever."),
                          turn("What is my cat called?", "Brindle.", "Rex.", neutral="A cat.")]},
        {"interactions": [turn("The locker code is 4172.", "Got it: 4172.", "No.")]},
    ]  # fmt: skip


def preference_rows(num, seed):
    """Trivially learnable preferences: the dialogue's answer is accepted, a fixed refusal rejected."""
    rows = []
    for dialogue in generate_dialogues(num, seed=seed, min_turns=2, max_turns=3):
        pairs = [(dialogue["query"], dialogue["answer"])]
        pairs += [(t["query"], t["answer"]) for t in dialogue["interactions"]]
        rows.append({"interactions": [turn(q, a, REJECTED) for q, a in pairs]})
    return rows


def make_trainer(tokenizer, tmp_path, model=None, **fields):  # noqa: F811
    model = tiny_model(tokenizer) if model is None else model
    args = DMPOConfig(**common_args(tmp_path, max_steps=1), **fields)
    return DMPOTrainer(model=model, args=args, processing_class=tokenizer)


def test_collator_turn_major_tensors_and_labels_exact(tokenizer):  # noqa: F811
    ids = check_rxt_tokenizer(tokenizer)
    bos, eos, q, a, pad = (ids[k] for k in ("bos_token_id", "eos_token_id", "query_token_id", "answer_token_id",
                                            "pad_token_id"))  # fmt: skip

    def tok(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    batch = DMPOCollator(tokenizer, max_length=64)(hand_rows())
    n, b = 2, 2
    width = max(4 + len(tok(query)) + len(tok(answer)) for query, answer in [
        ("My cat is called Brindle.", "Noted, Brindle."), ("My cat is called Brindle.", "Whatever."),
        ("What is my cat called?", "Brindle."), ("What is my cat called?", "Rex."),
        ("What is my cat called?", "A cat."),
        ("The locker code is 4172.", "Got it: 4172."), ("The locker code is 4172.", "No.")])  # fmt: skip
    for kind in ("accepted", "rejected", "neutral"):
        for name in ("input_ids", "attention_mask", "labels"):
            assert batch[f"{kind}_{name}"].shape == (n, b, width) and batch[f"{kind}_{name}"].dtype == torch.long
    assert batch["turn_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["neutral_mask"].tolist() == [[0, 0], [1, 0]]
    assert batch["num_turns"].tolist() == [2, 1]

    def expected(query, answer):
        seq = [bos, q, *tok(query), a, *tok(answer), eos]
        labels = [-100] * (3 + len(tok(query))) + tok(answer) + [eos]  # [BOS] [Q] query [A] masked; answer + [EOS]
        fill = width - len(seq)
        return seq + [pad] * fill, [1] * len(seq) + [0] * fill, labels + [-100] * fill

    cases = {("rejected", 0, 0): ("My cat is called Brindle.", "Whatever."),
             ("accepted", 1, 0): ("What is my cat called?", "Brindle."),
             ("neutral", 1, 0): ("What is my cat called?", "A cat."),
             ("accepted", 0, 1): ("The locker code is 4172.", "Got it: 4172.")}  # fmt: skip
    for (kind, k, j), (query, answer) in cases.items():
        seq, mask, labels = expected(query, answer)
        assert batch[f"{kind}_input_ids"][k, j].tolist() == seq, (kind, k, j)
        assert batch[f"{kind}_attention_mask"][k, j].tolist() == mask, (kind, k, j)
        assert batch[f"{kind}_labels"][k, j].tolist() == labels, (kind, k, j)
    for kind, k, j in [("neutral", 0, 0), ("neutral", 0, 1), ("accepted", 1, 1), ("rejected", 1, 1)]:  # absent
        assert (batch[f"{kind}_input_ids"][k, j] == pad).all() and not batch[f"{kind}_attention_mask"][k, j].any()
        assert (batch[f"{kind}_labels"][k, j] == -100).all()
    seq, labels = encode_interaction(tokenizer, "What is my cat called?", "Brindle.")  # the project rule, unpadded
    assert expected("What is my cat called?", "Brindle.")[2][: len(seq)] == labels
    short = DMPOCollator(tokenizer, max_turns=1)(hand_rows())
    assert short["turn_mask"].tolist() == [[1, 1]]


def mean_logp(model, query, answer, stm, tokenizer):  # noqa: F811
    """Independent length-normalised log-prob of the answer targets (one unpadded sequence)."""
    seq, labels = encode_interaction(tokenizer, query, answer)
    logits = model(input_ids=torch.tensor([seq]), stm=stm).logits[0, :-1]
    targets = torch.tensor(labels[1:])
    keep = targets != -100
    return F.log_softmax(logits.double(), -1)[keep].gather(-1, targets[keep, None]).mean()


@pytest.mark.parametrize("bptt_turns", [1, 0])
def test_loss_equals_formula_with_label_smoothing_and_anchor(tokenizer, tmp_path, bptt_turns):  # noqa: F811
    beta, smoothing, anchor_weight = 0.5, 0.2, 0.3
    model = tiny_model(tokenizer)
    reference = copy.deepcopy(model)
    trainer = make_trainer(tokenizer, tmp_path, model, beta=beta, label_smoothing=smoothing,
                           anchor_weight=anchor_weight, bptt_turns=bptt_turns)  # fmt: skip
    torch.manual_seed(1)
    with torch.no_grad():  # the policy moves away from the reference (a copy taken by the trainer)
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    rows = hand_rows()
    batch = DMPOCollator(tokenizer)(rows)
    model.train()
    loss, out = trainer.compute_loss(model, batch, return_outputs=True)

    turn_losses, expected_logps = {}, {}
    with torch.no_grad():
        for j, row in enumerate(rows):
            stm = model.initial_stm(1)
            for k, item in enumerate(row["interactions"]):
                lp = {kind: mean_logp(model, item["query"], item[kind]["answer"], stm, tokenizer)
                      for kind in ("accepted", "rejected", "neutral") if kind in item}  # fmt: skip
                ref = {kind: mean_logp(reference, item["query"], item[kind]["answer"], stm, tokenizer) for kind in lp}
                x = beta * ((lp["accepted"] - lp["rejected"]) - (ref["accepted"] - ref["rejected"]))
                value = (1 - smoothing) * -F.logsigmoid(x) + smoothing * -F.logsigmoid(-x)
                if "neutral" in lp:
                    value = value + anchor_weight * (lp["neutral"] - ref["neutral"]).abs()
                turn_losses.setdefault(k, []).append(value)
                expected_logps[(k, j)] = (lp, ref)
                seq, _ = encode_interaction(tokenizer, item["query"], item["accepted"]["answer"])
                stm = model(input_ids=torch.tensor([seq]), stm=stm, mode="memory_update").stm  # accepted, after scoring
    expected = torch.stack([torch.stack(values).mean() for values in turn_losses.values()]).mean()
    torch.testing.assert_close(loss.double(), expected, atol=2e-5, rtol=1e-5)
    for (k, j), (lp, ref) in expected_logps.items():
        for kind in lp:
            torch.testing.assert_close(out["logps"][kind][k, j].double(), lp[kind], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(out["ref_logps"][kind][k, j].double(), ref[kind], atol=2e-5, rtol=1e-5)
    assert 0.0 < loss.item() and torch.isfinite(loss)
    loss.backward()  # differentiable end to end


def test_memory_is_built_only_from_earlier_accepted_turns(tokenizer, tmp_path):  # noqa: F811
    trainer = make_trainer(tokenizer, tmp_path)
    model = trainer.model
    model.eval()

    def run(edit=None):
        rows = copy.deepcopy(hand_rows())
        if edit:
            edit(rows[0]["interactions"])
        with torch.no_grad():
            return trainer.compute_loss(model, DMPOCollator(tokenizer)(rows), return_outputs=True)[1]

    def close(first, second):
        return torch.allclose(first, second, atol=1e-5)

    base = run()
    # turn 1's own accepted answer is not in the memory it is scored from: its rejected / neutral scores do not move
    same_turn = run(lambda turns: turns[1]["accepted"].update(answer="Brindle, of course."))
    for name in ("logps", "ref_logps"):
        for kind in ("rejected", "neutral"):
            assert close(same_turn[name][kind][1], base[name][kind][1]), (name, kind)
    assert not close(same_turn["logps"]["accepted"][1, 0], base["logps"]["accepted"][1, 0])
    # turn 0's accepted answer is in it: every score of turn 1 moves
    previous = run(lambda turns: turns[0]["accepted"].update(answer="Noted, the cat is Tiddles."))
    for kind in ("accepted", "rejected", "neutral"):
        assert not close(previous["logps"][kind][1, 0], base["logps"][kind][1, 0]), kind
        assert not close(previous["ref_logps"][kind][1, 0], base["ref_logps"][kind][1, 0]), kind
    assert close(previous["logps"]["rejected"][0], base["logps"]["rejected"][0])  # turn 0 read the initial STM
    # rejected / neutral answers never reach memory
    rejected = run(lambda turns: turns[0]["rejected"].update(answer="Brindle is a dog, not a cat."))
    assert close(rejected["turn_losses"][1], base["turn_losses"][1])
    assert close(rejected["stm"], base["stm"])


def trainer_grads(trainer) -> dict[str, bool]:
    model = trainer.model
    model.train()
    model.zero_grad()
    trainer.compute_loss(model, DMPOCollator(tokenizer=trainer.processing_class)(preference_rows(4, seed=1))).backward()
    found = {}
    for name, param in model.named_parameters():
        part = next((p for p in ("model.memory_attention.", "model.encoder.", "model.decoder.") if name.startswith(p)),
                    None)  # fmt: skip
        if part:
            found[part] = found.get(part, False) or (param.grad is not None and param.grad.abs().sum().item() > 0)
    return found


def test_gradient_reaches_memory_attention_only_when_unfrozen(tokenizer, tmp_path):  # noqa: F811
    unfrozen = trainer_grads(make_trainer(tokenizer, tmp_path))
    assert unfrozen == {"model.memory_attention.": True, "model.encoder.": True, "model.decoder.": True}
    frozen = trainer_grads(make_trainer(tokenizer, tmp_path, memory_attention_unfreeze_epoch=None,
                                        encoder_unfreeze_epoch=1))  # fmt: skip
    assert frozen == {"model.memory_attention.": False, "model.encoder.": False, "model.decoder.": True}
    # bptt_turns: the same loss, but with 0 the turn-2 loss also reaches the turn-1 write (3-turn episodes)
    vectors = {}
    for bptt in (0, 1):
        trainer = make_trainer(tokenizer, tmp_path, bptt_turns=bptt)
        trainer_grads(trainer)
        vectors[bptt] = torch.cat([p.grad.flatten() for n, p in trainer.model.named_parameters()
                                   if n.startswith("model.memory_attention.")])  # fmt: skip
    assert not torch.allclose(vectors[0], vectors[1])
    only_decoder = make_trainer(tokenizer, tmp_path, train_only_decoder=True)
    assert (only_decoder.memory_attention_trains, only_decoder.encoder_trains) == (False, False)
    only_decoder.update_frozen(5)
    assert trainer_grads(only_decoder)["model.memory_attention."] is False


def test_preferences_are_learned_and_reference_stays_frozen(tokenizer, tmp_path):  # noqa: F811
    model = tiny_model(tokenizer)
    rows = Dataset.from_list(preference_rows(48, seed=2))
    args = DMPOConfig(**common_args(tmp_path, max_steps=12, eval_strategy="no"), beta=0.5)
    trainer = DMPOTrainer(model=model, args=args, train_dataset=rows, eval_dataset=Dataset.from_list(
        preference_rows(8, seed=3)), processing_class=tokenizer)  # fmt: skip
    reference = trainer.ref_model
    assert reference is not model and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    snapshot = {n: p.detach().clone() for n, p in reference.named_parameters()}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()

    history = [e for e in trainer.state.log_history if "loss" in e]
    assert {"dmpo_loss", "reward_margin", "preference_accuracy", "reward_accepted", "reward_rejected",
            "stm_update_norm"} <= set(history[0])  # fmt: skip
    assert history[0]["preference_accuracy"] == 0.0 and history[0]["dmpo_loss"] == pytest.approx(0.6931, abs=1e-3)
    tail = history[-3:]
    assert min(e["preference_accuracy"] for e in tail) >= 0.9, [e["preference_accuracy"] for e in history]
    assert max(e["dmpo_loss"] for e in tail) < 0.6, [e["dmpo_loss"] for e in history]
    assert all(e["reward_margin"] > 0 for e in tail)

    assert all(torch.equal(p, snapshot[n]) for n, p in reference.named_parameters())  # the reference did not move
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    assert any(not torch.equal(p.detach(), start[n]) for n, p in model.named_parameters())  # the policy did
    trainer.evaluate()
    metrics = trainer.state.log_history[-1]  # the recorded metrics reach the logs (evaluate() returns eval_loss only)
    assert metrics["eval_preference_accuracy"] >= 0.9 and metrics["eval_loss"] < 0.6, metrics


def test_validation_errors(tokenizer, tmp_path):  # noqa: F811
    for fields, name in [({"beta": 0.0}, "beta"), ({"label_smoothing": 0.5}, "label_smoothing"),
                         ({"anchor_weight": -1.0}, "anchor_weight"), ({"max_length": 4}, "max_length"),
                         ({"episode_window": "probe"}, "episode_window"),
                         ({"bptt_turns": -1}, "bptt_turns")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            DMPOConfig(**common_args(tmp_path), **fields)
    with pytest.raises(ValueError, match="DMPOConfig"):
        DMPOTrainer(model=tiny_model(tokenizer), args=SMATConfig(**common_args(tmp_path)))

    collator = DMPOCollator(tokenizer, max_length=32)
    good = hand_rows()[1]
    bad_rows = [
        ({"interactions": []}, r"row 1 .*'interactions'.*empty"),
        ({"text": "x"}, r"row 1 .*'interactions'.*missing"),
        ({"interactions": [{"query": "q", "accepted": {"answer": "a"}}]},
         r"row 1 .*interactions\[0\]\.rejected'.*missing"),
        ({"interactions": [turn("q", "", "b")]}, r"'interactions\[0\]\.accepted\.answer'.*empty"),
        ({"interactions": [turn("q", "a", "b"), {"query": "q", "accepted": "a", "rejected": {"answer": "b"}}]},
         r"'interactions\[1\]\.accepted'.*expected an object"),
        ({"interactions": [{**turn("q", "a", "b"), "accepted": {"answer": "a", "think": "hmm"}}]},
         r"'interactions\[0\]\.accepted\.think'.*not supported"),
        ({"interactions": [{**turn("q", "a", "b"), "rejected": {"answer": "a", "tool_call": "f()"}}]},
         r"'interactions\[0\]\.rejected\.tool_call'.*not supported"),
        ({"interactions": [{**turn("q", "a", "b"), "internal": "notes"}]},
         r"'interactions\[0\]\.internal'.*not supported"),
        ({"interactions": [{"tool_use": "result", "accepted": {"answer": "a"}, "rejected": {"answer": "b"}}]},
         r"'interactions\[0\]\.tool_use'.*not supported"),
        ({"system": "Be brief.", "interactions": [turn("q", "a", "b")]}, r"'system'.*not supported"),
        ({"interactions": [turn("q", "a " * 40, "b")]}, r"row 1 .*'interactions\[0\]\.accepted'.*exceed max_length=32"),
    ]  # fmt: skip
    for row, pattern in bad_rows:
        with pytest.raises(ValueError, match=pattern):
            collator([good, row])
    # Arrow fills absent optional fields with None: they count as absent
    arrow_rows = list(Dataset.from_list([good, {"interactions": [turn("q", "a", "b", neutral="n")]}]))
    assert arrow_rows[0]["interactions"][0]["neutral"] is None
    assert collator(arrow_rows)["neutral_mask"].tolist() == [[0, 1]]

    rows = [good, bad_rows[3][0], good, bad_rows[-1][0]]
    with pytest.raises(ValueError, match=r"row 1: field 'interactions\[0\]\.accepted\.answer'"):
        validate_dmpo_rows(rows, tokenizer, max_length=32)
    kept = validate_dmpo_rows(rows, tokenizer, max_length=32, on_error="skip")
    assert len(kept) == 2
    with pytest.raises(ValueError, match="all 1 DMPO rows are invalid"):
        validate_dmpo_rows([bad_rows[0][0]], on_error="skip")


def test_script_end_to_end_writes_a_loadable_folder(tokenizer, tmp_path):  # noqa: F811
    import train_dmpo

    tokenizer.save_pretrained(tmp_path / "tok")
    write_jsonl(preference_rows(8, seed=4), tmp_path / "rows.jsonl")
    config = RxTConfig.tiny(vocab_size=len(tokenizer)).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({k: config[k] for k in ("decoder_config", "encoder_config",
                                                                             "memory_attention_config")}))  # fmt: skip
    out = tmp_path / "dmpo"
    trainer = train_dmpo.main(["--model_config", str(tmp_path / "config.json"), "--tokenizer_name_or_path",
                               str(tmp_path / "tok"), "--train_file", str(tmp_path / "rows.jsonl"), "--output_dir",
                               str(out), "--max_steps", "2", "--report_to", "none", "--save_strategy", "no",
                               "--use_cpu", "True", "--per_device_train_batch_size", "4", "--disable_tqdm", "True",
                               "--beta", "0.2", "--anchor_weight", "0.05", "--max_length", "96",
                               "--logging_steps", "1"])  # fmt: skip
    assert trainer.args.beta == 0.2 and trainer.state.global_step == 2
    assert "preference_accuracy" in trainer.state.log_history[0]
    assert (out / "modeling_rxt.py").is_file() and (out / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), loaded.state_dict()[name]), name

    # the script checks rows with the DMPO validator: a row without `rejected` is named, or skipped on request
    rows = preference_rows(8, seed=5)
    del rows[3]["interactions"][0]["rejected"]
    write_jsonl(rows, tmp_path / "bad.jsonl")
    argv = ["--model_name_or_path", str(out), "--train_file", str(tmp_path / "bad.jsonl"), "--output_dir",
            str(tmp_path / "dmpo2"), "--max_steps", "1", "--report_to", "none", "--save_strategy", "no", "--use_cpu",
            "True", "--per_device_train_batch_size", "4", "--disable_tqdm", "True", "--max_length", "96"]  # fmt: skip
    with pytest.raises(ValueError, match=r"row 3: field 'interactions\[0\]\.rejected'"):
        train_dmpo.main(argv)
    assert len(train_dmpo.main(argv + ["--on_error", "skip"]).train_dataset) == 7


def test_run_stage_needs_exactly_one_of_kind_and_validate():
    from trainers.cli import run_stage

    for kind, validate in ((None, None), ("episode", validate_dmpo_rows)):
        with pytest.raises(ValueError, match="either a row kind or a validate function"):
            run_stage(DMPOTrainer, DMPOConfig, kind, None, [], validate=validate)
