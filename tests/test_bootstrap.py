"""Paired bootstrap (trainers/bootstrap.py) on hand-built examples with known intervals and against an independent
per-resample computation."""

import math
import random

import numpy as np
import pytest
import torch

from trainers.bootstrap import paired_bootstrap


def test_constant_differences_give_a_zero_width_interval_at_that_value():
    before = [0.1, 0.5, 0.0, 1.0, 0.25]
    after = [b + 0.05 for b in before]
    mean, low, high = paired_bootstrap(before, after, n_resamples=500, seed=3)
    assert mean == pytest.approx(0.05, abs=1e-12)
    assert low == pytest.approx(0.05, abs=1e-12) and high == pytest.approx(0.05, abs=1e-12)


def test_two_items_differing_by_0_and_1_give_the_interval_0_to_1():
    """Resample means of two draws from {0, 1} are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5 % and 97.5 %
    quantiles are 0 and 1."""
    assert paired_bootstrap([0.0, 0.0], [0.0, 1.0], n_resamples=4000, seed=0) == (0.5, 0.0, 1.0)


def test_a_single_item_gives_its_difference():
    assert paired_bootstrap([0.25], [1.0], n_resamples=10) == (0.75, 0.75, 0.75)


def test_equals_an_independent_per_resample_computation():
    """The documented scheme, computed one resample at a time with numpy: the same indices, means, quantiles."""
    rng = random.Random(0)
    before = [float(rng.random() < 0.4) for _ in range(37)]
    after = [float(rng.random() < 0.6) for _ in range(37)]
    index = torch.randint(37, (300, 37), generator=torch.Generator().manual_seed(11)).numpy()
    diffs = np.array(after) - np.array(before)
    means = np.array([sum(diffs[i] for i in row) / 37 for row in index])
    expected = (diffs.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5))
    assert paired_bootstrap(before, after, n_resamples=300, seed=11) == pytest.approx(expected, abs=1e-12)


def test_interval_matches_the_normal_approximation_on_a_large_sample():
    gen = torch.Generator().manual_seed(0)
    before = torch.rand(2000, generator=gen)
    after = before + 0.1 + 0.5 * torch.randn(2000, generator=gen)
    mean, low, high = paired_bootstrap(before, after, n_resamples=4000, seed=1)
    half = 1.96 * (after - before).std().item() / math.sqrt(2000)
    assert low == pytest.approx(mean - half, abs=0.1 * half) and high == pytest.approx(mean + half, abs=0.1 * half)
    assert low < mean < high


@pytest.mark.parametrize("before, after, kwargs, message", [
    ([1.0, 2.0], [1.0], {}, r"paired: got shapes \(2,\) and \(1,\)"),
    ([], [], {}, "at least one paired item"),
    ([1.0, float("nan")], [1.0, 2.0], {}, "must be finite"),
    ([1.0], [2.0], {"n_resamples": 0}, "n_resamples must be an integer >= 1, got 0"),
    ([1.0], [2.0], {"confidence": 1.5}, r"confidence must be a float in \(0, 1\), got 1.5"),
])  # fmt: skip
def test_bad_input_names_the_problem(before, after, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(before, after, **kwargs)
