"""TensorBLEU (trainers/tensorbleu.py) against NLTK 3.10's sentence_bleu / corpus_bleu as the oracle."""

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu

from conftest import REPO_ROOT
from trainers.tensorbleu import (
    NLTK_SMOOTHING_METHOD,
    SMOOTHING_METHODS,
    tensor_corpus_bleu,
    tensor_sentence_bleu,
)

SMOOTHINGS = sorted(SMOOTHING_METHODS)  # none, floor, add-k, exp, chen-cherry-4
TOL = 1e-6


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def nltk_fn(smoothing, **params):
    return getattr(SmoothingFunction(**params), NLTK_SMOOTHING_METHOD[smoothing])


def strip(row, pad=0):
    return [t for t in row if t != pad]


def to_lists(cand, refs, pad=0):
    refs3 = refs.unsqueeze(1) if refs.dim() == 2 else refs
    hyps = [strip(r, pad) for r in cand.tolist()]
    lrefs = [[strip(x, pad) for x in rr] for rr in refs3.tolist()]
    return hyps, lrefs


def oracle_sentence(cand, refs, weights, smoothing, pad=0, **params):
    hyps, lrefs = to_lists(cand, refs, pad)
    fn = nltk_fn(smoothing, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = [sentence_bleu(r, h, weights, smoothing_function=fn) for h, r in zip(hyps, lrefs, strict=True)]
    return torch.tensor(scores, dtype=torch.float64)


def oracle_corpus(cand, refs, weights, smoothing, pad=0, **params):
    hyps, lrefs = to_lists(cand, refs, pad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return corpus_bleu(lrefs, hyps, weights, smoothing_function=nltk_fn(smoothing, **params))


def random_rows(g, n, width, vocab, min_len=0, lengths=None):
    """Right-padded rows of ids in [1, vocab]; a few forced very short lengths."""
    if lengths is None:
        lengths = torch.randint(min_len, width + 1, (n,), generator=g)
        forced = torch.tensor([0, 1, 2, 3, width])[: n]
        lengths[: forced.numel()] = forced.clamp(max=width, min=min_len)
    x = torch.randint(1, vocab + 1, (n, width), generator=g)
    x[torch.arange(width)[None, :] >= lengths[:, None]] = 0
    return x


def right_pad(x, pad=0):
    """Move pads to the end of each row (stable)."""
    return torch.gather(x, -1, torch.sort((x == pad).to(torch.int8), dim=-1, stable=True).indices)


def random_batch(seed, batch=48, n_refs=1, vocab=4, tc=14, tr=16):
    """Candidates + references with repetitive tokens (small vocab) and partly copied spans, so that high-order
    matches and clipping both occur."""
    g = torch.Generator().manual_seed(seed)
    cand = random_rows(g, batch, tc, vocab)
    refs = torch.stack([random_rows(g, batch, tr, vocab) for _ in range(n_refs)], 1)
    # copy a prefix of the candidate into some references (exact n-gram matches at every order)
    copy = torch.rand(batch, n_refs, generator=g) < 0.5
    span = min(tc, tr)
    refs[:, :, :span] = torch.where(copy[..., None] & (cand[:, None, :span] > 0), cand[:, None, :span],
                                    refs[:, :, :span])
    refs = right_pad(refs)  # copying may leave gaps where the reference was shorter
    return cand, (refs[:, 0] if n_refs == 1 else refs)


# ---------------------------------------------------------------------------------------------------------------
# agreement with NLTK
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_sentence_bleu_matches_nltk(smoothing, seed):
    for n_refs in (1, 3):
        for vocab in (3, 12):
            cand, refs = random_batch(seed * 100 + vocab + n_refs, batch=32, n_refs=n_refs, vocab=vocab)
            for max_n in (1, 2, 4):
                weights = tuple([1.0 / max_n] * max_n)
                ours = tensor_sentence_bleu(cand, refs, max_n=max_n, smoothing=smoothing, dtype=torch.float64)
                ref = oracle_sentence(cand, refs, weights, smoothing)
                assert ours.shape == (cand.shape[0],)
                err = (ours - ref).abs().max().item()
                assert err <= TOL, (smoothing, seed, n_refs, vocab, max_n, err)


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_unfold_backend_matches_nltk(smoothing):
    for n_refs in (1, 2):
        cand, refs = random_batch(7 + n_refs, batch=32, n_refs=n_refs, vocab=5)
        ours = tensor_sentence_bleu(cand, refs, smoothing=smoothing, backend="unfold", dtype=torch.float64)
        ref = oracle_sentence(cand, refs, (0.25,) * 4, smoothing)
        assert (ours - ref).abs().max().item() <= TOL
        rolling = tensor_sentence_bleu(cand, refs, smoothing=smoothing, dtype=torch.float64)
        assert torch.allclose(ours, rolling, atol=1e-12, rtol=0)


def test_longer_sequences_and_larger_vocab_match_nltk():
    g = torch.Generator().manual_seed(5)
    cand = random_rows(g, 32, 96, 40)
    refs = torch.stack([random_rows(g, 32, 80, 40) for _ in range(2)], 1)
    refs[:, 0, :40] = torch.where(cand[:, :40] > 0, cand[:, :40], refs[:, 0, :40])
    refs = right_pad(refs)
    for smoothing in SMOOTHINGS:
        ours = tensor_sentence_bleu(cand, refs, smoothing=smoothing, dtype=torch.float64)
        assert (ours - oracle_sentence(cand, refs, (0.25,) * 4, smoothing)).abs().max() <= TOL


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_corpus_bleu_matches_nltk(smoothing):
    for seed, n_refs in ((0, 1), (1, 3), (2, 2)):
        cand, refs = random_batch(seed, batch=32, n_refs=n_refs, vocab=6)
        for max_n in (2, 4):
            weights = tuple([1.0 / max_n] * max_n)
            for backend in ("rolling", "unfold"):
                ours = tensor_corpus_bleu(cand, refs, max_n=max_n, smoothing=smoothing, backend=backend,
                                          dtype=torch.float64)
                assert ours.dim() == 0
                assert abs(ours.item() - oracle_corpus(cand, refs, weights, smoothing)) <= TOL
    # a corpus where only the first sentence matches anything, and a corpus with no unigram match at all (-> 0)
    cand = torch.tensor([[1, 2, 3, 0], [9, 9, 0, 0]])
    refs = torch.tensor([[1, 2, 4, 0], [8, 0, 0, 0]])
    assert abs(tensor_corpus_bleu(cand, refs, smoothing=smoothing, dtype=torch.float64).item()
               - oracle_corpus(cand, refs, (0.25,) * 4, smoothing)) <= TOL
    assert tensor_corpus_bleu(cand[1:], refs[1:], smoothing=smoothing).item() == 0.0


def test_weights_and_smoothing_parameters_match_nltk():
    cand, refs = random_batch(11, batch=32, n_refs=2, vocab=4)
    weights = (0.1, 0.2, 0.3, 0.4)
    cases = [("none", {}), ("floor", {"epsilon": 0.3}), ("floor", {"epsilon": 0.0}), ("exp", {}),
             ("chen-cherry-4", {"k": 2}), ("chen-cherry-4", {"k": 7.5}), ("add-k", {})]
    for smoothing, params in cases:
        ours = tensor_sentence_bleu(cand, refs, weights=weights, smoothing=smoothing, dtype=torch.float64, **params)
        ref = oracle_sentence(cand, refs, weights, smoothing, **params)
        assert (ours - ref).abs().max().item() <= TOL, (smoothing, params)
    # BLEU-2 with method 4: the MRL reward's setting
    ours = tensor_sentence_bleu(cand, refs, max_n=2, weights=(0.5, 0.5), smoothing="chen-cherry-4",
                                dtype=torch.float64)
    assert (ours - oracle_sentence(cand, refs, (0.5, 0.5), "chen-cherry-4")).abs().max().item() <= TOL
    # add-k with k=1 is NLTK's method2; other k follow (num + k) / (den + k) for n >= 2
    base = tensor_sentence_bleu(cand, refs, smoothing="add-k", dtype=torch.float64)
    assert torch.equal(base, tensor_sentence_bleu(cand, refs, smoothing="add-k", k=1, dtype=torch.float64))
    c = torch.tensor([[1, 2, 3, 4, 5]])
    r = torch.tensor([[1, 2, 3, 9, 9]])
    got = tensor_sentence_bleu(c, r, smoothing="add-k", k=2, dtype=torch.float64).item()
    expected = math.exp(0.25 * (math.log(3 / 5) + math.log(4 / 6) + math.log(3 / 5) + math.log(2 / 4)))
    assert got == pytest.approx(expected, abs=1e-12)
    # NLTK method names are accepted as aliases
    assert torch.equal(tensor_sentence_bleu(cand, refs, smoothing="method3"),
                       tensor_sentence_bleu(cand, refs, smoothing="exp"))


# ---------------------------------------------------------------------------------------------------------------
# hand-built examples and edge cases
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_identical_is_one_and_disjoint_is_zero(smoothing):
    x = torch.tensor([[5, 6, 7, 8, 9, 5, 6], [3, 3, 3, 3, 0, 0, 0]])
    assert torch.allclose(tensor_sentence_bleu(x, x, smoothing=smoothing), torch.ones(2))
    assert tensor_corpus_bleu(x, x, smoothing=smoothing).item() == pytest.approx(1.0)
    y = torch.tensor([[1, 2, 1, 2, 1, 0, 0], [4, 4, 4, 4, 4, 4, 4]])
    out = tensor_sentence_bleu(x, y, smoothing=smoothing)
    assert torch.equal(out, torch.zeros(2))  # no unigram match -> exactly 0 whatever the smoothing (NLTK)


def test_method0_zero_higher_order_matches_like_nltk():
    # unigram matches but no 2-gram match: NLTK substitutes sys.float_info.min -> tiny but positive score
    cand = torch.tensor([[1, 2, 3, 4]])
    ref = torch.tensor([[4, 3, 2, 1]])
    ours = tensor_sentence_bleu(cand, ref, dtype=torch.float64).item()
    expected = oracle_sentence(cand, ref, (0.25,) * 4, "none").item()
    assert 0.0 < expected < 1e-50
    assert ours == pytest.approx(expected, rel=1e-12)


def test_nltk_docstring_example_on_ids():
    words = {}

    def ids(sentence):
        return [words.setdefault(w, len(words) + 1) for w in sentence.split()]

    hyp = ids("It is a guide to action which ensures that the military always obeys the commands of the party")
    refs = [ids("It is a guide to action that ensures that the military will forever heed Party commands"),
            ids("It is the guiding principle which guarantees the military forces always being under the command "
                "of the Party"),
            ids("It is the practical guide for the army always to heed the directions of the party")]
    width = max(map(len, refs))
    r = torch.tensor([[x + [0] * (width - len(x)) for x in refs]])
    out = tensor_sentence_bleu(torch.tensor([hyp]), r, dtype=torch.float64).item()
    assert out == pytest.approx(sentence_bleu(refs, hyp), abs=1e-12)
    assert out == pytest.approx(0.5045, abs=1e-4)


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_edge_cases_match_nltk(smoothing):
    # (candidate, [references]) as id lists, padded into tensors below
    cases = [
        ([], [[1, 2, 3]]),                  # empty candidate
        ([1], [[1, 2, 3]]),                 # hyp_len 1 (method4 leaves zeros unsmoothed)
        ([1], [[1]]),
        ([1, 1], [[1]]),                    # clipping with a one-token reference
        ([2, 1], [[1, 2]]),
        ([1, 2, 3], [[1, 2, 3]]),           # shorter than max_n
        ([7, 7, 7, 7, 7, 7, 7], [[7, 7], [7, 7, 7]]),  # clipping by the max over references
        ([1, 2, 3, 4, 5], [[]]),            # empty reference
        ([1, 2, 3, 4, 5], [[], [1, 2, 3]]),  # empty reference among others
        ([1, 2, 3, 4], [[1, 2, 3, 4, 5], [1, 2, 3]]),  # length tie -> shorter reference
        ([1, 2, 3, 4, 5, 6], [[1, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]),
        ([3, 1, 2, 3, 1, 2, 3, 1], [[1, 2, 3, 1, 2], [2, 3, 1]]),
    ]
    width_c = max(len(c) for c, _ in cases) + 2
    n_refs = max(len(r) for _, r in cases)
    width_r = max(len(x) for _, r in cases for x in r) + 1
    cand = torch.zeros(len(cases), width_c, dtype=torch.long)
    refs = torch.zeros(len(cases), n_refs, width_r, dtype=torch.long)
    for i, (c, rs) in enumerate(cases):
        cand[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        for j in range(n_refs):
            rr = rs[j] if j < len(rs) else rs[-1]  # repeat the last reference to fill R (does not change NLTK)
            refs[i, j, : len(rr)] = torch.tensor(rr, dtype=torch.long)
    for max_n in (1, 2, 4):
        weights = tuple([1.0 / max_n] * max_n)
        fn = nltk_fn(smoothing)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = torch.tensor([sentence_bleu(rs, c, weights, smoothing_function=fn) for c, rs in cases],
                                    dtype=torch.float64)
            expected_corpus = corpus_bleu([rs for _, rs in cases], [c for c, _ in cases], weights,
                                          smoothing_function=fn)
        for backend in ("rolling", "unfold"):
            ours = tensor_sentence_bleu(cand, refs, max_n=max_n, smoothing=smoothing, backend=backend,
                                        dtype=torch.float64)
            assert (ours - expected).abs().max().item() <= TOL, (max_n, backend, ours, expected)
            corpus = tensor_corpus_bleu(cand, refs, max_n=max_n, smoothing=smoothing, backend=backend,
                                        dtype=torch.float64)
            assert abs(corpus.item() - expected_corpus) <= TOL


def test_candidates_shorter_than_max_n_and_degenerate_shapes():
    cand = torch.tensor([[1, 2], [3, 0]])
    refs = torch.tensor([[1, 2, 3, 4], [3, 4, 0, 0]])
    for smoothing in SMOOTHINGS:
        ours = tensor_sentence_bleu(cand, refs, smoothing=smoothing, dtype=torch.float64)
        assert (ours - oracle_sentence(cand, refs, (0.25,) * 4, smoothing)).abs().max() <= TOL
    # zero-width candidates, one-column references, empty batch
    assert torch.equal(tensor_sentence_bleu(torch.zeros(3, 0, dtype=torch.long), torch.ones(3, 2, dtype=torch.long)),
                       torch.zeros(3))
    one = tensor_sentence_bleu(torch.tensor([[4, 4, 4]]), torch.tensor([[4]]), smoothing="floor",
                               dtype=torch.float64)
    assert one.item() == pytest.approx(oracle_sentence(torch.tensor([[4, 4, 4]]), torch.tensor([[4]]),
                                                       (0.25,) * 4, "floor").item(), abs=TOL)
    empty = tensor_sentence_bleu(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 2, 5, dtype=torch.long))
    assert empty.shape == (0,)
    assert tensor_corpus_bleu(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 5, dtype=torch.long)).item() == 0


# ---------------------------------------------------------------------------------------------------------------
# padding, dtypes, devices
# ---------------------------------------------------------------------------------------------------------------
def test_padding_invariance():
    cand, refs = random_batch(3, batch=32, n_refs=2, vocab=5)
    for smoothing in SMOOTHINGS:
        base = tensor_sentence_bleu(cand, refs, smoothing=smoothing, dtype=torch.float64)
        more = tensor_sentence_bleu(torch.nn.functional.pad(cand, (0, 9)), torch.nn.functional.pad(refs, (0, 4)),
                                    smoothing=smoothing, dtype=torch.float64)
        assert torch.equal(base, more)
        # left padding / pads in the middle are removed like right padding
        left = torch.nn.functional.pad(cand, (3, 0))
        assert torch.equal(base, tensor_sentence_bleu(left, refs, smoothing=smoothing, dtype=torch.float64))
        mid = torch.cat([cand[:, :2], torch.zeros(cand.shape[0], 2, dtype=torch.long), cand[:, 2:]], 1)
        assert torch.equal(base, tensor_sentence_bleu(mid, refs, smoothing=smoothing, dtype=torch.float64))
        corpus = tensor_corpus_bleu(cand, refs, smoothing=smoothing, dtype=torch.float64)
        assert torch.equal(corpus, tensor_corpus_bleu(torch.nn.functional.pad(cand, (0, 5)), refs,
                                                      smoothing=smoothing, dtype=torch.float64))
    # a different pad id: 0 becomes an ordinary token
    shifted_c, shifted_r = cand - 1, refs - 1  # ids 0..4, pad -1
    for smoothing in ("none", "chen-cherry-4"):
        a = tensor_sentence_bleu(cand, refs, smoothing=smoothing, dtype=torch.float64)
        b = tensor_sentence_bleu(shifted_c, shifted_r, smoothing=smoothing, pad_token_id=-1, dtype=torch.float64)
        assert torch.equal(a, b)


def test_ignore_empty_references():
    cand = torch.tensor([[1, 2, 3, 4, 5, 6]])
    refs = torch.tensor([[[1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 0, 0, 0]]])
    # NLTK semantics: the empty reference (length 0) is closest to... not 6 here, but it still counts as a reference
    with_empty = tensor_sentence_bleu(cand, refs, dtype=torch.float64)
    assert with_empty.item() == pytest.approx(
        oracle_sentence(cand, refs, (0.25,) * 4, "none").item(), abs=1e-12)
    # a short candidate is closer to the empty reference: BP = 1 under NLTK semantics, penalised when ignored
    short = torch.tensor([[1, 2, 0, 0, 0, 0]])
    nltk_like = tensor_sentence_bleu(short, refs, max_n=1, dtype=torch.float64).item()
    ignored = tensor_sentence_bleu(short, refs, max_n=1, ignore_empty_references=True, dtype=torch.float64).item()
    assert nltk_like == pytest.approx(1.0)
    assert ignored == pytest.approx(math.exp(1 - 8 / 2))
    assert ignored == pytest.approx(sentence_bleu([[1, 2, 3, 4, 5, 6, 7, 8]], [1, 2], (1.0,)))
    # all references empty: nothing to ignore -> NLTK semantics (and no unigram match -> 0)
    assert tensor_sentence_bleu(short, torch.zeros(1, 2, 3, dtype=torch.long),
                                ignore_empty_references=True).item() == 0.0


def test_dtypes_and_large_or_negative_ids():
    cand, refs = random_batch(4, batch=32, n_refs=2, vocab=6)
    base = tensor_sentence_bleu(cand, refs, smoothing="floor")
    assert base.dtype == torch.float32 and base.device == cand.device
    f64 = tensor_sentence_bleu(cand, refs, smoothing="floor", dtype=torch.float64)
    assert f64.dtype == torch.float64
    assert torch.allclose(base.double(), f64, atol=1e-6, rtol=0)
    for dt in (torch.int32, torch.int16, torch.uint8):
        assert torch.equal(tensor_sentence_bleu(cand.to(dt), refs.to(dt), smoothing="floor"), base)
    # huge and negative ids (the key packing compresses the id range first); pad stays 0
    remap = lambda x: torch.where(x > 0, x * (1 << 59) - (1 << 61) + 1, 0)  # noqa: E731  (ids 1..6, span ~2^61)
    assert torch.equal(tensor_sentence_bleu(remap(cand), remap(refs), smoothing="floor"), base)
    assert torch.equal(tensor_sentence_bleu(remap(cand), remap(refs), smoothing="floor", backend="unfold"), base)


def test_warn_zero_matches_is_opt_in():
    cand = torch.tensor([[1, 2, 3, 4]])
    ref = torch.tensor([[4, 3, 2, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor_sentence_bleu(cand, ref)  # silent by default
    with pytest.warns(UserWarning, match="0 counts"):
        tensor_sentence_bleu(cand, ref, warn_zero_matches=True)


# ---------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------
C = torch.ones(2, 5, dtype=torch.long)
R = torch.ones(2, 6, dtype=torch.long)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(candidates=torch.ones(5, dtype=torch.long), references=R), r"candidates must be 2-D \[B, Tc\], got 1-D"),
        (dict(candidates=C, references=torch.ones(2, 1, 1, 6, dtype=torch.long)),
         r"references must be 2-D \[B, Tr\] or 3-D \[B, R, Tr\], got 4-D"),
        (dict(candidates=C.float(), references=R), r"candidates must have an integer dtype.*torch.float32"),
        (dict(candidates=C, references=R.bool()), r"references must have an integer dtype.*torch.bool"),
        (dict(candidates=C, references=torch.ones(3, 6, dtype=torch.long)),
         r"batch size mismatch: references has batch size 3, expected 2"),
        (dict(candidates=C, references=torch.ones(2, 0, 6, dtype=torch.long)), r"expected R >= 1"),
        (dict(candidates=[[1, 2]], references=R), r"candidates must be a torch.Tensor"),
        (dict(candidates=C, references=R, smoothing="method7"), r"unknown smoothing 'method7'; expected one of"),
        (dict(candidates=C, references=R, weights=(0.5, 0.5)), r"weights has 2 entries, expected max_n = 4"),
        (dict(candidates=C, references=R, max_n=0), r"max_n must be an integer >= 1, got 0"),
        (dict(candidates=C, references=R, weights=(0.5, float("nan")), max_n=2), r"weights must be finite"),
        (dict(candidates=C, references=R, smoothing="floor", k=3), r"'floor' accepts \('epsilon',\).*'k'"),
        (dict(candidates=C, references=R, smoothing="none", epsilon=0.1), r"'none' accepts no parameters"),
        (dict(candidates=C, references=R, smoothing="chen-cherry-4", k=0), r"must be > 0"),
        (dict(candidates=C, references=R, backend="fast"), r"unknown backend 'fast'"),
        (dict(candidates=C, references=R, pad_token_id=0.5), r"pad_token_id must be an int"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tensor_sentence_bleu(**kwargs)
    with pytest.raises(ValueError, match=match):
        tensor_corpus_bleu(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# benchmark script (schema only, no timing assertions)
# ---------------------------------------------------------------------------------------------------------------
def test_bench_script_quick(tmp_path):
    out = tmp_path / "bench" / "tensorbleu.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "bench_tensorbleu.py"), "--quick", "--output", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert set(data) >= {"machine", "config", "results", "summary"}
    for key in ("cpu_model", "cpu_count", "torch_version", "torch_threads", "nltk_version"):
        assert key in data["machine"]
    for key in ("batch", "length", "repeats", "threads", "max_n", "smoothing", "batch_sizes"):
        assert key in data["config"]
    assert len(data["results"]) >= 2
    for row in data["results"]:
        for impl in ("tensorbleu", "nltk"):
            for stat in ("median_ms", "min_ms", "max_ms", "iqr_ms"):
                assert math.isfinite(row[impl][stat]) and row[impl][stat] >= 0
        assert math.isfinite(row["speedup"]) and row["speedup"] > 0
        assert row["max_abs_diff_vs_nltk"] <= TOL
    summary = data["summary"]
    assert math.isfinite(summary["tensorbleu_speedup_vs_nltk"]) and summary["tensorbleu_speedup_vs_nltk"] > 0
    assert isinstance(summary["meets_target"], bool)
    assert out.with_suffix(".png").stat().st_size > 0
