"""Attention facts shared by every component: the head dim and head count from the RoPE buffer (or the config),
the `(Hq, Hkv)` of one attention site from its projection shapes, the RoPE table check, and the comparison of the
heads a config states with the heads the tensors show (docs/conversion.md#order-of-authority)."""

from __future__ import annotations

import torch

from .folders import ConversionError, View, fmt_shape
from .reference_config import Fields
from .report import Report


def infer_head_dim(view: View, fields: Fields, component: str, dim: int, report: Report) -> tuple[int, int, bool]:
    """`(hd, H, from_buffer)`: the head dim from the first stored RoPE buffer (`rope.inv_freq`: `hd/2` frequencies;
    else `rope.cache`: last dim `hd/2`), else `embed_dim / att_heads` of the config (NoPE or no buffer stored); `H`
    = `dim / hd`, which a stated `att_heads` must equal."""
    cfg = fields.config
    inv_keys = sorted(k for k in view.stored if k.endswith("rope.inv_freq"))
    cache_keys = sorted(k for k in view.stored if k.endswith("rope.cache"))
    if inv_keys:
        hd = 2 * view.shape(inv_keys[0])[0]
        report.fact(component, "head_dim", hd, "shape", f"2 * {inv_keys[0]}.shape[0]")
    elif cache_keys:
        hd = 2 * view.shape(cache_keys[0])[-1]
        report.fact(component, "head_dim", hd, "shape", f"2 * {cache_keys[0]}.shape[-1]")
    else:
        heads_cfg = fields.get("att_heads")
        if not isinstance(heads_cfg, int) or heads_cfg < 1 or dim % heads_cfg:
            raise ConversionError(f"{component}: embed_dim {dim} is not divisible by att_heads={heads_cfg}.")
        hd = dim // heads_cfg
        report.fact(component, "head_dim", hd, "config", "embed_dim / att_heads (no RoPE buffer stored)")
    from_buffer = bool(inv_keys or cache_keys)
    if hd < 1 or dim % hd:
        raise ConversionError(
            f"{component}: embed_dim {dim} is not divisible by the head dim {hd} (from the RoPE buffer)."
        )
    heads = dim // hd
    if fields.given("att_heads") and cfg["att_heads"] != heads:
        raise ConversionError(
            f"{component}: config att_heads={cfg['att_heads']} gives head dim {dim}/{cfg['att_heads']}, but the "
            f"RoPE buffer has {hd // 2} frequencies (head dim {hd}, att_heads {heads}); they must agree."
        )
    report.fact(
        component, "att_heads", heads, "shape" if from_buffer else "config", f"embed_dim / head_dim = {dim}/{hd}"
    )
    return hd, heads, from_buffer


def infer_site(view: View, prefixes: list[str], hd: int, dim: int, site: str) -> dict:
    """`(Hq, Hkv)`, output bias and gating of one attention site from the first layer that has it
    (docs/conversion.md#order-of-authority)."""
    present = [p for p in prefixes if view.has(p + "q_proj.weight")]
    if not present:
        raise ConversionError(
            f"{view.name}: cannot infer the {site} heads: no '{view.prefix}{prefixes[0]}q_proj.weight' in any layer."
        )
    p = present[0]
    shapes = {n: view.shape(p + n + ".weight") for n in ("q_proj", "k_proj", "v_proj", "out_proj")}
    missing = [n for n, s in shapes.items() if s is None]
    if missing:
        raise ConversionError(
            f"{view.name}: cannot infer the {site} heads: missing "
            + ", ".join(f"'{view.prefix}{p}{n}.weight'" for n in missing)
        )
    q, k, v, o = shapes["q_proj"], shapes["k_proj"], shapes["v_proj"], shapes["out_proj"]
    problems = []
    for n, s in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
        if len(s) != 2 or s[1] != dim or s[0] % hd != 0 or s[0] == 0:
            problems.append(f"{n}.weight {fmt_shape(s)} (expected [n*{hd}, {dim}])")
    if problems:
        raise ConversionError(f"{view.name}: {site} at '{view.prefix}{p}': " + "; ".join(problems))
    hq, hkv = q[0] // hd, k[0] // hd
    if v != k:
        raise ConversionError(
            f"{view.name}: {site} at '{view.prefix}{p}': v_proj.weight {fmt_shape(v)} must equal k_proj.weight "
            f"{fmt_shape(k)}."
        )
    if hq % hkv != 0 and hkv % hq != 0:
        raise ConversionError(
            f"{view.name}: {site} at '{view.prefix}{p}': Hq={hq}, Hkv={hkv}; one must divide the other."
        )
    hout = max(hq, hkv)
    if tuple(o) != (dim, hout * hd):
        raise ConversionError(
            f"{view.name}: {site} at '{view.prefix}{p}': out_proj.weight {fmt_shape(o)}; expected "
            f"[{dim}, {hout * hd}] (max(Hq={hq}, Hkv={hkv}) * hd={hd})."
        )
    return {
        "hq": hq,
        "hkv": hkv,
        "bias": any(view.has(x + "out_proj.bias") for x in prefixes),
        "gated": any(view.has(x + "gate_proj.weight") for x in prefixes),
        "from": view.prefix + p,
    }


def check_rope(view: View, hd: int, base, component: str, report: Report) -> None:
    """Validate the stored RoPE table against `rope_base` and `hd` (docs/conversion.md#order-of-authority; mismatch
    fatal)."""
    inv_keys = sorted(k for k in view.stored if k.endswith("rope.inv_freq"))
    if not inv_keys:
        return
    stored = view.get(inv_keys[0])
    inv = stored.to(torch.float64)
    expected = 1.0 / (float(base) ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if inv.shape != expected.shape:
        raise ConversionError(
            f"{component}: '{view.prefix}{inv_keys[0]}' has {inv.shape[0]} frequencies; expected hd/2={hd // 2}."
        )
    # A table stored in a narrower dtype (bf16, fp16) is the float64 table rounded: allow that dtype's epsilon.
    tolerance = max(1e-4, torch.finfo(stored.dtype).eps) if stored.is_floating_point() else 1e-4
    rel = ((inv - expected).abs() / expected).max().item()
    implied = inv[1].item() ** (-hd / 2) if inv.numel() > 1 and inv[1] > 0 else None
    report.fact(
        component,
        "rope_inv_freq_check",
        {"max_rel_diff": rel, "tolerance": tolerance, "stored_dtype": str(stored.dtype), "implied_base": implied},
        "shape",
        f"{view.prefix}{inv_keys[0]}",
    )
    if rel > tolerance:
        implied_text = f"≈{implied:.6g}" if implied is not None else " (not computable)"
        raise ConversionError(
            f"{component}: RoPE inv_freq in '{view.prefix}{inv_keys[0]}' implies rope_base{implied_text}, but the "
            f"config gives rope_base={base} (max relative difference {rel:.3g} > {tolerance:.3g}, the tolerance of "
            f"its stored dtype {str(stored.dtype).replace('torch.', '')}). Fix rope_base in config.json."
        )


def config_heads(att_type, att_heads, groups, query_groups):
    """(Hq, Hkv) a config states for a site under 0.3.80 semantics, or None if it cannot be resolved."""
    if att_type == "mha":
        return att_heads, att_heads
    if att_type == "mqa":
        return att_heads, 1
    if att_type == "gqa":
        return att_heads, groups
    if att_type == "sqa":
        return (query_groups, groups) if query_groups is not None else None
    return None


# ----------------------------------------------------------------------------------------------------------------


def report_head_conflict(report: Report, component: str, stated: dict, heads, site: dict, note: str) -> None:
    """Record a conflict when the heads a config states differ from the site's `(Hq, Hkv)` in the tensors.

    `stated`: the config's type / groups / query-groups fields as written (their names join into the conflict's
    field); `heads`: the `(Hq, Hkv)` they resolve to (`config_heads`), `None` when they do not resolve."""
    used = (site["hq"], site["hkv"])
    if heads != used:
        report.conflict(
            component, "/".join(stated), {**stated, "Hq_Hkv": heads}, {"Hq": used[0], "Hkv": used[1]}, note
        )
