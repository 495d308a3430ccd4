"""Paired bootstrap of a mean difference (before/after evaluations of the same items, e.g. dialogues).

``paired_bootstrap(before, after, n_resamples, seed)`` resamples the per-item differences ``d_i = after_i - before_i``
with replacement ``n_resamples`` times (indices ``torch.randint(n, (n_resamples, n), generator=Generator().manual_seed(
seed))``), takes each resample's mean and returns ``(mean(d), low, high)``: the observed mean difference and the
percentile interval of the resampled means (``torch.quantile``, linear interpolation, at ``(1 - confidence) / 2`` and
``(1 + confidence) / 2``). Pairing removes the between-item variance that two independent intervals would carry: the
same dialogues are hard or easy before and after.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["paired_bootstrap"]


def paired_bootstrap(
    before: Sequence[float] | torch.Tensor,
    after: Sequence[float] | torch.Tensor,
    n_resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """``(mean difference, low, high)`` of ``after - before`` over paired per-item values (module docstring)."""
    before = torch.as_tensor(before, dtype=torch.float64)
    after = torch.as_tensor(after, dtype=torch.float64)
    if before.dim() != 1 or before.shape != after.shape:
        raise ValueError(
            f"before and after must be 1-D with one value per item, paired: got shapes {tuple(before.shape)} and "
            f"{tuple(after.shape)}"
        )
    if before.numel() == 0:
        raise ValueError("paired_bootstrap needs at least one paired item, got 0")
    if not (torch.isfinite(before).all() and torch.isfinite(after).all()):
        raise ValueError("before and after must be finite (drop the items without a value from both first)")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be an integer >= 1, got {n_resamples!r}")
    if not (isinstance(confidence, float) and 0.0 < confidence < 1.0 and math.isfinite(confidence)):
        raise ValueError(f"confidence must be a float in (0, 1), got {confidence!r}")
    diff = after - before  # [n]
    n = diff.numel()
    index = torch.randint(n, (n_resamples, n), generator=torch.Generator().manual_seed(seed))  # [R, n]
    means = diff[index].mean(1)  # [R]
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return diff.mean().item(), low, high
