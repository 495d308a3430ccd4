"""scripts/eval_mrl.py: reward and retention with their ceilings, the paired evaluation (recall per distance, mean
recall over distances 2-8 with a paired-bootstrap interval, distance-1 change, gain shares) on tiny saved models."""

import json

import eval_mrl
import pytest
import torch
from datasets import Dataset

from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.tokenization_rxt import check_rxt_tokenizer, train_rxt_tokenizer
from trainers.mrl_config import MRLConfig
from trainers.mrl_reward import MRLReward, episode_idf
from trainers.mrl_trainer import MRLCollator, MRLTrainer
from trainers.synthetic import generate_dialogues, generate_pretrain, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_mrl")
    tokenizer = train_rxt_tokenizer([r["text"] for r in generate_pretrain(400, seed=3)], vocab_size=400,
                                    min_frequency=1)  # fmt: skip
    ids = {k: v for k, v in check_rxt_tokenizer(tokenizer).items() if v is not None}
    for name, seed in (("before", 0), ("after", 1)):
        torch.manual_seed(seed)
        model = RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tokenizer), **ids))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    write_jsonl(generate_dialogues(6, seed=0, split="validation", max_turns=5, max_distance=3), root / "reward.jsonl")
    write_jsonl(generate_dialogues(8, seed=0, split="test", max_turns=6, max_distance=4), root / "recall.jsonl")
    write_jsonl(generate_dialogues(20, seed=0, split="train"), root / "train.jsonl")
    return root, tokenizer


def run(root, after="after", *flags):
    output = root / f"eval_{after}_{len(flags)}.json"
    argv = ["--before", str(root / "before"), "--after", str(root / after), "--reward_data", str(root / "reward.jsonl"),
            "--recall_data", str(root / "recall.jsonl"), "--idf_data", str(root / "train.jsonl"), "--output",
            str(output), "--output_dir", str(root / "out"), "--report_to", "none", "--use_cpu", "true",
            "--curriculum", "2", "--max_length", "128", "--max_completion_length", "6", "--max_new_tokens", "6",
            "--recall_batch_size", "3", "--per_device_eval_batch_size", "4", "--bootstrap_resamples", "500",
            *flags]  # fmt: skip
    result = eval_mrl.main(argv)
    assert json.loads(output.read_text()) == json.loads(json.dumps(result))
    return result


MIXED = ("--bleu_factor", "0.25", "--cos_factor", "0.25", "--retention_factor", "0.5", "--reward_ceiling", "true")


def test_reward_retention_ceilings_and_gain_shares(setup):
    root, tokenizer = setup
    result = run(root, "after", *MIXED)
    # the reward is MRLTrainer.evaluate's, with the IDF of the training episodes
    config = MRLConfig(output_dir=str(root / "check"), report_to="none", use_cpu=True, curriculum="2", max_length=128,
                       max_completion_length=6, per_device_eval_batch_size=4, beta=0.0, bleu_factor=0.25,
                       cos_factor=0.25, retention_factor=0.5)  # fmt: skip
    rows = [json.loads(line) for line in (root / "reward.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    model = RxTForCausalLM.from_pretrained(root / "before")
    trainer = MRLTrainer(model=model, args=config, processing_class=tokenizer, eval_dataset=Dataset.from_list(rows))
    ids = check_rxt_tokenizer(tokenizer)
    idf = episode_idf(MRLCollator(tokenizer, 128)(train)["episodes"], len(tokenizer),
                      [i for i in ids.values() if i is not None])  # fmt: skip
    trainer.reward_fn = MRLReward(config, model.get_input_embeddings(), ids["pad_token_id"], idf=idf)
    assert result["reward_before"] == pytest.approx(trainer.evaluate()["eval_reward"], abs=1e-6)
    for term in ("reward", "retention"):
        references, other = result[f"{term}_references"], result[f"{term}_other_template"]
        assert result[f"{term}_ceiling"] == pytest.approx((references + other) / 2)
        room = result[f"{term}_ceiling"] - result[f"{term}_before"]
        assert room > 0
        gain = result[f"{term}_after"] - result[f"{term}_before"]
        assert result[f"{term}_gain_share"] == pytest.approx(gain / room)
    # the references score every turn's whole room: no answer retains more
    assert result["retention_references"] >= max(result["retention_other_template"], result["retention_before"],
                                                 result["retention_after"])  # fmt: skip
    assert 0.0 < result["retention_references"] <= 1.0
    assert set(result["recall_before"]) == set(result["recall_after"])  # trainers.memory_eval, as before


def test_paired_block_counts_probes_and_its_changes_are_paired_differences(setup):
    root, _ = setup
    paired = run(root, "after", *MIXED)["paired"]
    rows = [json.loads(line) for line in (root / "recall.jsonl").read_text().splitlines()]
    probes = [p for row in rows for p in row["probes"]]
    assert paired["n_dialogues"] == len(rows)
    assert paired["counts"] == {str(d): sum(p["distance"] == d for p in probes)
                                for d in sorted({p["distance"] for p in probes})}  # fmt: skip
    for key in ("recall_d2_8", "recall_d1", "reward", "retention"):
        change = paired[f"{key}_change"]
        assert change["mean"] == pytest.approx(paired[f"{key}_after"] - paired[f"{key}_before"], abs=1e-9)
        low, high = change["ci95"]
        assert low <= change["mean"] <= high
    with_far = sum(any(2 <= p["distance"] <= 8 for p in row["probes"]) for row in rows)
    assert paired["recall_d2_8_change"]["n"] == with_far
    for term in ("reward", "retention"):
        room = paired[f"{term}_ceiling"] - paired[f"{term}_before"]
        gain = paired[f"{term}_after"] - paired[f"{term}_before"]
        assert paired[f"{term}_gain_share"] == pytest.approx(gain / room)


def test_same_model_twice_gives_zero_changes_and_teacher_forcing_is_off(setup):
    """Before = after: every paired difference is 0 with a zero-width interval (the evaluation is deterministic and
    paired). `--teacher_forcing true` changes nothing: memory is always written from the model's own answers."""
    root, _ = setup
    same = run(root, "before")
    forced = run(root, "before", "--teacher_forcing", "true")
    for key in ("recall_d2_8", "recall_d1", "reward", "retention"):
        assert same["paired"][f"{key}_change"]["mean"] == 0.0
        assert same["paired"][f"{key}_change"]["ci95"] == [0.0, 0.0]
    assert forced == same
    assert "reward_ceiling" not in same and "reward_gain_share" not in same["paired"]


def test_probe_hits_read_the_answer_of_the_probe_turn():
    rows = [{"probes": [{"turn": 1, "distance": 1, "expected": "Stubax"},
                        {"turn": 3, "distance": 2, "expected": "6943"}]},
            {"probes": [{"turn": 2, "distance": 2, "expected": "dusty plum"}]}]  # fmt: skip
    texts = [["Your sister is Stubax.", "Noted.", "The code is 6944."], ["Hi.", "You like Dusty plum!"]]
    assert eval_mrl.probe_hits(rows, texts) == [{1: [True], 2: [False]}, {2: [True]}]
    assert eval_mrl.distance_recall([{1: [True], 2: [False]}, {2: [True]}, {1: [False]}], range(2, 9)) == [0.0, 1.0,
                                                                                                        None]
    assert eval_mrl.gain_share(0.5, 0.6, 0.7) == pytest.approx(0.5) and eval_mrl.gain_share(0.5, 0.6, 0.5) is None


def test_paired_rollout_reads_each_probe_from_its_turns_answer(setup):
    """Scoring the reference answers (and their other template) through the paired rollout: every text is that turn's
    answer, so every probe is recalled; the retention of the references is their room, never below the other
    template's."""
    root, tokenizer = setup
    rows = [json.loads(line) for line in (root / "recall.jsonl").read_text().splitlines()]
    config = MRLConfig(output_dir=str(root / "check2"), report_to="none", use_cpu=True, curriculum="2", max_length=128,
                       max_completion_length=40, beta=0.0)  # fmt: skip
    model = RxTForCausalLM.from_pretrained(root / "before")
    trainer = MRLTrainer(model=model, args=config, processing_class=tokenizer)
    ids = check_rxt_tokenizer(tokenizer)
    train = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    idf = episode_idf(MRLCollator(tokenizer, 128)(train)["episodes"], len(tokenizer),
                      [i for i in ids.values() if i is not None])  # fmt: skip
    trainer.reward_fn = MRLReward(config, model.get_input_embeddings(), ids["pad_token_id"], idf=idf)
    references = eval_mrl.rollout_scores(trainer, rows, None, 3, answers="references")
    other = eval_mrl.rollout_scores(trainer, rows, None, 3, answers="other_template")
    for row, texts in zip(rows, references["texts"]):
        answers = [turn["answer"] for turn in row["interactions"]]
        assert [t.replace(" ", "") for t in texts[: len(answers)]] == [a.replace(" ", "") for a in answers]
    for scores in (references, other):
        hits = eval_mrl.probe_hits(rows, scores["texts"])
        assert all(all(flags) for by_distance in hits for flags in by_distance.values())
    assert all(r >= o - 1e-6 for r, o in zip(references["retention"], other["retention"]))
    assert trainer.steps == 2 and trainer.strategy == "multi_step" and trainer.teacher_forcing is False  # restored
