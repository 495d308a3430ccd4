"""TensorBLEU: vectorised token-id BLEU in pure torch (docs/training.md, section 6.4).

Per-sentence (and corpus) BLEU of a batch of candidate token-id sequences against one or more reference
sequences, computed with tensor ops on whatever device the inputs live on. The numbers are those of
``nltk.translate.bleu_score.sentence_bleu`` / ``corpus_bleu`` (NLTK 3.10) applied to the lists of non-pad ids,
including NLTK's edge cases; ``tests/test_tensorbleu.py`` checks agreement to <= 1e-6.

Token-id BLEU depends on the tokenizer: use it for rewards and relative comparisons only; report SacreBLEU on
detokenised text.

Algorithm (per n-gram order n, no Python loop over samples or tokens):

1. Pad handling: a row's length is its number of non-pad tokens. Rows that are not right-padded (pads in the middle
   or on the left) are compacted with one stable sort per row, so pad is only ever padding.
2. n-gram dictionary over the whole batch. Two interchangeable backends produce, for every valid candidate
   and reference window, a compact id of its n-gram in a batch-wide dictionary (``torch.unique(...,
   return_inverse=True)``; memory scales with the number of distinct n-grams present, never with ``V**n``):

   * ``backend="rolling"`` (default): the id of the (sentence, n-gram) starting at position ``s`` is the
     dictionary id of the pair ``(id of the (n-1)-gram at s, id of the token at s+n-1)`` (order 1: of the pair
     ``(sentence, token)``), packed into one integer key, so each order needs one 1-D ``torch.unique`` over the
     candidate and reference windows of the whole batch (stacked as one bank of rows). After each order, the
     n-grams that are not in both the candidate and a reference of their sentence are dropped from the chain
     (they cannot extend to a matching (n+1)-gram); with the token encoded by its rank among its sentence's
     shared unigrams this keeps the keys small enough for int32 sorting. Exact (no hashing),
     O(B*(Tc+R*Tr)) memory. This is the dictionary that ``torch.unique(dim=0)`` over the ``unfold`` windows with
     the sentence index as an extra column would build, but ``torch.unique(dim=0)`` is about 40x slower on CPU
     (85 ms vs 2 ms for 32k 4-gram rows, torch 2.13), which alone would make TensorBLEU slower than NLTK.
   * ``backend="unfold"``: the literal section 6.4 recipe: windows via ``Tensor.unfold`` -> ``[B, T-n+1, n]``,
     ``torch.unique(rows, dim=0, return_inverse=True)`` over all valid candidate and reference windows,
     counts with one offset ``torch.bincount`` (sentence ``b`` offset by ``b*U``, reference ``r`` by
     ``(b*R+r)*U``), memory ``O(B*R*U)``. Kept as a cross-check and for devices where ``unique(dim=0)`` is fast.
3. Clipping: candidate counts ``min``-ed with the element-wise ``max`` of the counts over references,
   summed per sentence -> numerator; denominator ``max(1, len_c - n + 1)`` (NLTK).
4. Brevity penalty with NLTK's closest reference length (ties -> shorter reference), smoothing, weighted
   geometric mean, all as float64 tensor ops.

Smoothing (``smoothing=`` name -> NLTK 3.10 ``SmoothingFunction`` method; ``p_n = num/den``, "zero" = zero
clipped matches for that order):

====================  =======  ===========================================================================
name (aliases)        NLTK     rule
====================  =======  ===========================================================================
``"none"``            method0  zero -> ``sys.float_info.min`` (so ``log`` is about -708 and the score is
(``"method0"``,                ~1e-77 rather than exactly 0, as in NLTK). NLTK warns once per sentence;
``None``)                      here only when ``warn_zero_matches=True`` (a warning needs a device sync).
``"floor"``           method1  zero -> ``(0 + epsilon)/den``; kwarg ``epsilon`` (default 0.1, NLTK's).
(``"method1"``)
``"add-k"``           method2  orders n >= 2: ``(num + k)/(den + k)``; order 1 unchanged; kwarg ``k``
(``"method2"``)                (default 1 = NLTK method2 exactly; other values generalise it).
``"exp"``             method3  c-th zero order (c = 1, 2, ...): ``1/(2**c * den)``.
(``"method3"``)
``"chen-cherry-4"``   method4  if ``hyp_len > 1``: c-th zero order -> ``1/(2**c * k / ln(hyp_len)) / den``;
(``"method4"``)                kwarg ``k`` (default 5, NLTK ``SmoothingFunction(k=5)``). With ``hyp_len <= 1``
                               the zero stays 0 and is skipped (NLTK). The MRL reward's setting (BLEU-2).
====================  =======  ===========================================================================

``hyp_len`` is the candidate length (corpus: the total candidate length, as NLTK passes it).

NLTK edge cases mirrored exactly:

* no unigram match at all (including an empty candidate or all-empty references) -> BLEU is exactly 0 whatever
  the smoothing (corpus: no unigram match in the whole corpus);
* orders whose smoothed precision is still ``<= 0`` are skipped in the log sum (e.g. method4 with
  ``hyp_len <= 1``, or ``epsilon=0``);
* a candidate shorter than ``n`` has 0 matches over denominator 1 for that order;
* brevity penalty ``1`` if ``c > r``, ``0`` if ``c == 0``, else ``exp(1 - r/c)``;
* an all-pad reference row is an empty reference (length 0) that takes part in the closest-length rule, as an
  empty list would in NLTK. Pass ``ignore_empty_references=True`` when rows of a ``[B, R, Tr]`` tensor are
  padding for samples with fewer than R references (their lengths are then ignored unless every reference of
  the sample is empty).

Output dtype: computed in float64; returned as ``dtype`` (default ``torch.float32``; pass ``torch.float64`` for
full NLTK agreement, float32 agrees to ~1e-7 relative).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NLTK_SMOOTHING_METHOD", "SMOOTHING_METHODS", "tensor_corpus_bleu", "tensor_sentence_bleu"]

# canonical name -> default smoothing parameters
SMOOTHING_METHODS: dict[str, dict[str, float]] = {
    "none": {},
    "floor": {"epsilon": 0.1},
    "add-k": {"k": 1},
    "exp": {},
    "chen-cherry-4": {"k": 5},
}
# canonical name -> the NLTK SmoothingFunction method it equals
NLTK_SMOOTHING_METHOD: dict[str, str] = {
    "none": "method0",
    "floor": "method1",
    "add-k": "method2",
    "exp": "method3",
    "chen-cherry-4": "method4",
}
_ALIASES = {v: k for k, v in NLTK_SMOOTHING_METHOD.items()}
_BACKENDS = ("rolling", "unfold")
_FLOAT_MIN = sys.float_info.min
_INT64_MAX = torch.iinfo(torch.int64).max


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------
def _is_int_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _validate(
    candidates, references, max_n, weights, smoothing, pad_token_id, backend, smoothing_kwargs
) -> tuple[Tensor, Tensor, Tensor, str, dict[str, float]]:
    if not isinstance(candidates, Tensor):
        raise ValueError(f"candidates must be a torch.Tensor of token ids [B, Tc], got {type(candidates).__name__}")
    if not isinstance(references, Tensor):
        raise ValueError(
            f"references must be a torch.Tensor of token ids [B, Tr] or [B, R, Tr], got {type(references).__name__}"
        )
    if candidates.dim() != 2:
        raise ValueError(
            f"candidates must be 2-D [B, Tc], got {candidates.dim()}-D tensor of shape {tuple(candidates.shape)}"
        )
    if references.dim() not in (2, 3):
        raise ValueError(
            "references must be 2-D [B, Tr] or 3-D [B, R, Tr], got "
            f"{references.dim()}-D tensor of shape {tuple(references.shape)}"
        )
    if not _is_int_dtype(candidates.dtype):
        raise ValueError(f"candidates must have an integer dtype (expected e.g. torch.long), got {candidates.dtype}")
    if not _is_int_dtype(references.dtype):
        raise ValueError(f"references must have an integer dtype (expected e.g. torch.long), got {references.dtype}")
    if references.shape[0] != candidates.shape[0]:
        raise ValueError(
            f"batch size mismatch: references has batch size {references.shape[0]}, expected "
            f"{candidates.shape[0]} (the batch size of candidates)"
        )
    if references.device != candidates.device:
        raise ValueError(
            f"references are on {references.device}, expected {candidates.device} (the device of candidates)"
        )
    refs = references.unsqueeze(1) if references.dim() == 2 else references
    if refs.shape[1] < 1:
        raise ValueError("references must hold at least one reference per sample (expected R >= 1, got R = 0)")
    if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"max_n must be an integer >= 1, got {max_n!r}")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
    if weights is None:
        w = torch.full((max_n,), 1.0 / max_n, dtype=torch.float64)
    else:
        try:
            wl = [float(x) for x in weights]
        except (TypeError, ValueError):
            raise ValueError(
                f"weights must be a sequence of {max_n} numbers (one per n-gram order), got {weights!r}"
            ) from None
        if len(wl) != max_n:
            raise ValueError(f"weights has {len(wl)} entries, expected max_n = {max_n} (one weight per n-gram order)")
        if not all(math.isfinite(x) for x in wl):
            raise ValueError(f"weights must be finite numbers, got {weights!r}")
        w = torch.tensor(wl, dtype=torch.float64)
    if smoothing is None:
        smoothing = "none"
    if not isinstance(smoothing, str) or (smoothing not in SMOOTHING_METHODS and smoothing not in _ALIASES):
        raise ValueError(
            f"unknown smoothing {smoothing!r}; expected one of {sorted(SMOOTHING_METHODS)} "
            f"(or the NLTK names {sorted(_ALIASES)})"
        )
    smoothing = _ALIASES.get(smoothing, smoothing)
    params = dict(SMOOTHING_METHODS[smoothing])
    for key, value in smoothing_kwargs.items():
        if key not in params:
            allowed = tuple(params) if params else "no parameters"
            raise ValueError(f"smoothing {smoothing!r} accepts {allowed}; got unexpected keyword argument {key!r}")
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"smoothing parameter {key!r} must be a finite number, got {value!r}")
        if smoothing == "chen-cherry-4" and value <= 0:
            raise ValueError(f"smoothing parameter 'k' of 'chen-cherry-4' must be > 0, got {value!r}")
        if smoothing in ("floor", "add-k") and value < 0:
            raise ValueError(f"smoothing parameter {key!r} of {smoothing!r} must be >= 0, got {value!r}")
        params[key] = value
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {_BACKENDS}")
    return candidates, refs, w, smoothing, params


# ----------------------------------------------------------------------------------------------------------------
# n-gram statistics
# ----------------------------------------------------------------------------------------------------------------
def _compact(x: Tensor, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Move non-pad tokens to the front of each row (stable); return (tokens as int64, lengths)."""
    x = x.long()
    valid = x != pad_token_id
    lengths = valid.sum(-1)
    if x.shape[-1] > 1 and x.numel() > 0 and bool((valid[..., 1:] & ~valid[..., :-1]).any()):
        order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
        x = torch.gather(x, -1, order)
    return x, lengths


_INT32_MAX = torch.iinfo(torch.int32).max
# torch's CPU sort switches to a parallel radix sort for integer tensors of >= at::internal::GRAIN_SIZE (32768)
# elements (int32 keys only profit: ~2x faster than the comparison sort). Mid-sized int32 key arrays are padded up
# to that size on CPU, which is cheaper than sorting them with the comparison sort (measured, torch 2.13).
_RADIX_MIN = 32768
_RADIX_PAD_FROM = 20480


_INVALID_TOKEN = 1 << 62  # "no token" in a key: pushes the key past any bound


def _dictionary(keys: Tensor, bound: int) -> tuple[Tensor, int]:
    """Batch dictionary of the int64 ``keys``; keys ``>= bound`` are invalid windows.

    Returns ``(ids, k)``: valid keys get compact ids in ``[0, k)`` (ordered like the keys), every invalid key
    gets the id ``k``. Keys are sorted as int32 whenever they fit.
    """
    dt = torch.int32 if bound < _INT32_MAX else torch.int64
    flat = keys.clamp_max(bound).to(dt).reshape(-1)
    total = flat.numel()
    if flat.device.type == "cpu" and dt == torch.int32 and _RADIX_PAD_FROM <= total < _RADIX_MIN:
        flat = torch.cat([flat, flat.new_full((_RADIX_MIN - total,), bound)])
    uniq, inv = torch.unique(flat, sorted=True, return_inverse=True)
    k = uniq.numel() - int(uniq[-1] == bound)  # the sentinel, when present, sorts last: its id is k
    return inv[:total].view(keys.shape), k


def _stats_rolling(cand: Tensor, cand_len: Tensor, refs: Tensor, ref_len: Tensor, max_n: int) -> Tensor:
    B, Tc = cand.shape
    _, R, Tr = refs.shape
    device = cand.device
    num = torch.zeros(B, max_n, dtype=torch.long, device=device)
    if B == 0 or Tc == 0:
        return num
    # One bank of rows: B candidate rows, then B*R reference rows (sentence-major), padded to a common width.
    T = max(Tc, Tr)
    bank = torch.cat([F.pad(cand, (0, T - Tc)), F.pad(refs.reshape(B * R, Tr), (0, T - Tr))])
    total = bank.numel() + 1  # bound on any dictionary size
    if total * total >= _INVALID_TOKEN:
        raise ValueError(f"batch too large for int64 n-gram keys: B*(1+R)*T = {total - 1}, expected < 2e9")
    row_len = torch.cat([cand_len, ref_len.reshape(-1)])
    b_idx = torch.arange(B, device=device)
    row_sent = torch.cat([b_idx, b_idx.repeat_interleave(R)])
    row_slot = torch.cat([torch.zeros(B, dtype=torch.long, device=device),
                          torch.arange(1, R + 1, device=device).repeat(B)])  # 0 = candidate, r+1 = reference r
    valid = torch.arange(T, device=device) < row_len[:, None]

    # order 1: dictionary of (sentence, token) pairs, key = b * span + (token - lo); padding -> invalid
    lo, hi = (int(v) for v in torch.aminmax(bank))
    span = hi - lo + 1
    if B * span >= _INVALID_TOKEN:  # huge id range: compress the token values first
        vals, inv = torch.unique(bank, return_inverse=True)
        bank, lo, span = inv, 0, vals.numel()
    bound = B * span
    ids, k = _dictionary(torch.where(valid, row_sent[:, None] * span + (bank - lo), bound), bound)
    sent_c = b_idx[:, None]
    base, src = span, bank  # next-token encoding, set after order 1
    for n in range(1, max_n + 1):
        if n > 1:
            if Tc - n + 1 <= 0 or k == 0:  # no candidate n-gram can match: zero for this and higher orders
                break
            # key of the n-gram at s = (id of the (n-1)-gram at s, next token at s+n-1); either invalid -> key
            # >= bound (prev id == k, or next token == _INVALID_TOKEN)
            bound = k * base
            ids, k = _dictionary(ids[:, : T - n + 1] * base + src[:, n - 1:], bound)
        # counts of every dictionary entry per row slot (candidate, reference 1..R); bin k = invalid windows
        kp = k + 1
        counts = torch.bincount((ids + (row_slot * kp)[:, None]).reshape(-1), minlength=(R + 1) * kp)
        counts = counts.view(R + 1, kp)
        clipped = torch.minimum(counts[0], counts[1:].amax(0))
        clipped[k] = 0
        ids_c = ids[:B]
        sent_of_id = torch.zeros(kp, dtype=torch.long, device=device).scatter_(
            0, ids_c.reshape(-1), sent_c.expand_as(ids_c).reshape(-1))
        num[:, n - 1] = torch.zeros(B, dtype=torch.long, device=device).scatter_add_(0, sent_of_id, clipped)
        if n == max_n:
            break
        # Only n-grams present in the candidate and a reference of the same sentence can extend to matching
        # (n+1)-grams: drop the others from the chain (they become invalid), which keeps the next keys small.
        shared = clipped > 0  # the invalid bin k has clipped 0
        rank = shared.cumsum(0) - 1
        k = int(rank[-1]) + 1
        if k == 0:
            break
        ids = rank.masked_fill_(~shared, k).index_select(0, ids.reshape(-1)).view(ids.shape)
        if n == 1:
            # (n+1)-gram key = (n-gram id, next token). The (n-gram id) fixes the sentence, so the token only
            # needs an id that is unique within its sentence: its rank among the sentence's shared unigrams
            # (ids are sentence-major), or its value if the vocabulary span is smaller. Keeps keys int32.
            # Tokens that match nowhere are invalid.
            sent_shared = sent_of_id[shared]  # nondecreasing
            per_sent = torch.bincount(sent_shared, minlength=B)
            local_base = int(per_sent.max())
            if span <= local_base:
                base, src = span, torch.where(ids < k, bank - lo, _INVALID_TOKEN)
            else:
                first = per_sent.cumsum(0) - per_sent
                local = torch.cat([torch.arange(k, device=device) - first[sent_shared],
                                   torch.full((1,), _INVALID_TOKEN, dtype=torch.long, device=device)])
                base, src = local_base, local.index_select(0, ids.reshape(-1)).view(ids.shape)
    return num


def _stats_unfold(cand: Tensor, cand_len: Tensor, refs: Tensor, ref_len: Tensor, max_n: int) -> Tensor:
    B, Tc = cand.shape
    _, R, Tr = refs.shape
    device = cand.device
    num = torch.zeros(B, max_n, dtype=torch.long, device=device)
    if B == 0:
        return num
    b_idx = torch.arange(B, device=device)
    slot = (b_idx[:, None] * R + torch.arange(R, device=device)[None, :])  # [B, R]
    for n in range(1, max_n + 1):
        lc = Tc - n + 1
        if lc <= 0:
            break
        win_c = cand.unfold(1, n, 1)  # [B, lc, n] (view)
        vc = torch.arange(lc, device=device) < (cand_len - n + 1)[:, None]
        rows_c, sent_c = win_c[vc], b_idx[:, None].expand(B, lc)[vc]
        lr = Tr - n + 1
        if lr > 0:
            win_r = refs.unfold(2, n, 1)  # [B, R, lr, n] (view)
            vr = torch.arange(lr, device=device) < (ref_len - n + 1)[..., None]
            rows_r, slot_r = win_r[vr], slot[..., None].expand(B, R, lr)[vr]
        else:
            rows_r = cand.new_zeros((0, n))
            slot_r = b_idx.new_zeros((0,))
        if rows_c.shape[0] == 0:
            continue
        uniq, inv = torch.unique(torch.cat([rows_c, rows_r]), dim=0, return_inverse=True)
        u = uniq.shape[0]
        inv_c, inv_r = inv[: rows_c.shape[0]], inv[rows_c.shape[0]:]
        cand_counts = torch.bincount(sent_c * u + inv_c, minlength=B * u).view(B, u)
        ref_counts = torch.bincount(slot_r * u + inv_r, minlength=B * R * u).view(B, R, u).amax(1)
        num[:, n - 1] = torch.minimum(cand_counts, ref_counts).sum(-1)
    return num


def _closest_ref_len(hyp_len: Tensor, ref_len: Tensor, ignore_empty: bool) -> Tensor:
    """NLTK ``closest_ref_length``: min over references of (|r - c|, r)."""
    big = int(ref_len.max()) + 1 if ref_len.numel() else 1
    key = (ref_len - hyp_len[:, None]).abs() * big + ref_len
    if ignore_empty:
        empty = ref_len == 0
        key = torch.where(empty & ~empty.all(-1, keepdim=True), _INT64_MAX, key)
    return ref_len.gather(-1, key.argmin(-1, keepdim=True)).squeeze(-1)


def _ngram_stats(candidates, refs, max_n, pad_token_id, backend, ignore_empty):
    cand, cand_len = _compact(candidates, pad_token_id)
    refs, ref_len = _compact(refs, pad_token_id)
    fn = _stats_rolling if backend == "rolling" else _stats_unfold
    num = fn(cand, cand_len, refs, ref_len, max_n)
    orders = torch.arange(max_n, device=cand.device)
    den = (cand_len[:, None] - orders[None, :]).clamp_min(1)  # max(1, len - n + 1)
    closest = _closest_ref_len(cand_len, ref_len, ignore_empty)
    return num, den, cand_len, closest


# ----------------------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------------------
def _score(num: Tensor, den: Tensor, hyp_len: Tensor, ref_len: Tensor, weights: Tensor, smoothing: str,
           params: dict[str, float], warn: bool) -> Tensor:
    """BLEU from per-row statistics ``num``/``den`` [N, max_n], ``hyp_len``/``ref_len`` [N]; float64 [N]."""
    numf, denf = num.double(), den.double()
    p = numf / denf
    zero = num == 0
    if smoothing == "none":
        if warn and bool((zero & (num[:, :1] > 0)).any()):
            warnings.warn(
                "Some hypotheses contain 0 counts of higher-order n-gram overlaps; their BLEU evaluates to ~0 "
                "(as NLTK's method0). Consider a lower max_n or a smoothing.",
                stacklevel=4,
            )
        p = torch.where(zero, _FLOAT_MIN, p)
    elif smoothing == "floor":
        p = torch.where(zero, (numf + params["epsilon"]) / denf, p)
    elif smoothing == "add-k":
        kk = params["k"]
        p = torch.cat([p[:, :1], (numf[:, 1:] + kk) / (denf[:, 1:] + kk)], dim=1)
    elif smoothing == "exp":
        c = zero.cumsum(-1).double()
        p = torch.where(zero, 1.0 / (torch.pow(2.0, c) * denf), p)
    elif smoothing == "chen-cherry-4":
        hl = hyp_len.double()[:, None]
        apply = zero & (hl > 1)
        c = apply.cumsum(-1).double()
        scale = (torch.pow(2.0, c) * params["k"]) / torch.log(hl.clamp_min(2.0))
        p = torch.where(apply, (1.0 / scale) / denf, p)
    else:  # pragma: no cover - validated earlier
        raise ValueError(f"unknown smoothing {smoothing!r}")
    # NLTK sums w * log(p) only over p > 0
    logp = torch.where(p > 0, torch.log(p), torch.zeros((), dtype=p.dtype, device=p.device))
    log_sum = (logp * weights.to(p.device)).sum(-1)
    c = hyp_len.double()
    r = ref_len.double()
    bp = torch.where(c > r, 1.0, torch.where(c == 0, 0.0, torch.exp(1.0 - r / c)))
    score = bp * torch.exp(log_sum)
    return torch.where(num[:, 0] == 0, torch.zeros((), dtype=score.dtype, device=score.device), score)


def tensor_sentence_bleu(
    candidates: Tensor,
    references: Tensor,
    max_n: int = 4,
    weights: Sequence[float] | None = None,
    smoothing: str | None = "none",
    pad_token_id: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    ignore_empty_references: bool = False,
    warn_zero_matches: bool = False,
    backend: str = "rolling",
    **smoothing_kwargs: float,
) -> Tensor:
    """Per-sentence BLEU of each candidate row against its reference row(s), as NLTK ``sentence_bleu``.

    Args:
        candidates: integer tensor ``[B, Tc]``, padded with ``pad_token_id`` (length = number of non-pad ids).
        references: integer tensor ``[B, Tr]`` (one reference) or ``[B, R, Tr]`` (R references per sample).
        max_n: highest n-gram order.
        weights: ``max_n`` weights of the geometric mean (default uniform ``1/max_n``).
        smoothing: ``"none"`` (NLTK method0), ``"floor"`` (method1), ``"add-k"`` (method2), ``"exp"``
            (method3) or ``"chen-cherry-4"`` (method4); NLTK names ``"method0"``..``"method4"`` are accepted.
            See the module docstring for the exact rules.
        pad_token_id: the padding id; pad tokens are removed wherever they are.
        dtype: output dtype (computation is float64).
        ignore_empty_references: ignore all-pad reference rows in the closest-reference-length rule.
        warn_zero_matches: with ``"none"``, warn (like NLTK) if some sentence has a zero higher-order count.
        backend: ``"rolling"`` (default, fast on CPU) or ``"unfold"`` (``unique(dim=0)`` + offset bincount).
        **smoothing_kwargs: ``epsilon`` for ``"floor"``; ``k`` for ``"add-k"`` (default 1) and
            ``"chen-cherry-4"`` (default 5).

    Returns:
        Tensor ``[B]`` of BLEU scores in ``[0, 1]`` on the input device.

    Raises:
        ValueError: wrong dims / dtypes / batch sizes / devices, unknown smoothing or backend, weights of the
            wrong length, unknown smoothing parameters.
    """
    candidates, refs, w, smoothing, params = _validate(
        candidates, references, max_n, weights, smoothing, pad_token_id, backend, smoothing_kwargs
    )
    num, den, hyp_len, closest = _ngram_stats(candidates, refs, max_n, pad_token_id, backend,
                                              ignore_empty_references)
    return _score(num, den, hyp_len, closest, w, smoothing, params, warn_zero_matches).to(dtype)


def tensor_corpus_bleu(
    candidates: Tensor,
    references: Tensor,
    max_n: int = 4,
    weights: Sequence[float] | None = None,
    smoothing: str | None = "none",
    pad_token_id: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    ignore_empty_references: bool = False,
    warn_zero_matches: bool = False,
    backend: str = "rolling",
    **smoothing_kwargs: float,
) -> Tensor:
    """Corpus BLEU of the batch, as NLTK ``corpus_bleu``: clipped matches, denominators, candidate lengths and
    closest reference lengths are summed over the batch before precisions, smoothing (``hyp_len`` = total
    candidate length) and brevity penalty. Same arguments as :func:`tensor_sentence_bleu`; returns a 0-d tensor.
    """
    candidates, refs, w, smoothing, params = _validate(
        candidates, references, max_n, weights, smoothing, pad_token_id, backend, smoothing_kwargs
    )
    num, den, hyp_len, closest = _ngram_stats(candidates, refs, max_n, pad_token_id, backend,
                                              ignore_empty_references)
    score = _score(num.sum(0, keepdim=True), den.sum(0, keepdim=True), hyp_len.sum().view(1),
                   closest.sum().view(1), w, smoothing, params, warn_zero_matches)
    return score.squeeze(0).to(dtype)
