"""MRL reward (trainers/mrl_reward.py, docs/spec.md#mrl-reward) against an independent per-row oracle:
NLTK sentence_bleu (BLEU-2, method4) on id lists and a numpy cosine on the embedding matrix."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from torch import nn
from transformers import HfArgumentParser

from trainers.mrl_reward import MRLReward, MRLRewardArguments

TOL = 1e-5
PAD = 0

# Hand-built embedding [V=10, D=3]: token 9 points opposite to tokens 1-3 so some cosines are negative (clamped);
# the pad row is non-zero so that counting pad rows would change the result.
EMB = np.array(
    [
        [0.4, -0.4, 0.7],  # 0 pad
        [1.0, 0.2, 0.0],
        [0.8, 0.5, 0.1],
        [0.9, -0.1, 0.3],
        [0.1, 1.0, 0.2],
        [0.0, 0.7, 0.9],
        [-0.2, 0.3, 1.0],
        [0.5, 0.5, 0.5],
        [0.3, -0.6, 0.4],
        [-1.0, -0.3, -0.2],
    ],
    dtype=np.float32,
)

GEN = torch.tensor([[1, 2, 3, 4, 0, 0], [5, 6, 7, 5, 6, 0], [9, 9, 8, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
REF = torch.tensor([[1, 2, 3, 5, 4, 0, 0], [5, 6, 7, 8, 0, 0, 0], [1, 2, 3, 4, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7]])
SAVED = torch.tensor([[2, 3, 4, 0, 0], [7, 5, 6, 1, 0], [1, 2, 0, 0, 0], [4, 5, 6, 7, 8]])
PREV = torch.tensor([[4, 5, 0], [1, 2, 3], [3, 3, 0], [6, 7, 8]])
PREV2 = torch.tensor([[1, 7, 0, 0], [9, 0, 0, 0], [2, 4, 6, 8], [5, 0, 0, 0]])


# ---------------------------------------------------------------------------------------------------------------
# independent oracle (Python loop per row)
# ---------------------------------------------------------------------------------------------------------------
def strip(row, pad=PAD):
    return [int(t) for t in row if int(t) != pad]


def nltk_bleu(hyp, refs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sentence_bleu(refs, hyp, weights=(0.5, 0.5), smoothing_function=SmoothingFunction().method4)


def np_emb(ids, emb=EMB):
    if not ids:
        return np.zeros(emb.shape[1], dtype=np.float64)
    v = emb[ids].astype(np.float64).mean(0)
    return v / np.linalg.norm(v)


def np_cos_pos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return max(0.0, float(a @ b / (na * nb)))


def np_running_mean(prev_batches, decay, emb=EMB):
    """m per row after feeding each batch of previous ids in order."""
    m = None
    for batch in prev_batches:
        e = np.stack([np_emb(strip(r), emb) for r in batch])
        m = e if m is None else (1 - decay) * e + decay * m
    return m


def oracle(a, gen, ref, saved, mode="standard", m=None, first_step=False, emb=EMB):
    out = []
    nc_ref = a.cos_ref_factor if a.neg_cos_ref_factor is None else a.neg_cos_ref_factor
    nc_saved = a.cos_saved_factor if a.neg_cos_saved_factor is None else a.neg_cos_saved_factor
    for i in range(gen.shape[0]):
        g, r, s = strip(gen[i]), strip(ref[i]), strip(saved[i])
        if mode == "negative":
            bleu = a.neg_bleu_ref_factor * nltk_bleu(g, [r]) + a.neg_bleu_saved_factor * (1 - nltk_bleu(g, [s]))
        elif not a.bleu_with_saved_data:
            bleu = nltk_bleu(g, [r])
        elif a.bleu_mode == "combined":  # empty references are left out of the brevity-penalty rule
            bleu = nltk_bleu(g, [x for x in (r, s) if x] or [r, s])
        else:
            fr, fs = (a.bleu_first_ref_factor, a.bleu_first_saved_factor) if first_step else (
                a.bleu_ref_factor, a.bleu_saved_factor)
            bleu = fr * nltk_bleu(g, [r]) + fs * nltk_bleu(g, [s])
        eg, er, es = np_emb(g, emb), np_emb(r, emb), np_emb(s, emb)
        if mode == "negative":
            cos = nc_saved * (1 - np_cos_pos(eg, es)) + nc_ref * np_cos_pos(eg, er)
        elif m is None:
            cos = a.cos_saved_factor * np_cos_pos(eg, es) + a.cos_ref_factor * np_cos_pos(eg, er)
        else:
            cm = np_cos_pos(eg, m[i])
            run = 1 - cm if mode == "long_range" else cm
            cos = (a.running_mean_saved_factor * np_cos_pos(eg, es) + a.running_mean_ref_factor * np_cos_pos(eg, er)
                   + a.running_mean_factor * run)
        rew = a.bleu_factor * bleu + a.cos_factor * cos
        if a.len_factor > 0:
            n = len(g)
            target = len(r) if a.target_len_as_ref else a.max_rewarded_len
            if n == 0:
                length = 0.0
            elif n < target:
                length = n / target
            else:
                length = target / n if a.neg_reward_len else 1.0
            rew += a.len_factor * length
        if a.tanh_reward_scale:
            rew = 2 * rew - 1
        out.append(rew * a.rewards_scale)
    return np.array(out)


def make(**kw):
    return MRLReward(MRLRewardArguments(**kw), torch.from_numpy(EMB), pad_token_id=PAD)


def check(reward, expected):
    assert reward.dtype == torch.float32 and reward.shape == (len(expected),)
    np.testing.assert_allclose(reward.numpy(), expected, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# the example exercises the interesting cases
# ---------------------------------------------------------------------------------------------------------------
def test_example_covers_edge_cases():
    raw = [float(np_emb(strip(GEN[i])) @ np_emb(strip(SAVED[i]))) for i in range(len(GEN))]
    assert min(raw) < 0  # the cos+ clamp matters
    bleus = [nltk_bleu(strip(GEN[i]), [strip(REF[i])]) for i in range(len(GEN))]
    assert any(0 < b < 1 for b in bleus) and any(b == 0 for b in bleus)


def test_identical_answer_gets_full_reward():
    ids = torch.tensor([[1, 2, 3, 4, 0]])
    check(make()(ids, ids, ids), np.array([1.0]))


# ---------------------------------------------------------------------------------------------------------------
# modes
# ---------------------------------------------------------------------------------------------------------------
def test_standard():
    a = MRLRewardArguments()
    check(make()(GEN, REF, SAVED), oracle(a, GEN, REF, SAVED))


def test_standard_non_default_cos_factors():
    kw = dict(bleu_factor=0.3, cos_factor=0.7, cos_ref_factor=0.8, cos_saved_factor=0.2)
    check(make(**kw)(GEN, REF, SAVED), oracle(MRLRewardArguments(**kw), GEN, REF, SAVED))


def test_standard_with_saved_data():
    kw = dict(bleu_with_saved_data=True, bleu_ref_factor=0.7, bleu_saved_factor=0.3)
    expected = oracle(MRLRewardArguments(**kw), GEN, REF, SAVED)
    check(make(**kw)(GEN, REF, SAVED), expected)
    # the saved data changes the reward here (not a no-op)
    assert np.abs(expected - oracle(MRLRewardArguments(), GEN, REF, SAVED)).max() > 1e-3


def test_first_step_factors():
    kw = dict(bleu_with_saved_data=True, bleu_ref_factor=0.7, bleu_saved_factor=0.3,
              bleu_first_ref_factor=0.1, bleu_first_saved_factor=0.9)
    a = MRLRewardArguments(**kw)
    r = make(**kw)
    first = r(GEN, REF, SAVED, first_step=True)
    check(first, oracle(a, GEN, REF, SAVED, first_step=True))
    assert (first - r(GEN, REF, SAVED)).abs().max() > 1e-3


def test_combined_bleu_mode():
    kw = dict(bleu_with_saved_data=True, bleu_mode="combined")
    r = make(**kw)
    check(r(GEN, REF, SAVED), oracle(MRLRewardArguments(**kw), GEN, REF, SAVED))
    # combined without bleu_with_saved_data is plain BLEU(gen, ref)
    check(make(bleu_mode="combined")(GEN, REF, SAVED), oracle(MRLRewardArguments(), GEN, REF, SAVED))


def test_combined_bleu_mode_ignores_empty_saved_in_brevity_penalty():
    gen = torch.tensor([[1, 2, 3]])
    ref = torch.tensor([[1, 2, 3, 4, 5, 6]])
    empty = torch.zeros(1, 4, dtype=torch.long)
    r = make(bleu_with_saved_data=True, bleu_mode="combined", bleu_factor=1.0, cos_factor=0.0)
    np.testing.assert_allclose(r(gen, ref, empty).numpy(), [nltk_bleu([1, 2, 3], [[1, 2, 3, 4, 5, 6]])], atol=TOL)


def test_running_mean_standard():
    r = make()
    m = r.update_running_mean(r.update_running_mean(None, PREV), PREV2)
    m_np = np_running_mean([PREV, PREV2], 0.2)
    np.testing.assert_allclose(m.numpy(), m_np, atol=1e-6)
    a = MRLRewardArguments()
    out = r(GEN, REF, SAVED, running_mean=m)
    check(out, oracle(a, GEN, REF, SAVED, m=m_np))
    assert (out - r(GEN, REF, SAVED)).abs().max() > 1e-3


def test_long_range():
    r = make()
    a = MRLRewardArguments()
    m = r.update_running_mean(None, PREV)
    m_np = np_running_mean([PREV], 0.2)
    long = r(GEN, REF, SAVED, mode="long_range", running_mean=m)
    check(long, oracle(a, GEN, REF, SAVED, mode="long_range", m=m_np))
    assert (long - r(GEN, REF, SAVED, running_mean=m)).abs().max() > 1e-3
    # without a running mean it equals STANDARD
    check(r(GEN, REF, SAVED, mode="long_range"), oracle(a, GEN, REF, SAVED))
    # with saved data in BLEU too
    kw = dict(bleu_with_saved_data=True, bleu_ref_factor=0.6, bleu_saved_factor=0.4)
    check(make(**kw)(GEN, REF, SAVED, mode="long_range", running_mean=m),
          oracle(MRLRewardArguments(**kw), GEN, REF, SAVED, mode="long_range", m=m_np))


def test_negative():
    a = MRLRewardArguments()
    check(make()(GEN, REF, SAVED, mode="negative"), oracle(a, GEN, REF, SAVED, mode="negative"))
    kw = dict(neg_bleu_ref_factor=0.2, neg_bleu_saved_factor=0.8, neg_cos_ref_factor=0.9, neg_cos_saved_factor=0.1)
    expected = oracle(MRLRewardArguments(**kw), GEN, REF, SAVED, mode="negative")
    check(make(**kw)(GEN, REF, SAVED, mode="negative", running_mean=torch.ones(4, 3)), expected)


def test_negative_cos_factors_default_to_positive_ones():
    kw = dict(cos_ref_factor=0.9, cos_saved_factor=0.1)
    a = MRLRewardArguments(**kw)
    assert a.resolved_neg_cos_factors() == (0.9, 0.1)
    check(make(**kw)(GEN, REF, SAVED, mode="negative"), oracle(a, GEN, REF, SAVED, mode="negative"))


@pytest.mark.parametrize(
    "kw",
    [
        dict(bleu_factor=0.4, cos_factor=0.5, len_factor=0.1),  # target = reference length
        dict(bleu_factor=0.4, cos_factor=0.5, len_factor=0.1, neg_reward_len=True),
        dict(bleu_factor=0.4, cos_factor=0.5, len_factor=0.1, target_len_as_ref=False, max_rewarded_len=4),
        dict(bleu_factor=0.4, cos_factor=0.5, len_factor=0.1, target_len_as_ref=False, max_rewarded_len=4,
             neg_reward_len=True),
    ],
)
def test_length_reward(kw):
    check(make(**kw)(GEN, REF, SAVED), oracle(MRLRewardArguments(**kw), GEN, REF, SAVED))


def test_length_reward_values():
    # LEN alone: len 3 vs target 6 -> 0.5; len 6 vs 3 -> 1 (or 0.5 with neg_reward_len); empty -> 0
    gen = torch.tensor([[1, 2, 3, 0, 0, 0], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0]])
    ref = torch.tensor([[4, 4, 4, 4, 4, 4], [4, 4, 4, 0, 0, 0], [4, 4, 0, 0, 0, 0]])
    kw = dict(bleu_factor=0.0, cos_factor=0.0, len_factor=1.0)
    check(make(**kw)(gen, ref, ref), np.array([0.5, 1.0, 0.0]))
    check(make(neg_reward_len=True, **kw)(gen, ref, ref), np.array([0.5, 0.5, 0.0]))
    check(make(target_len_as_ref=False, max_rewarded_len=4, **kw)(gen, ref, ref), np.array([0.75, 1.0, 0.0]))


def test_tanh_and_rewards_scale():
    for kw in (dict(tanh_reward_scale=True), dict(rewards_scale=10.0), dict(tanh_reward_scale=True, rewards_scale=3.0)):
        a = MRLRewardArguments(**kw)
        check(make(**kw)(GEN, REF, SAVED, mode="negative"), oracle(a, GEN, REF, SAVED, mode="negative"))
    base = make()(GEN, REF, SAVED)
    torch.testing.assert_close(make(tanh_reward_scale=True, rewards_scale=10.0)(GEN, REF, SAVED),
                               (2 * base - 1) * 10, atol=1e-5, rtol=0)


def test_bad_mode_and_shapes():
    r = make()
    with pytest.raises(ValueError, match="mode.*'positive'"):
        r(GEN, REF, SAVED, mode="positive")
    with pytest.raises(ValueError, match="saved"):
        r(GEN, REF, SAVED[:2])
    with pytest.raises(ValueError, match="running_mean"):
        r(GEN, REF, SAVED, running_mean=torch.zeros(4, 5))


# ---------------------------------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------------------------------
def test_embed_ignores_pads_and_all_pad_is_zero():
    r = make()
    ids = torch.tensor([[3, 5, 0, 0], [3, 5, 5, 0], [0, 0, 0, 0], [0, 3, 0, 5]])
    e = r.embed(ids)
    assert e.dtype == torch.float32 and e.shape == (4, 3)
    np.testing.assert_allclose(e[0].numpy(), np_emb([3, 5]), atol=1e-6)
    np.testing.assert_allclose(e[1].numpy(), np_emb([3, 5, 5]), atol=1e-6)
    assert torch.equal(e[2], torch.zeros(3))
    torch.testing.assert_close(e[3], e[0])  # pads anywhere are ignored
    np.testing.assert_allclose(e[[0, 1, 3]].norm(dim=-1).numpy(), 1.0, atol=1e-6)


def test_embed_nonzero_pad_and_nn_embedding_is_detached():
    module = nn.Embedding(10, 3)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(EMB))
    r = MRLReward(MRLRewardArguments(), module, pad_token_id=7)
    e = r.embed(torch.tensor([[3, 7, 7], [7, 7, 7]]))
    assert not e.requires_grad
    np.testing.assert_allclose(e[0].numpy(), np_emb([3]), atol=1e-6)
    assert torch.equal(e[1], torch.zeros(3))
    # follows the live weights (shared storage)
    with torch.no_grad():
        module.weight[3] = torch.tensor([0.0, 0.0, 2.0])
    np.testing.assert_allclose(r.embed(torch.tensor([[3]])).numpy(), [[0.0, 0.0, 1.0]], atol=1e-6)


def test_out_of_vocab_pad_id():
    r = MRLReward(MRLRewardArguments(), torch.from_numpy(EMB), pad_token_id=-100)
    gen, ref, saved = (x.masked_fill(x == PAD, -100) for x in (GEN, REF, SAVED))
    check(r(gen, ref, saved), oracle(MRLRewardArguments(), GEN, REF, SAVED))


def test_embed_low_precision_weights_compute_in_float32():
    r = MRLReward(MRLRewardArguments(), torch.from_numpy(EMB).to(torch.bfloat16), pad_token_id=PAD)
    e = r.embed(torch.tensor([[1, 2, 0]]))
    assert e.dtype == torch.float32
    expected = np_emb([1, 2], torch.from_numpy(EMB).to(torch.bfloat16).float().numpy())
    np.testing.assert_allclose(e[0].numpy(), expected, atol=1e-6)


def test_update_running_mean_formula():
    r = make(running_mean_decay=0.3)
    m0 = r.update_running_mean(None, PREV)
    torch.testing.assert_close(m0, r.embed(PREV))
    m1 = r.update_running_mean(m0, PREV2)
    torch.testing.assert_close(m1, 0.7 * r.embed(PREV2) + 0.3 * m0)
    np.testing.assert_allclose(m1.numpy(), np_running_mean([PREV, PREV2], 0.3), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, field_name",
    [
        (dict(bleu_factor=0.6), "bleu_factor"),
        (dict(len_factor=0.1), "len_factor"),
        (dict(bleu_saved_factor=0.4), "bleu_saved_factor"),
        (dict(bleu_first_ref_factor=0.7), "bleu_first_ref_factor"),
        (dict(cos_ref_factor=0.2), "cos_ref_factor"),
        (dict(running_mean_factor=0.3), "running_mean_factor"),
        (dict(neg_bleu_ref_factor=0.1), "neg_bleu_ref_factor"),
        (dict(neg_cos_saved_factor=0.2), "neg_cos_saved_factor"),
        (dict(cos_ref_factor=0.9, cos_saved_factor=0.1, neg_cos_ref_factor=0.5), "neg_cos_ref_factor"),
    ],
)
def test_factor_sums(kw, field_name):
    a = MRLRewardArguments(**kw)
    with pytest.raises(ValueError, match=field_name) as exc:
        a.validate_reward_arguments()
    assert "sum to 1" in str(exc.value)
    with pytest.raises(ValueError, match=field_name):
        MRLReward(a, torch.from_numpy(EMB), PAD)
    MRLRewardArguments(allow_not_summing_factors=True, **kw).validate_reward_arguments()
    make(allow_not_summing_factors=True, **kw)


def test_not_summing_factors_are_used_as_given():
    kw = dict(allow_not_summing_factors=True, bleu_factor=2.0, cos_factor=1.0, cos_ref_factor=0.7)
    check(make(**kw)(GEN, REF, SAVED), oracle(MRLRewardArguments(**kw), GEN, REF, SAVED))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(bleu_factor=1.5, cos_factor=-0.5), r"cos_factor.*>= 0.*-0\.5"),
        (dict(neg_cos_ref_factor=-0.1, neg_cos_saved_factor=1.1), r"neg_cos_ref_factor.*-0\.1"),
        (dict(running_mean_decay=1.2), r"running_mean_decay.*\[0, 1\].*1\.2"),
        (dict(running_mean_decay=-0.1), r"running_mean_decay.*-0\.1"),
        (dict(bleu_mode="mixed"), r"bleu_mode.*'separate'.*'combined'.*'mixed'"),
        (dict(max_rewarded_len=0), r"max_rewarded_len.*>= 1.*0"),
    ],
)
def test_invalid_values(kw, message):
    with pytest.raises(ValueError, match=message):
        MRLRewardArguments(allow_not_summing_factors=True, **kw).validate_reward_arguments()


def test_defaults_are_valid_and_match_the_doc():
    a = MRLRewardArguments()
    a.validate_reward_arguments()
    assert (a.bleu_factor, a.cos_factor, a.len_factor) == (0.5, 0.5, 0.0)
    assert (a.running_mean_ref_factor, a.running_mean_saved_factor, a.running_mean_factor) == (0.3, 0.5, 0.2)
    assert (a.running_mean_decay, a.rewards_scale, a.max_rewarded_len) == (0.2, 1.0, 256)
    assert a.bleu_mode == "separate" and a.neg_cos_ref_factor is None and a.target_len_as_ref
    assert not (a.bleu_with_saved_data or a.tanh_reward_scale or a.neg_reward_len or a.allow_not_summing_factors)
    for f in dataclasses.fields(MRLRewardArguments):
        assert f.metadata.get("help"), f.name


def test_hf_argument_parser():
    (a,) = HfArgumentParser(MRLRewardArguments).parse_args_into_dataclasses(
        ["--bleu_factor", "0.4", "--cos_factor", "0.6"]
    )
    assert (a.bleu_factor, a.cos_factor, a.neg_cos_ref_factor) == (0.4, 0.6, None)
    a.validate_reward_arguments()
    (b,) = HfArgumentParser(MRLRewardArguments).parse_args_into_dataclasses(
        ["--bleu_mode", "combined", "--neg_cos_ref_factor", "0.25", "--bleu_with_saved_data", "true"]
    )
    assert (b.bleu_mode, b.neg_cos_ref_factor, b.bleu_with_saved_data) == ("combined", 0.25, True)


# ---------------------------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------------------------
def random_ids(gen, batch, max_len, vocab=10):
    ids = torch.randint(1, vocab, (batch, max_len), generator=gen)
    lengths = torch.randint(0, max_len + 1, (batch,), generator=gen)
    lengths[0] = max_len
    return ids.masked_fill(torch.arange(max_len)[None, :] >= lengths[:, None], PAD)


@pytest.mark.parametrize("mode", ["standard", "long_range", "negative"])
@pytest.mark.parametrize("bleu_mode", ["separate", "combined"])
def test_batched_equals_per_row(mode, bleu_mode):
    g = torch.Generator().manual_seed(sum(map(ord, mode + bleu_mode)))
    gen, ref, saved, prev = (random_ids(g, 5, t) for t in (7, 6, 8, 5))
    kw = dict(bleu_with_saved_data=True, bleu_mode=bleu_mode, bleu_factor=0.4, cos_factor=0.5, len_factor=0.1,
              neg_reward_len=True)
    r = make(**kw)
    m = r.update_running_mean(None, prev)
    for first_step in (False, True):
        for running_mean in (None, m):
            batched = r(gen, ref, saved, mode=mode, running_mean=running_mean, first_step=first_step)
            rows = torch.cat([
                r(gen[i:i + 1], ref[i:i + 1], saved[i:i + 1], mode=mode,
                  running_mean=None if running_mean is None else running_mean[i:i + 1], first_step=first_step)
                for i in range(5)
            ])
            torch.testing.assert_close(batched, rows, atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        r(gen, ref, saved, mode=mode, running_mean=m).numpy(),
        oracle(MRLRewardArguments(**kw), gen, ref, saved, mode=mode, m=np_running_mean([prev], 0.2)),
        atol=TOL,
    )
