"""MRL reward: BLEU-2 + embedding cosine (+ length) per generated answer (docs/training.md, section 6.3).

Per sample: ``gen`` (generated answer), ``ref`` (this turn's reference answer), ``saved`` (the saved interaction:
the previous one, or the first one at the LONG_RANGE step) and an optional running mean ``m`` of past embeddings.

* ``emb(x)`` = mean of the **shared token-embedding** rows over the non-pad tokens of ``x``, L2-normalised (an
  all-pad row gives the zero vector); ``cos+(a, b) = max(0, cos(a, b))`` (0 when either vector is zero).
* Running mean: ``m`` starts as ``emb(prev)``, then ``m <- (1 - d) * emb(prev) + d * m``, ``d = running_mean_decay``.
* ``BLEU`` = TensorBLEU (section 6.4) on token ids, BLEU-2: weights ``(0.5, 0.5)``, smoothing ``"chen-cherry-4"``
  (NLTK ``SmoothingFunction().method4``), always applied.

==========  ==============================================================  ===========================================
mode        BLEU                                                            COS
==========  ==============================================================  ===========================================
standard    ``BLEU(gen,ref)``; with ``bleu_with_saved_data``:                no ``m``: ``c_saved*cos+(gen,saved) +
            ``b_ref*BLEU(gen,ref) + b_saved*BLEU(gen,saved)``                c_ref*cos+(gen,ref)``; with ``m``:
            (``first_step``: ``bleu_first_*`` factors); ``bleu_mode=        ``m_saved*cos+(gen,saved) +
            "combined"``: one multi-reference ``BLEU(gen,[ref,saved])``      m_ref*cos+(gen,ref) + m_run*cos+(gen,m)``
long_range  as standard                                                     as standard, running-mean term
                                                                            ``m_run*(1 - cos+(gen,m))``
negative    ``nb_ref*BLEU(gen,ref) + nb_saved*(1 - BLEU(gen,saved))``       ``nc_saved*(1 - cos+(gen,saved)) +
                                                                            nc_ref*cos+(gen,ref)`` (``m`` unused)
==========  ==============================================================  ===========================================

``LEN`` (only when ``len_factor > 0``): ``len`` = non-pad length of ``gen``, ``target`` = non-pad length of ``ref``
(``target_len_as_ref``) or ``max_rewarded_len``; ``LEN = len/target`` if ``len < target`` else ``1`` (``target/len``
with ``neg_reward_len``); ``len == 0`` gives ``0``.

``r = bleu_factor*BLEU + cos_factor*COS + len_factor*LEN`` -> ``2r - 1`` if ``tanh_reward_scale`` ->
``* rewards_scale``. Everything is batched tensor ops on the inputs' device; rewards are float32 ``[B]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tensorbleu import tensor_sentence_bleu

__all__ = ["BLEU_MODES", "REWARD_MODES", "MRLReward", "MRLRewardArguments"]

REWARD_MODES = ("standard", "long_range", "negative")
BLEU_MODES = ("separate", "combined")
_BLEU_KWARGS = {"max_n": 2, "weights": (0.5, 0.5), "smoothing": "chen-cherry-4"}
_SUM_TOLERANCE = 1e-6


@dataclass
class MRLRewardArguments:
    """Reward factors of MRL (docs/training.md §6.3). A field mixin: no ``__post_init__``; call
    ``validate_reward_arguments()`` (``MRLReward`` does it at construction)."""

    bleu_factor: float = field(default=0.5, metadata={"help": "Weight of the BLEU term in the reward."})
    cos_factor: float = field(default=0.5, metadata={"help": "Weight of the cosine term in the reward."})
    len_factor: float = field(default=0.0, metadata={"help": "Weight of the length term (0 = length reward off)."})
    bleu_ref_factor: float = field(
        default=0.5, metadata={"help": "BLEU(gen, ref) weight when `bleu_with_saved_data` (separate mode)."}
    )
    bleu_saved_factor: float = field(
        default=0.5, metadata={"help": "BLEU(gen, saved) weight when `bleu_with_saved_data` (separate mode)."}
    )
    bleu_with_saved_data: bool = field(
        default=False, metadata={"help": "Also score BLEU against the saved interaction (standard/long_range)."}
    )
    bleu_first_ref_factor: float = field(
        default=0.5, metadata={"help": "`bleu_ref_factor` used at the first follow-up step."}
    )
    bleu_first_saved_factor: float = field(
        default=0.5, metadata={"help": "`bleu_saved_factor` used at the first follow-up step."}
    )
    bleu_mode: str = field(
        default="separate",
        metadata={
            "help": "With `bleu_with_saved_data`: 'separate' (weighted sum of two BLEUs) or 'combined' (one "
            "multi-reference BLEU against [ref, saved]).",
            "choices": list(BLEU_MODES),
        },
    )
    cos_ref_factor: float = field(default=0.5, metadata={"help": "cos+(gen, ref) weight (no running mean)."})
    cos_saved_factor: float = field(default=0.5, metadata={"help": "cos+(gen, saved) weight (no running mean)."})
    running_mean_ref_factor: float = field(
        default=0.3, metadata={"help": "cos+(gen, ref) weight when a running mean is given."}
    )
    running_mean_saved_factor: float = field(
        default=0.5, metadata={"help": "cos+(gen, saved) weight when a running mean is given."}
    )
    running_mean_factor: float = field(
        default=0.2, metadata={"help": "Running-mean term weight (cos+(gen, m); long_range: 1 - cos+(gen, m))."}
    )
    running_mean_decay: float = field(
        default=0.2, metadata={"help": "d in m <- (1 - d) * emb(prev) + d * m (weight of the old mean), in [0, 1]."}
    )
    neg_bleu_ref_factor: float = field(default=0.5, metadata={"help": "Negative mode: BLEU(gen, ref) weight."})
    neg_bleu_saved_factor: float = field(
        default=0.5, metadata={"help": "Negative mode: (1 - BLEU(gen, saved)) weight."}
    )
    neg_cos_ref_factor: float | None = field(
        default=None, metadata={"help": "Negative mode: cos+(gen, ref) weight (None = `cos_ref_factor`)."}
    )
    neg_cos_saved_factor: float | None = field(
        default=None, metadata={"help": "Negative mode: (1 - cos+(gen, saved)) weight (None = `cos_saved_factor`)."}
    )
    rewards_scale: float = field(default=1.0, metadata={"help": "Final multiplier of the reward (e.g. 10)."})
    tanh_reward_scale: bool = field(default=False, metadata={"help": "Map the reward r in [0, 1] to 2r - 1."})
    target_len_as_ref: bool = field(
        default=True, metadata={"help": "Length target = reference length (else `max_rewarded_len`)."}
    )
    max_rewarded_len: int = field(
        default=256, metadata={"help": "Length target when `target_len_as_ref` is False."}
    )
    neg_reward_len: bool = field(
        default=False, metadata={"help": "Penalise answers longer than the target: LEN = target/len."}
    )
    allow_not_summing_factors: bool = field(
        default=False, metadata={"help": "Skip the check that each factor group sums to 1."}
    )

    def resolved_neg_cos_factors(self) -> tuple[float, float]:
        """``(neg_cos_ref_factor, neg_cos_saved_factor)`` with ``None`` replaced by the positive cos factors."""
        ref = self.cos_ref_factor if self.neg_cos_ref_factor is None else self.neg_cos_ref_factor
        saved = self.cos_saved_factor if self.neg_cos_saved_factor is None else self.neg_cos_saved_factor
        return ref, saved

    def validate_reward_arguments(self) -> None:
        """Raise ``ValueError`` naming the offending field(s), the value and what was expected."""
        neg_cos_ref, neg_cos_saved = self.resolved_neg_cos_factors()
        factors = {
            "bleu_factor": self.bleu_factor,
            "cos_factor": self.cos_factor,
            "len_factor": self.len_factor,
            "bleu_ref_factor": self.bleu_ref_factor,
            "bleu_saved_factor": self.bleu_saved_factor,
            "bleu_first_ref_factor": self.bleu_first_ref_factor,
            "bleu_first_saved_factor": self.bleu_first_saved_factor,
            "cos_ref_factor": self.cos_ref_factor,
            "cos_saved_factor": self.cos_saved_factor,
            "running_mean_ref_factor": self.running_mean_ref_factor,
            "running_mean_saved_factor": self.running_mean_saved_factor,
            "running_mean_factor": self.running_mean_factor,
            "neg_bleu_ref_factor": self.neg_bleu_ref_factor,
            "neg_bleu_saved_factor": self.neg_bleu_saved_factor,
            "neg_cos_ref_factor": neg_cos_ref,
            "neg_cos_saved_factor": neg_cos_saved,
        }
        for name, value in factors.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        decay = self.running_mean_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"running_mean_decay must be in [0, 1], got {decay!r}")
        if self.bleu_mode not in BLEU_MODES:
            raise ValueError(f"bleu_mode must be one of {BLEU_MODES}, got {self.bleu_mode!r}")
        scale = self.rewards_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"rewards_scale must be a finite number, got {scale!r}")
        mrl = self.max_rewarded_len
        if isinstance(mrl, bool) or not isinstance(mrl, int) or mrl < 1:
            raise ValueError(f"max_rewarded_len must be an integer >= 1, got {mrl!r}")
        if self.allow_not_summing_factors:
            return
        groups = (
            ("bleu_factor", "cos_factor", "len_factor"),
            ("bleu_ref_factor", "bleu_saved_factor"),
            ("bleu_first_ref_factor", "bleu_first_saved_factor"),
            ("cos_ref_factor", "cos_saved_factor"),
            ("running_mean_ref_factor", "running_mean_saved_factor", "running_mean_factor"),
            ("neg_bleu_ref_factor", "neg_bleu_saved_factor"),
            ("neg_cos_ref_factor", "neg_cos_saved_factor"),
        )
        for group in groups:
            total = sum(factors[name] for name in group)
            if abs(total - 1.0) > _SUM_TOLERANCE:
                values = ", ".join(f"{name}={factors[name]!r}" for name in group)
                raise ValueError(
                    f"{' + '.join(group)} must sum to 1, got {total!r} ({values}); "
                    "set allow_not_summing_factors=True to allow it"
                )


class MRLReward:
    """Batched MRL reward (§6.3): ``reward(generated, reference, saved, mode=...)`` -> float32 ``[B]``.

    Args:
        args: the reward factors (validated here).
        embedding: the shared token embedding, ``[V, D]`` tensor (kept detached, storage shared with the live
            weights) or ``nn.Embedding`` (its weight read at each call, so the reward follows the embedding as it
            trains, also when FSDP2 swaps the parameter for a shard and, inside a forward, for the gathered tensor).
        pad_token_id: padding id of all id tensors (right-padded; pads anywhere are ignored).
    """

    def __init__(self, args: MRLRewardArguments, embedding: Tensor | nn.Embedding, pad_token_id: int):
        args.validate_reward_arguments()
        weight = embedding.weight if isinstance(embedding, nn.Embedding) else embedding
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(
                "embedding must be an nn.Embedding or a floating [V, D] tensor, got "
                f"{type(weight).__name__} of shape {tuple(getattr(weight, 'shape', ()))}"
            )
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
        self.args = args
        self._embedding = embedding if isinstance(embedding, nn.Embedding) else None
        self._weight = weight.detach()
        self.pad_token_id = pad_token_id

    @property
    def weight(self) -> Tensor:
        """The embedding matrix ``[V, D]``, detached."""
        return self._weight if self._embedding is None else self._embedding.weight.detach()

    # -- embeddings -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, ids: Tensor) -> Tensor:
        """``ids [B, T]`` -> float32 ``[B, D]``: mean of non-pad embedding rows, L2-normalised (all-pad -> 0)."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be 2-D [B, T], got shape {tuple(ids.shape)}")
        mask = ids != self.pad_token_id
        rows = F.embedding(ids.masked_fill(~mask, 0).long(), self.weight.to(ids.device)).float()  # [B, T, D]
        summed = (rows * mask.unsqueeze(-1)).sum(1)
        mean = summed / mask.sum(1, keepdim=True).clamp_min(1)
        return F.normalize(mean, dim=-1)

    @torch.no_grad()
    def update_running_mean(self, running_mean: Tensor | None, previous_ids: Tensor) -> Tensor:
        """``m = emb(prev)`` if ``running_mean`` is None, else ``(1 - d)·emb(prev) + d·m``; float32 ``[B, D]``."""
        new = self.embed(previous_ids)
        if running_mean is None:
            return new
        if running_mean.shape != new.shape:
            raise ValueError(f"running_mean has shape {tuple(running_mean.shape)}, expected {tuple(new.shape)}")
        d = self.args.running_mean_decay
        return (1.0 - d) * new + d * running_mean.to(device=new.device, dtype=torch.float32)

    @staticmethod
    def _cos_pos(a: Tensor, b: Tensor) -> Tensor:
        """``max(0, cos(a, b))`` row-wise for ``[B, D]`` inputs; 0 where either row is zero."""
        return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).clamp_min(0.0)

    # -- BLEU -----------------------------------------------------------------------------------------------------
    def _pad_to(self, x: Tensor, length: int) -> Tensor:
        return F.pad(x, (0, length - x.shape[1]), value=self.pad_token_id)

    def _bleu_pair(self, gen: Tensor, ref: Tensor, saved: Tensor) -> tuple[Tensor, Tensor]:
        """``(BLEU(gen, ref), BLEU(gen, saved))``, each ``[B]``, from one TensorBLEU call on ``2B`` rows."""
        length = max(ref.shape[1], saved.shape[1])
        refs = torch.cat([self._pad_to(ref, length), self._pad_to(saved, length)])
        bleu = tensor_sentence_bleu(torch.cat([gen, gen]), refs, pad_token_id=self.pad_token_id, **_BLEU_KWARGS)
        return bleu.chunk(2)

    def _bleu_combined(self, gen: Tensor, ref: Tensor, saved: Tensor) -> Tensor:
        """Multi-reference ``BLEU(gen, [ref, saved])`` ``[B]`` (an empty ``saved`` is left out of the BP rule)."""
        length = max(ref.shape[1], saved.shape[1])
        refs = torch.stack([self._pad_to(ref, length), self._pad_to(saved, length)], dim=1)  # [B, 2, T]
        return tensor_sentence_bleu(
            gen, refs, pad_token_id=self.pad_token_id, ignore_empty_references=True, **_BLEU_KWARGS
        )

    # -- reward ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        generated: Tensor,
        reference: Tensor,
        saved: Tensor,
        mode: str = "standard",
        running_mean: Tensor | None = None,
        first_step: bool = False,
    ) -> Tensor:
        """Rewards float32 ``[B]`` for ``generated [B, Tg]`` vs ``reference [B, Tr]`` and ``saved [B, Ts]``.

        ``mode``: ``"standard"``, ``"long_range"`` or ``"negative"``; ``running_mean [B, D]`` enables the
        running-mean cosine term (standard/long_range); ``first_step`` selects the ``bleu_first_*`` factors.
        """
        if mode not in REWARD_MODES:
            raise ValueError(f"mode must be one of {REWARD_MODES}, got {mode!r}")
        for name, x in (("generated", generated), ("reference", reference), ("saved", saved)):
            if x.dim() != 2:
                raise ValueError(f"{name} must be 2-D [B, T] token ids, got shape {tuple(x.shape)}")
            if x.shape[0] != generated.shape[0]:
                raise ValueError(f"{name} has batch size {x.shape[0]}, expected {generated.shape[0]}")
        a = self.args
        device = generated.device
        reference, saved = reference.to(device), saved.to(device)

        # BLEU
        if mode == "negative":
            bleu_ref, bleu_saved = self._bleu_pair(generated, reference, saved)
            bleu = a.neg_bleu_ref_factor * bleu_ref + a.neg_bleu_saved_factor * (1.0 - bleu_saved)
        elif not a.bleu_with_saved_data:
            bleu = tensor_sentence_bleu(generated, reference, pad_token_id=self.pad_token_id, **_BLEU_KWARGS)
        elif a.bleu_mode == "combined":
            bleu = self._bleu_combined(generated, reference, saved)
        else:
            bleu_ref, bleu_saved = self._bleu_pair(generated, reference, saved)
            f_ref, f_saved = (
                (a.bleu_first_ref_factor, a.bleu_first_saved_factor)
                if first_step
                else (a.bleu_ref_factor, a.bleu_saved_factor)
            )
            bleu = f_ref * bleu_ref + f_saved * bleu_saved

        # COS
        emb = self.embed(torch.cat([self._pad_to(x, max(generated.shape[1], reference.shape[1], saved.shape[1]))
                                    for x in (generated, reference, saved)]))
        e_gen, e_ref, e_saved = emb.chunk(3)
        cos_ref, cos_saved = self._cos_pos(e_gen, e_ref), self._cos_pos(e_gen, e_saved)
        if mode == "negative":
            nc_ref, nc_saved = a.resolved_neg_cos_factors()
            cos = nc_saved * (1.0 - cos_saved) + nc_ref * cos_ref
        elif running_mean is None:
            cos = a.cos_saved_factor * cos_saved + a.cos_ref_factor * cos_ref
        else:
            if running_mean.shape != e_gen.shape:
                raise ValueError(f"running_mean has shape {tuple(running_mean.shape)}, expected {tuple(e_gen.shape)}")
            cos_m = self._cos_pos(e_gen, running_mean.to(device=device, dtype=torch.float32))
            run_term = 1.0 - cos_m if mode == "long_range" else cos_m
            cos = (
                a.running_mean_saved_factor * cos_saved
                + a.running_mean_ref_factor * cos_ref
                + a.running_mean_factor * run_term
            )

        reward = a.bleu_factor * bleu.float() + a.cos_factor * cos
        if a.len_factor > 0:
            reward = reward + a.len_factor * self._length_reward(generated, reference)
        if a.tanh_reward_scale:
            reward = 2.0 * reward - 1.0
        return (reward * a.rewards_scale).float()

    def _length_reward(self, generated: Tensor, reference: Tensor) -> Tensor:
        """``LEN [B]``: ``len/target`` below the target, else 1 (``target/len`` with ``neg_reward_len``); len 0 -> 0."""
        length = (generated != self.pad_token_id).sum(-1).float()
        if self.args.target_len_as_ref:
            target = (reference != self.pad_token_id).sum(-1).float()
        else:
            target = torch.full_like(length, float(self.args.max_rewarded_len))
        over = target / length.clamp_min(1.0) if self.args.neg_reward_len else torch.ones_like(length)
        score = torch.where(length < target, length / target.clamp_min(1.0), over)
        return torch.where(length > 0, score, torch.zeros_like(score))
