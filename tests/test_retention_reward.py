"""Retention term of the MRL reward (trainers/mrl_reward.py, RET): the IDF table against a hand computation, the
batched n-gram recall against a plain-Python per-row reference, hand-built answers on synthetic dialogues (the right
value in the other template scores high, the right template with a wrong value low), batched = per-row, no gradient,
validation, and a short MRL run whose retention rises."""

import math
import random
from collections import Counter

import pytest
import torch
from datasets import Dataset
from torch import nn

from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.tokenization_rxt import check_rxt_tokenizer, train_rxt_tokenizer
from trainers.mrl_config import MRLConfig
from trainers.mrl_reward import (
    MRLReward,
    MRLRewardArguments,
    episode_idf,
    inverse_document_frequency,
    retention_context,
    retention_score,
)
from trainers.mrl_trainer import MRLCollator, MRLTrainer
from trainers.synthetic import generate_dialogues, generate_pretrain, other_template, value_pools

PAD = 0


# --------------------------------------------------------------------------------------------------------------------
# plain-Python reference (one row at a time, Counter of n-gram tuples)


def reference_idf(rows, vocab_size, zero_ids):
    n = len(rows)
    df = Counter(t for row in rows for t in set(row))
    return [0.0 if v in zero_ids else math.log((1 + n) / (1 + df[v])) for v in range(vocab_size)]


def ngrams(row, n, pad=PAD):
    return Counter(tuple(row[i : i + n]) for i in range(len(row) - n + 1) if pad not in row[i : i + n])


def reference_retention(gen, ref, ctx, idf, max_n=2, query=()):
    matched = total = 0.0
    for n in range(1, max_n + 1):
        c_gen, c_ref, c_ctx, c_query = ngrams(gen, n), ngrams(ref, n), ngrams(ctx, n), ngrams(list(query), n)
        for gram, count in c_ref.items():
            weight = sum(idf[t] for t in gram) / n
            if c_query[gram] == 0:
                matched += weight * min(c_gen[gram], count, c_ctx[gram])
            total += weight * count
    return matched / total if total > 0 else 0.0


def padded(rows, width=None):
    width = max(width or 1, max(len(r) for r in rows))
    return torch.tensor([list(r) + [PAD] * (width - len(r)) for r in rows])


# --------------------------------------------------------------------------------------------------------------------
# IDF


def test_idf_from_rows_matches_a_hand_computation():
    rows = [[1, 2, 3], [2, 3], [3, 4, 4], [5]]  # N = 4 documents; df: 1->1, 2->2, 3->3, 4->1, 5->1, 6->0
    idf = inverse_document_frequency(rows, vocab_size=7, zero_ids=[0, 5])
    by_hand = [0.0, math.log(5 / 2), math.log(5 / 3), math.log(5 / 4), math.log(5 / 2), 0.0, math.log(5 / 1)]
    assert idf.dtype == torch.float32 and idf.shape == (7,)
    assert idf.tolist() == pytest.approx(by_hand, abs=1e-7)
    assert idf.tolist() == pytest.approx(reference_idf(rows, 7, {0, 5}), abs=1e-7)


def test_episode_idf_counts_each_query_and_answer_as_a_document():
    episodes = [[([1, 2], [2, 3]), ([4], [3])], [([1], [5, 5])]]
    assert torch.equal(episode_idf(episodes, 6, [0]),
                       inverse_document_frequency([[1, 2], [2, 3], [4], [3], [1], [5, 5]], 6, [0]))  # fmt: skip


@pytest.mark.parametrize("rows, vocab, zero, message", [
    ([], 5, (), "at least one document"),
    ([[1, 7]], 5, (), "token id 7 outside the vocabulary [0, 5)"),
    ([[1]], 5, (9,), "zero_ids must lie in [0, 5)"),
    ([[1]], 0, (), "vocab_size must be an integer >= 1"),
])  # fmt: skip
def test_idf_bad_input_names_the_problem(rows, vocab, zero, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        inverse_document_frequency(rows, vocab, zero)


def test_retention_context_joins_earlier_turns_with_pads():
    episodes = [[([1, 2], [3]), ([4], [5, 6]), ([7], [8])], [([9], [10])]]
    assert retention_context(episodes, 0, PAD) == [[1, 2, PAD, 3, PAD], [9, PAD, 10, PAD]]
    assert retention_context(episodes, 1, PAD) == [[1, 2, PAD, 3, PAD, 4, PAD, 5, 6, PAD], [9, PAD, 10, PAD]]


# --------------------------------------------------------------------------------------------------------------------
# the batched term against the reference


def random_case(rng: random.Random, batch: int, vocab: int):
    def row(low, high):
        ids = [rng.randrange(1, vocab) for _ in range(rng.randint(low, high))]
        if ids and rng.random() < 0.2:  # a pad inside the row: n-grams across it do not count
            ids[rng.randrange(len(ids))] = PAD
        return ids

    gens = [row(0, 9) for _ in range(batch)]
    refs = [row(0, 8) for _ in range(batch)]
    ctxs = [row(0, 14) for _ in range(batch)]
    queries = [row(0, 5) for _ in range(batch)]
    for i in range(batch):  # make overlaps likely
        if refs[i] and rng.random() < 0.7:
            start = rng.randrange(len(refs[i]))
            ctxs[i] += refs[i][start : start + rng.randint(1, 4)]
            gens[i] = refs[i][: rng.randint(0, len(refs[i]))] + gens[i][:3]
            queries[i] += refs[i][start : start + rng.randint(0, 2)]
    return gens, refs, ctxs, queries


@pytest.mark.parametrize("with_query", [False, True])
@pytest.mark.parametrize("max_n", [1, 2, 3])
def test_retention_agrees_with_the_python_reference_on_random_cases(max_n, with_query):
    rng = random.Random(max_n)
    vocab = 12  # small: repeated n-grams, so the clipping by min(counts) matters
    for trial in range(20):
        gens, refs, ctxs, queries = random_case(rng, batch=16, vocab=vocab)
        idf = [0.0] + [rng.uniform(0.0, 3.0) for _ in range(vocab - 1)]
        query = padded(queries) if with_query else None
        got = retention_score(padded(gens), padded(refs), padded(ctxs), torch.tensor(idf), PAD, max_n, query)
        expected = [reference_retention(g, r, c, idf, max_n, q if with_query else ())
                    for g, r, c, q in zip(gens, refs, ctxs, queries)]  # fmt: skip
        assert got.tolist() == pytest.approx(expected, abs=1e-6), trial


def test_large_vocabulary_orders_take_the_row_wise_unique_and_agree():
    """With V = 70 000, 4-grams no longer fit one int64 code per (row, n-gram): that order takes `unique(dim=0)`."""
    rng = random.Random(5)
    gens, refs, ctxs, queries = random_case(rng, batch=16, vocab=9)
    idf = [0.0] + [rng.uniform(0.0, 3.0) for _ in range(69_999)]
    assert 16 * 70_000**3 < 2**62 <= 16 * 70_000**4
    got = retention_score(padded(gens), padded(refs), padded(ctxs), torch.tensor(idf), PAD, 4, padded(queries))
    expected = [reference_retention(g, r, c, idf, 4, q) for g, r, c, q in zip(gens, refs, ctxs, queries)]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_token_ids_outside_the_idf_table_are_an_error():
    with pytest.raises(ValueError, match=r"context holds token ids outside the IDF table's vocabulary \[0, 5\)"):
        retention_score(padded([[1, 2]]), padded([[1, 2]]), padded([[1, 7]]), torch.ones(5), PAD)


def test_batched_retention_equals_per_row():
    rng = random.Random(7)
    gens, refs, ctxs, queries = random_case(rng, batch=24, vocab=20)
    idf = torch.rand(20, generator=torch.Generator().manual_seed(0))
    batched = retention_score(padded(gens, 30), padded(refs, 25), padded(ctxs, 40), idf, PAD,
                              query=padded(queries, 9))  # extra padding too  # fmt: skip
    alone = torch.cat([retention_score(padded([g]), padded([r]), padded([c]), idf, PAD, query=padded([q]))
                       for g, r, c, q in zip(gens, refs, ctxs, queries)])  # fmt: skip
    assert torch.allclose(batched, alone, atol=1e-7, rtol=0)


def test_retention_of_hand_built_rows():
    idf = torch.tensor([0.0, 0.1, 0.1, 2.0, 3.0, 1.0])  # 1, 2: template words; 3, 4: values
    ref, ctx = [1, 2, 3], [5, 1, 2, 3, PAD, 4]  # the reference repeats "1 2 3" from the context
    total = (0.1 + 0.1 + 2.0) + (0.1 + 1.05)  # unigrams + bigrams (1 2), (2 3) of the reference
    rows = {"reference": [1, 2, 3], "value only": [3], "template, wrong value": [1, 2, 4], "nothing": [5, 5]}
    got = retention_score(padded(list(rows.values())), padded([ref] * 4), padded([ctx] * 4), idf, PAD)
    assert got.tolist() == pytest.approx([1.0, 2.0 / total, (0.2 + 0.1) / total, 0.0], abs=1e-6)
    # the query holds "1 2": unigrams 1, 2 and the bigram (1 2) need no memory and earn nothing (still counted below)
    asked = retention_score(padded(list(rows.values())), padded([ref] * 4), padded([ctx] * 4), idf, PAD,
                            query=padded([[1, 2, PAD]] * 4))  # fmt: skip
    assert asked.tolist() == pytest.approx([3.05 / total, 2.0 / total, 0.0, 0.0], abs=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# hand-built answers on synthetic dialogues


@pytest.fixture(scope="module")
def tokenizer():  # large enough that held-out names are a few sub-words, not letters
    return train_rxt_tokenizer([r["text"] for r in generate_pretrain(1500, seed=3)], vocab_size=2000, min_frequency=1)


@pytest.fixture(scope="module")
def special_ids(tokenizer):
    return {k: v for k, v in check_rxt_tokenizer(tokenizer).items() if v is not None}


@pytest.fixture(scope="module")
def idf(tokenizer, special_ids):
    episodes = MRLCollator(tokenizer, 256)(generate_dialogues(300, seed=0, split="train"))["episodes"]
    return episode_idf(episodes, len(tokenizer), special_ids.values())


def score(tokenizer, special_ids, idf, context_turns, query, reference, answers):
    pad = special_ids["pad_token_id"]
    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    context = retention_context([[(encode(q), encode(a)) for q, a in context_turns]], len(context_turns) - 1, pad)
    def width(rows):
        return max(len(r) for r in rows)
    gen = [encode(a) for a in answers]
    gen = torch.tensor([r + [pad] * (width(gen) - len(r)) for r in gen])
    def repeat(ids):
        return torch.tensor([ids] * len(answers))
    return retention_score(gen, repeat(encode(reference)), repeat(context[0]), idf, pad,
                           query=repeat(encode(query))).tolist()  # fmt: skip


def test_idf_weighs_template_words_little_and_values_much(tokenizer, special_ids, idf):
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(idf[i] == 0 for i in special_ids.values())
    template, value = idf[ids(" is called.")], idf[ids(" Stubax")]
    assert value.min() > 1.5 * template.max(), (value, template)
    assert idf[ids(".")].item() < 0.5 and idf[ids(" is")].item() < 1.0  # in most documents


def test_right_value_in_another_template_scores_high_wrong_value_low(tokenizer, special_ids, idf):
    context = [("My sister is called Stubax.", "Noted: your sister is called Stubax."),
               ("Tell me something about rivers.", "Rivers shape valleys over time.")]  # fmt: skip
    reference = "Your sister is called Stubax."
    paraphrase = other_template(reference)
    assert paraphrase == "Your sister's name is Stubax."
    ref, para, wrong, echo = score(tokenizer, special_ids, idf, context, "What is my sister called?", reference,
                                   [reference, paraphrase, "Your sister is called Redassa.",
                                    "Rivers shape valleys over time."])  # fmt: skip
    assert 0.6 < ref < 0.9, ref  # "Your" stands nowhere in the context, "sister" also in the query: room < 1
    assert para > 0.75 * ref, (para, ref)
    assert wrong < 0.15 * ref, (wrong, ref)
    assert echo < 0.05, echo  # the previous turn echoed: the reference uses none of it


def test_probes_of_held_out_dialogues_value_beats_template(tokenizer, special_ids, idf):
    """Every probe of 30 held-out dialogues: the reference's other template keeps most of the reference's score, the
    reference with another value of the same attribute loses most of it."""
    pools = value_pools("test")
    paraphrases, wrongs = [], []
    for row in generate_dialogues(30, seed=1, split="test"):
        turns = [(row["query"], row["answer"])] + [(t["query"], t["answer"]) for t in row["interactions"]]
        for probe in row["probes"]:
            reference = turns[probe["turn"]][1]
            other_value = next(v for v in pools[probe["attribute"]]
                               if not set(v.split()) & set(probe["expected"].split()))  # no word in common
            answers = [reference, other_template(reference), reference.replace(probe["expected"], other_value)]
            query = turns[probe["turn"]][0]
            ref, para, wrong = score(tokenizer, special_ids, idf, turns[: probe["turn"]], query, reference, answers)
            paraphrases.append(para / ref)
            wrongs.append(wrong / ref)
    assert len(paraphrases) >= 40
    assert sum(p > w for p, w in zip(paraphrases, wrongs)) == len(paraphrases)
    assert sum(paraphrases) / len(paraphrases) > 0.75
    assert sum(wrongs) / len(wrongs) < 0.3


# --------------------------------------------------------------------------------------------------------------------
# MRLReward integration


def args(**kwargs) -> MRLRewardArguments:
    return MRLRewardArguments(**kwargs)


GEN = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [2, 2, 2, 2]])
REF = torch.tensor([[1, 2, 3], [4, 6, 0], [2, 3, 0]])
SAVED = torch.tensor([[1, 2, 3, 4], [6, 0, 0, 0], [2, 2, 0, 0]])
CONTEXT = torch.tensor([[1, 2, 0, 3], [4, 5, 6, 0], [7, 0, 0, 0]])


def embedding(requires_grad=False) -> nn.Embedding:
    torch.manual_seed(0)
    emb = nn.Embedding(8, 4)
    emb.weight.requires_grad_(requires_grad)
    return emb


def test_reward_adds_the_weighted_retention_term():
    idf = torch.linspace(0.0, 2.0, 8)
    base = MRLReward(args(), embedding(), PAD)(GEN, REF, SAVED)  # bleu 0.5, cos 0.5
    mixed = MRLReward(args(bleu_factor=0.3, cos_factor=0.3, retention_factor=0.4), embedding(), PAD, idf=idf)
    ret_context = retention_score(GEN, REF, CONTEXT, idf, PAD)
    ret_saved = retention_score(GEN, REF, SAVED, idf, PAD)
    assert not torch.equal(ret_context, ret_saved)
    assert torch.allclose(mixed(GEN, REF, SAVED, context=CONTEXT), 0.6 * base + 0.4 * ret_context, atol=1e-6)
    assert torch.allclose(mixed(GEN, REF, SAVED), 0.6 * base + 0.4 * ret_saved, atol=1e-6)  # no context: saved
    assert torch.equal(mixed.retention(GEN, REF, CONTEXT), ret_context)
    only = MRLReward(args(bleu_factor=0.0, cos_factor=0.0, retention_factor=1.0), embedding(), PAD, idf=idf)
    assert torch.equal(only(GEN, REF, SAVED, context=CONTEXT), ret_context)


def test_rewards_carry_no_gradient():
    emb = embedding(requires_grad=True)
    idf = torch.linspace(0.0, 2.0, 8).requires_grad_(True)
    reward = MRLReward(args(bleu_factor=0.3, cos_factor=0.3, retention_factor=0.4), emb, PAD, idf=idf)
    for out in (reward(GEN, REF, SAVED, context=CONTEXT), reward.retention(GEN, REF, CONTEXT),
                retention_score(GEN, REF, CONTEXT, idf, PAD)):  # fmt: skip
        assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("kwargs, message", [
    ({"retention_factor": 1.5, "allow_not_summing_factors": True},
     "retention_factor must be a number in [0, 1], got 1.5"),
    ({"retention_factor": -0.1, "allow_not_summing_factors": True}, "retention_factor must be a number in [0, 1]"),
    ({"retention_factor": 0.2}, "bleu_factor + cos_factor + len_factor + retention_factor must sum to 1, got 1.2"),
    ({"retention_max_n": 0}, "retention_max_n must be an integer in [1, 4], got 0"),
])  # fmt: skip
def test_retention_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("+", r"\+")):
        args(**kwargs).validate_reward_arguments()


def test_retention_needs_an_idf_table_of_the_vocabulary_size():
    with pytest.raises(ValueError, match="retention_factor=0.4 needs an IDF table"):
        MRLReward(args(bleu_factor=0.3, cos_factor=0.3, retention_factor=0.4), embedding(), PAD)
    with pytest.raises(ValueError, match=r"idf must be a floating \[V\] tensor with V = 8"):
        MRLReward(args(), embedding(), PAD, idf=torch.zeros(5))
    with pytest.raises(ValueError, match="MRLReward.retention needs an IDF table"):
        MRLReward(args(), embedding(), PAD).retention(GEN, REF, CONTEXT)


# --------------------------------------------------------------------------------------------------------------------
# a short MRL run raises the retention term


@pytest.fixture(scope="module")
def small_tokenizer():  # the tokenizer of tests/test_mrl.py: a tiny policy samples its words by chance
    return train_rxt_tokenizer([r["text"] for r in generate_pretrain(400, seed=3)], vocab_size=400, min_frequency=1)


def test_mrl_run_raises_retention_on_a_learnable_episode_set(small_tokenizer, tmp_path):
    """Every episode says "Yes." first and asks for it again. Rewarded by the retention term alone (group advantages),
    a short IMPO run (60 steps) must raise the greedy retention on these episodes (0 before; 0.54 … 0.83 after over
    seeds 0 … 2)."""
    tokenizer = small_tokenizer
    special_ids = {k: v for k, v in check_rxt_tokenizer(tokenizer).items() if v is not None}
    rows = [{"query": q, "answer": "Yes.", "interactions": [{"query": "Say it again.", "answer": "Yes."}]}
            for q in ("Say yes.", "Do you agree?", "Is it raining?", "Are you there?")]  # fmt: skip
    torch.manual_seed(0)
    model = RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tokenizer), learned_stm_init=True, stm_init="normal",
                                          **special_ids))  # fmt: skip
    config = MRLConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
                       disable_tqdm=True, seed=0, per_device_train_batch_size=4, per_device_eval_batch_size=4,
                       max_completion_length=6, warmup_steps=0, max_length=64, curriculum="1", max_steps=60,
                       advantage_estimator="group", num_generations=4, beta=0.0, num_iterations=2,
                       learning_rate=1e-2, lr_scheduler_type="constant", bleu_factor=0.0, cos_factor=0.0,
                       retention_factor=1.0)  # fmt: skip
    trainer = MRLTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=Dataset.from_list(rows))
    expected_idf = episode_idf(MRLCollator(tokenizer, 64)(rows)["episodes"], len(tokenizer), special_ids.values())
    assert torch.equal(trainer.reward_fn.idf, expected_idf)  # built once from the training episodes
    before = trainer.evaluate(eval_dataset=Dataset.from_list(rows))["eval_reward"]  # greedy rollouts, RET alone
    trainer.train()
    after = trainer.evaluate(eval_dataset=Dataset.from_list(rows))["eval_reward"]
    assert after > before + 0.3, (before, after)


def test_rollout_passes_every_earlier_turn_as_the_retention_context(small_tokenizer, tmp_path):
    """With the retention term on, each step's reward gets `retention_context` (turns 0 .. step, pad-joined) and the
    reward includes RET of the generated answer against it."""
    from test_mrl import ROWS, RecordingReward

    tokenizer = small_tokenizer
    special_ids = {k: v for k, v in check_rxt_tokenizer(tokenizer).items() if v is not None}
    pad = special_ids["pad_token_id"]
    torch.manual_seed(0)
    model = RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tokenizer), **special_ids))
    config = MRLConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=64, curriculum="3",
                       max_completion_length=5, beta=0.0, bleu_factor=0.25, cos_factor=0.25,
                       retention_factor=0.5)  # fmt: skip
    trainer = MRLTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=Dataset.from_list(ROWS))
    recorder = RecordingReward(trainer.reward_fn)
    trainer.reward_fn = recorder
    episodes = MRLCollator(tokenizer, 64)(ROWS)["episodes"]
    trainer.rollout(episodes)
    assert len(recorder.calls) == 3
    for step, call in enumerate(recorder.calls):
        context = [[t for t in row if t != pad] for row in call["context"].tolist()]
        expected = [[t for t in row if t != pad] for row in retention_context(episodes, step, pad)]
        assert context == expected
        ret = retention_score(call["generated"], call["reference"], call["context"], recorder.idf, pad)
        assert torch.allclose(call["out"], MRLReward(MRLRewardArguments(), model.get_input_embeddings(), pad)(
            call["generated"], call["reference"], call["saved"], mode=call["mode"],
            running_mean=call["running_mean"], first_step=call["first_step"]) * 0.5 + 0.5 * ret, atol=1e-6)
