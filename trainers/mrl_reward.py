"""MRL reward: BLEU-2 + embedding cosine (+ length) (+ retention) per generated answer (docs/training.md, section 6.3).

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

``RET`` (retention, only when ``retention_factor > 0``): how much of the information that the reference answer takes
from memory the generated answer carries, on token ids. ``ctx`` = the saved context (the trainer passes every query
and reference answer of the episode before the current query, joined by pads; without ``context`` the ``saved``
ids), ``q`` = the current query (optional; its n-grams are not memory's to credit), ``c_x(g)`` = how often the
n-gram ``g`` occurs in ``x`` (n-grams containing a pad are not counted), ``w(g)`` = the mean IDF weight of ``g``'s
tokens, ``[.]`` = 1 if true else 0::

    RET = sum_{n=1..N} sum_g w(g) * min(c_gen(g), c_ref(g), c_ctx(g)) * [c_q(g) = 0]
          / sum_{n=1..N} sum_g w(g) * c_ref(g)

with ``N = retention_max_n`` (2: unigrams and bigrams), and ``RET = 0`` where the denominator is 0. So ``RET`` is the
IDF-weighted share of the reference's n-grams that stand in the saved context, not in the query, *and* in the
generated answer: the reference itself scores the share of its information that only memory can supply (its room,
< 1), an answer carrying the remembered value in another template scores most of that, the reference's template with
a wrong value little, and echoing a saved interaction that the reference does not use earns nothing.
IDF (``inverse_document_frequency``, built once from the training episodes, one document per query and per answer):
``idf[v] = log((1 + N_docs) / (1 + df[v]))``, ``df[v]`` = documents containing token ``v``; pad and special tokens
weigh 0, a token in every document 0, a token seen nowhere ``log(1 + N_docs)``.

``r = bleu_factor*BLEU + cos_factor*COS + len_factor*LEN + retention_factor*RET`` -> ``2r - 1`` if
``tanh_reward_scale`` -> ``* rewards_scale``. Everything is batched tensor ops on the inputs' device; rewards are
float32 ``[B]`` and never carry gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tensorbleu import tensor_sentence_bleu

__all__ = [
    "BLEU_MODES",
    "REWARD_MODES",
    "MRLReward",
    "MRLRewardArguments",
    "episode_idf",
    "inverse_document_frequency",
    "retention_context",
    "retention_score",
]

REWARD_MODES = ("standard", "long_range", "negative")
BLEU_MODES = ("separate", "combined")
_BLEU_KWARGS = {"max_n": 2, "weights": (0.5, 0.5), "smoothing": "chen-cherry-4"}
_SUM_TOLERANCE = 1e-6


@dataclass
class MRLRewardArguments:
    """Reward factors of MRL (docs/spec.md#mrl-reward). A field mixin: no ``__post_init__``; call
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
    retention_factor: float = field(
        default=0.0,
        metadata={"help": "Weight of the retention term RET (IDF-weighted n-gram recall of the reference's remembered "
                  "information, in [0, 1]; it joins bleu/cos/len_factor in summing to 1). 0 = the reference reward."},
    )  # fmt: skip
    retention_max_n: int = field(
        default=2, metadata={"help": "Longest n-gram of the retention term (1 = unigrams, 2 = + bigrams)."}
    )

    def resolved_neg_cos_factors(self) -> tuple[float, float]:
        """``(neg_cos_ref_factor, neg_cos_saved_factor)`` with ``None`` replaced by the positive cos factors."""
        ref = self.cos_ref_factor if self.neg_cos_ref_factor is None else self.neg_cos_ref_factor
        saved = self.cos_saved_factor if self.neg_cos_saved_factor is None else self.neg_cos_saved_factor
        return ref, saved

    def validate_reward_arguments(self) -> None:
        """Raise ``ValueError`` naming the offending field(s), the value and what was expected."""
        ret = self.retention_factor
        if isinstance(ret, bool) or not isinstance(ret, (int, float)) or not 0.0 <= ret <= 1.0:
            raise ValueError(f"retention_factor must be a number in [0, 1], got {ret!r}")
        max_n = self.retention_max_n
        if isinstance(max_n, bool) or not isinstance(max_n, int) or not 1 <= max_n <= 4:
            raise ValueError(f"retention_max_n must be an integer in [1, 4], got {max_n!r}")
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
            "retention_factor": self.retention_factor,
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
            ("bleu_factor", "cos_factor", "len_factor", "retention_factor"),
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


# -- retention term (module docstring, RET) --------------------------------------------------------------------------
def inverse_document_frequency(
    rows: Sequence[Sequence[int]], vocab_size: int, zero_ids: Iterable[int] = ()
) -> Tensor:
    """IDF table float32 ``[vocab_size]`` of token-id documents ``rows``: ``log((1 + N) / (1 + df[v]))``, ``N`` =
    number of rows, ``df[v]`` = rows containing ``v`` at least once; ``zero_ids`` (pad and special tokens) weigh 0."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
    if len(rows) == 0:
        raise ValueError("inverse_document_frequency needs at least one document (row of token ids), got none")
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    tokens = torch.tensor(list(chain.from_iterable(rows)), dtype=torch.long)
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)][0].item()
        raise ValueError(f"token id {bad} outside the vocabulary [0, {vocab_size})")
    document = torch.repeat_interleave(torch.arange(len(rows)), lengths)
    present = torch.unique(document * vocab_size + tokens) % vocab_size  # each (document, token) pair once
    df = torch.bincount(present, minlength=vocab_size).double()
    idf = torch.log((1.0 + len(rows)) / (1.0 + df))
    zero = torch.tensor(sorted(set(zero_ids)), dtype=torch.long)
    if zero.numel() and (zero.min() < 0 or zero.max() >= vocab_size):
        raise ValueError(f"zero_ids must lie in [0, {vocab_size}), got {zero.tolist()}")
    idf[zero] = 0.0
    return idf.float()


def episode_idf(episodes: Sequence[Sequence[tuple[list[int], list[int]]]], vocab_size: int,
                zero_ids: Iterable[int] = ()) -> Tensor:  # fmt: skip
    """IDF table of episodes in `MRLCollator` form (``[[(query_ids, answer_ids), ...], ...]``): one document per query
    and one per answer."""
    rows = [part for episode in episodes for turn in episode for part in turn]
    return inverse_document_frequency(rows, vocab_size, zero_ids)


def retention_context(episodes: Sequence[Sequence[tuple[list[int], list[int]]]], step: int, pad_token_id: int):
    """The retention term's saved context at rollout ``step`` (the query of turn ``step + 1`` is being answered): every
    query and reference answer of turns ``0 .. step``, joined by ``pad_token_id`` so no n-gram spans two of them.
    One id list per episode (an episode without turn ``step + 1`` still gets its turns up to ``step``)."""
    return [list(chain.from_iterable([*part, pad_token_id] for turn in episode[: step + 1] for part in turn))
            for episode in episodes]  # fmt: skip


def _ngram_keys(ids: Tensor, n: int, pad_token_id: int) -> Tensor:
    """``ids [B, T]`` -> ``[M, 1 + n]`` rows ``(batch row, token_1 .. token_n)`` of every n-gram without a pad."""
    if ids.shape[1] < n:
        ids = F.pad(ids, (0, n - ids.shape[1]), value=pad_token_id)
    grams = ids.unfold(1, n, 1)  # [B, T - n + 1, n]
    valid = (grams != pad_token_id).all(-1)  # [B, T - n + 1]
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(valid)
    return torch.cat([rows[valid][:, None], grams[valid]], dim=1)


@torch.no_grad()
def retention_score(generated: Tensor, reference: Tensor, context: Tensor, idf: Tensor, pad_token_id: int,
                    max_n: int = 2, query: Tensor | None = None) -> Tensor:  # fmt: skip
    """``RET`` (module docstring) float32 ``[B]`` of ``generated [B, Tg]`` vs ``reference [B, Tr]``, the saved
    ``context [B, Tc]`` and optionally the current ``query [B, Tq]`` (special tokens in it do no harm), with IDF
    weights ``idf [V]``. Pads anywhere are ignored (n-grams across them are not counted). All rows are scored
    together: per n-gram order each (row, n-gram) becomes one int64 code ``row·V^n + Σ token_i·V^(n-i)``, the codes
    of the reference's n-grams select the others' (``isin``), then one ``torch.unique`` and one ``bincount`` per
    input (a row-wise ``unique(dim=0)`` where ``B·V^n`` would overflow)."""
    inputs = (("generated", generated), ("reference", reference), ("context", context))
    if query is not None:
        inputs += (("query", query),)
    for name, x in inputs:
        if x.dim() != 2 or x.shape[0] != generated.shape[0]:
            raise ValueError(f"{name} must be [B, T] token ids with B = {generated.shape[0]}, got {tuple(x.shape)}")
    device = generated.device
    batch, vocab = generated.shape[0], idf.shape[0]
    idf = idf.to(device=device, dtype=torch.float64)
    matched = torch.zeros(batch, dtype=torch.float64, device=device)
    total = torch.zeros(batch, dtype=torch.float64, device=device)
    sources = [x.to(device).long() for _, x in inputs]
    for (name, _), x in zip(inputs, sources):
        if x.numel() and (x.min() < 0 or x.max() >= vocab):
            raise ValueError(f"{name} holds token ids outside the IDF table's vocabulary [0, {vocab})")
    for n in range(1, max_n + 1):
        keys = [_ngram_keys(x, n, pad_token_id) for x in sources]  # [M_i, 1 + n] each
        if batch * vocab**n < 2**62:  # one int64 code per (row, n-gram): a 1-D unique (a sort), far faster
            scale = torch.tensor([vocab ** (n - i) for i in range(n + 1)], device=device)  # [1 + n]
            codes = [(k * scale).sum(-1) for k in keys]
            ref_codes = codes[1].unique()
            codes = [c[torch.isin(c, ref_codes)] for c in codes]  # only n-grams of the reference can count
            unique, inverse = torch.unique(torch.cat(codes), return_inverse=True)  # [U], [M]
            unique = torch.stack([unique // scale[i] % (vocab if i else batch + 1) for i in range(n + 1)], -1)
            sizes = [c.shape[0] for c in codes]
        else:
            unique, inverse = torch.unique(torch.cat(keys), dim=0, return_inverse=True)  # [U, 1 + n], [M]
            sizes = [k.shape[0] for k in keys]
        counts = [torch.bincount(part, minlength=unique.shape[0]) for part in inverse.split(sizes)]
        c_gen, c_ref, c_ctx = counts[:3]  # [U] each
        weight = idf[unique[:, 1:]].mean(-1)  # [U]: mean IDF of the n-gram's tokens
        hit = torch.minimum(torch.minimum(c_gen, c_ref), c_ctx)
        if query is not None:
            hit = hit * (counts[3] == 0)
        matched.index_add_(0, unique[:, 0], weight * hit)
        total.index_add_(0, unique[:, 0], weight * c_ref)
    return torch.where(total > 0, matched / total.clamp_min(1e-300), torch.zeros_like(total)).float()


class MRLReward:
    """Batched MRL reward (docs/spec.md#mrl-reward): ``reward(generated, reference, saved, mode=...)`` -> float32
    ``[B]``.

    Args:
        args: the reward factors (validated here).
        embedding: the shared token embedding, ``[V, D]`` tensor (kept detached, storage shared with the live
            weights) or ``nn.Embedding`` (its weight read at each call, so the reward follows the embedding as it
            trains, also when FSDP2 swaps the parameter for a shard and, inside a forward, for the gathered tensor).
        pad_token_id: padding id of all id tensors (right-padded; pads anywhere are ignored).
        idf: IDF table float ``[V]`` of the retention term (`episode_idf` of the training episodes); needed when
            ``args.retention_factor > 0``.
    """

    def __init__(self, args: MRLRewardArguments, embedding: Tensor | nn.Embedding, pad_token_id: int,
                 idf: Tensor | None = None):  # fmt: skip
        args.validate_reward_arguments()
        weight = embedding.weight if isinstance(embedding, nn.Embedding) else embedding
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(
                "embedding must be an nn.Embedding or a floating [V, D] tensor, got "
                f"{type(weight).__name__} of shape {tuple(getattr(weight, 'shape', ()))}"
            )
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
        if idf is not None and (not isinstance(idf, Tensor) or idf.dim() != 1 or idf.shape[0] != weight.shape[0]
                                or not idf.is_floating_point()):  # fmt: skip
            raise ValueError(
                f"idf must be a floating [V] tensor with V = {weight.shape[0]} (the embedding's rows), got "
                f"{type(idf).__name__} of shape {tuple(getattr(idf, 'shape', ()))}"
            )
        if args.retention_factor > 0 and idf is None:
            raise ValueError(
                f"retention_factor={args.retention_factor} needs an IDF table: MRLReward(..., idf=episode_idf(...)) "
                "built from the training episodes"
            )
        self.args = args
        self.idf = None if idf is None else idf.detach().float()
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
        context: Tensor | None = None,
        query: Tensor | None = None,
    ) -> Tensor:
        """Rewards float32 ``[B]`` for ``generated [B, Tg]`` vs ``reference [B, Tr]`` and ``saved [B, Ts]``.

        ``mode``: ``"standard"``, ``"long_range"`` or ``"negative"``; ``running_mean [B, D]`` enables the
        running-mean cosine term (standard/long_range); ``first_step`` selects the ``bleu_first_*`` factors;
        ``context [B, Tc]``: the retention term's saved context (`retention_context`; None = ``saved``);
        ``query [B, Tq]``: the current query, whose n-grams the retention term does not credit (None: none).
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
        if a.retention_factor > 0:
            context = saved if context is None else context
            reward = reward + a.retention_factor * self.retention(generated, reference, context, query)
        if a.tanh_reward_scale:
            reward = 2.0 * reward - 1.0
        return (reward * a.rewards_scale).float()

    def retention(self, generated: Tensor, reference: Tensor, context: Tensor, query: Tensor | None = None) -> Tensor:
        """The retention term ``RET`` float32 ``[B]`` alone (`retention_score` with this reward's IDF table)."""
        if self.idf is None:
            raise ValueError("MRLReward.retention needs an IDF table: MRLReward(..., idf=episode_idf(...))")
        return retention_score(generated, reference, context, self.idf, self.pad_token_id, self.args.retention_max_n,
                               query)  # fmt: skip

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
