"""Numerical oracle for the architecture options: every case builds a tiny model, randomises ALL its parameters and
buffers (gates, norm scales, `ema_rms`, biases, so that init values cannot hide a wrong formula) and compares the
model against a naive re-implementation of docs/spec.md#model written from its formulas (explicit per-head and
per-token loops) over the project's state-dict keys: decoder logits, encoder ED, updated STM and MLM logits on real
positions of a batch with one right-padded row. Plus training-mode `ema_rms` updates (docs/spec.md#memory-norms), the
MoE load-balancing loss (docs/spec.md#auxiliary-losses) and the `stm_init` modes (docs/spec.md#short-term-memory)."""
# ruff: noqa: C408 - the option tables read best as dict(...) calls

import math

import pytest
import torch
import torch.nn.functional as F

from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.configuration_rxt import RxTMemoryAttentionConfig
from modeling_rxt.modeling_rxt import RxTMemoryNorm

# ---------------------------------------------------------------------------------------------------------------------
# Oracle (docs/spec.md#model). `sd` = the model's state dict; `p` = a key prefix.
# ---------------------------------------------------------------------------------------------------------------------
ACT = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "sigmoid": torch.sigmoid,
       "tanh": torch.tanh, "linear": lambda x: x}  # fmt: skip


def rms_norm(x, w):
    """docs/spec.md#normalisation: `x / sqrt(mean(x²) + eps) · w`, eps = finfo(dtype).eps."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps) * w


def norm(sd, p, x, use_rms):
    """docs/spec.md#normalisation: RMSNorm or LayerNorm (eps 1e-5)."""
    if use_rms:
        return rms_norm(x, sd[p + "weight"])
    return F.layer_norm(x, x.shape[-1:], sd[p + "weight"], sd[p + "bias"], 1e-5)


def rope(x, base, layout):
    """docs/spec.md#rope: rotate adjacent pairs (2j, 2j+1) of `x [B, H, T, hd]` at positions 0..T−1; write back per
    layout."""
    hd, T = x.shape[-1], x.shape[-2]
    inv = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = (torch.arange(T, dtype=torch.float32)[:, None] * inv[None]).to(x.dtype)
    a, b = x[..., 0::2], x[..., 1::2]
    a2, b2 = a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()
    if layout == "split_concat":
        return torch.cat([a2, b2], -1)
    y = torch.empty_like(x)
    y[..., 0::2], y[..., 1::2] = a2, b2
    return y


def attention(sd, p, xq, xkv, hd, keymask=None, causal=False, rope_q=None, rope_k=None, gate_act=None):
    """docs/spec.md#attention: per output head; Hq > Hkv → kv head ⌊h/(Hq/Hkv)⌋, Hq < Hkv (revSQA) → q head i mod Hq.
    `rope_q`/`rope_k` = (base, layout) or None; `keymask [B, Tk]` True = real key."""
    B, Tq, _ = xq.shape
    Tk = xkv.shape[1]
    q = (xq @ sd[p + "q_proj.weight"].T).view(B, Tq, -1, hd).transpose(1, 2)
    k = (xkv @ sd[p + "k_proj.weight"].T).view(B, Tk, -1, hd).transpose(1, 2)
    v = (xkv @ sd[p + "v_proj.weight"].T).view(B, Tk, -1, hd).transpose(1, 2)
    q = rope(q, *rope_q) if rope_q else q
    k = rope(k, *rope_k) if rope_k else k
    hq, hkv = q.shape[1], k.shape[1]
    masked = torch.zeros(B, Tq, Tk, dtype=torch.bool)
    if keymask is not None:
        masked |= ~keymask[:, None, :]
    if causal:
        masked |= torch.ones(Tq, Tk, dtype=torch.bool).triu(1)
    heads = []
    for i in range(max(hq, hkv)):
        qi, ki = (i, i // (hq // hkv)) if hq >= hkv else (i % hq, i)
        scores = (q[:, qi] @ k[:, ki].transpose(-1, -2) / math.sqrt(hd)).masked_fill(masked, float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, ki])
    o = torch.stack(heads, 2).reshape(B, Tq, -1)
    if gate_act is not None:
        o = o * ACT[gate_act](xq @ sd[p + "gate_proj.weight"].T)
    y = o @ sd[p + "out_proj.weight"].T
    return y + sd[p + "out_proj.bias"] if p + "out_proj.bias" in sd else y


def feed_forward(sd, p, x, gated, act, width):
    """docs/spec.md#feed-forward: dense `fc2(act(fc1 x))` or gated `fc2(a[:F] · act(a[F:]))`; biases where the
    checkpoint has them."""
    a = x @ sd[p + "fc1.weight"].T + sd.get(p + "fc1.bias", 0)
    h = a[..., :width] * ACT[act](a[..., width:]) if gated else ACT[act](a)
    return h @ sd[p + "fc2.weight"].T + sd.get(p + "fc2.bias", 0)


def moe(sd, p, x, c, aux_losses=None):
    """docs/spec.md#mixture-of-experts, one token and one selected expert at a time. Appends the layer's aux loss to
    `aux_losses`."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    N, E, K, Ns, Fd = x.shape[0], c.num_experts, c.moe_top_k, c.num_shared_experts, c.ff_dim
    probs = (x @ sd[p + "router.weight"].T).softmax(-1)
    pk, ek = probs.topk(K, -1)
    w = pk / (pk.sum(-1, keepdim=True) + 1e-9)
    y = torch.zeros_like(x)
    for n in range(N):
        for j in range(K):
            e = ek[n, j].item()
            a = x[n] @ sd[p + "w1"][e] + (sd[p + "b1"][e] if p + "b1" in sd else 0)
            h = a[:Fd] * ACT[c.ff_activation](a[Fd:]) if c.use_gated else ACT[c.ff_activation](a)
            y[n] += w[n, j] * (h @ sd[p + "w2"][e] + (sd[p + "b2"][e] if p + "b2" in sd else 0))
    weighted = c.moe_use_weighted_shared_experts and Ns > 0
    if weighted:
        y = y * (K / (K + Ns))
    y = y + sd.get(p + "global_bias", 0)  # docs/spec.md#shared-experts: never scaled
    shared_gate_loss = 0.0
    if Ns > 0:
        Fs = c.shared_expert_dim or Fd
        if Ns == 1:
            shared = feed_forward(sd, p + "shared_expert.", x, c.use_gated, c.ff_activation, Fs)
        else:
            mix = (x @ sd[p + "shared_expert_gate.weight"].T).softmax(-1)
            shared_gate_loss = (mix - 1 / Ns).abs().mean()
            shared = 0
            for s in range(Ns):
                a = x @ sd[p + "shared_w1"][s] + (sd[p + "shared_b1"][s] if p + "shared_b1" in sd else 0)
                h = a[..., :Fs] * ACT[c.ff_activation](a[..., Fs:]) if c.use_gated else ACT[c.ff_activation](a)
                out = h @ sd[p + "shared_w2"][s] + (sd[p + "shared_b2"][s] if p + "shared_b2" in sd else 0)
                shared = shared + mix[:, s : s + 1] * out
        shared = shared + sd.get(p + "shared_experts_bias", 0)
        y = y + (shared * (Ns / (K + Ns)) if weighted else shared)
    # docs/spec.md#auxiliary-losses: f_e over N·K assignments, P̄_e over the tokens that selected e
    if aux_losses is not None:
        aux = 0.0
        for e in range(E):
            chosen = (ek == e).any(-1)
            count = chosen.sum().item()
            if count:
                aux = aux + (count / (N * K)) * probs[chosen, e].mean()
        aux_losses.append(E * aux + shared_gate_loss)
    return y.view(shape)


def layer(sd, p, h, c, layout, kind="memory", stm_l=None, keymask=None, causal=True, aux_losses=None):
    """Pre-norm block (docs/spec.md#memory-layer, docs/spec.md#stateless-layers, docs/spec.md#encoder-and-mlm-head):
    self-attn, [memory cross-attn], FF (dense, gated or MoE)."""
    hd = c.embed_dim // c.att_heads
    r = (float(c.rope_base), layout) if c.use_rope else None
    gate_act = c.gated_attention_activation if c.use_gated_attention else None
    x = norm(sd, p + "norm1.", h, c.use_rms_norm)
    h = h + attention(sd, p + "attention.", x, x, hd, keymask, causal, r, r, gate_act)
    if stm_l is not None:  # RoPE on q only, no mask; gating per use_gated_cross_attention (None → self setting)
        x = norm(sd, p + "norm2.", h, c.use_rms_norm)
        m = norm(sd, p + "stm_norm.", stm_l, c.use_rms_norm)
        cross_gated = c.use_gated_attention if c.use_gated_cross_attention is None else c.use_gated_cross_attention
        h = h + attention(sd, p + "memory_cross_attention.", x, m, hd, rope_q=r,
                          gate_act=c.gated_attention_activation if cross_gated else None)  # fmt: skip
    x = norm(sd, p + "norm3.", h, c.use_rms_norm)
    if kind == "dense":
        return h + feed_forward(sd, p + "ff.", x, c.use_gated, c.ff_activation, c.dense_layer_dim)
    if c.use_moe:
        return h + moe(sd, p + "ff.", x, c, aux_losses)
    return h + feed_forward(sd, p + "ff.", x, c.use_gated, c.ff_activation, c.ff_dim)


def decoder_logits(sd, cfg, ids, mask, stm, aux=None):
    """docs/spec.md#stack-and-head: stateless → memory layers (STM[i]) → final stateless → head norm → head. Causal +
    key padding (docs/spec.md#masks). `aux` (dict) collects the MoE losses of 'leading' (stateless + memory layers) and
    'final' layers."""
    c, km, h = cfg.decoder_config, mask.bool(), sd["model.embed_tokens.weight"][ids]
    lead, final = (aux.setdefault("leading", []), aux.setdefault("final", [])) if aux is not None else (None, None)
    for j, kind in enumerate(c.stateless_layers_config or []):
        h = layer(sd, f"model.decoder.stateless_layers.{j}.", h, c, cfg.rope_layout, kind, keymask=km, aux_losses=lead)
    for i in range(c.num_layers):
        h = layer(sd, f"model.decoder.layers.{i}.", h, c, cfg.rope_layout, stm_l=stm[i], keymask=km, aux_losses=lead)
    for j, kind in enumerate(c.final_stateless_layers_config or []):
        h = layer(sd, f"model.decoder.final_stateless_layers.{j}.", h, c, cfg.rope_layout, kind, keymask=km,
                  aux_losses=final)  # fmt: skip
    if c.use_head_norm:
        h = norm(sd, "model.decoder.head_norm.", h, c.head_norm_type == "rms_norm")
    return h @ sd["lm_head.weight"].T + sd["lm_head.bias"]


def encode(sd, cfg, ids, mask):
    """docs/spec.md#encoder-and-mlm-head: bidirectional, key padding; ED = stack of every layer's un-normalised output
    `[L, B, T, D]`."""
    c, h, ed = cfg.encoder_config, sd["model.embed_tokens.weight"][ids], []
    for i in range(c.num_layers):
        h = layer(sd, f"model.encoder.layers.{i}.", h, c, cfg.rope_layout, keymask=mask.bool(), causal=False)
        ed.append(h)
    return torch.stack(ed)


def mlm_logits(sd, h):
    """docs/spec.md#encoder-and-mlm-head: `decoder(layer_norm(gelu(dense(h))))`."""
    x = F.gelu(h @ sd["mlm_head.dense.weight"].T + sd["mlm_head.dense.bias"])
    x = F.layer_norm(x, x.shape[-1:], sd["mlm_head.layer_norm.weight"], sd["mlm_head.layer_norm.bias"], 1e-5)
    return x @ sd["mlm_head.decoder.weight"].T + sd["mlm_head.decoder.bias"]


def memory_norm(sd, p, x, m, training=False):
    """docs/spec.md#memory-norms. In training mode `adaptive`/`positional` first update `sd[p + 'ema_rms']` (in place
    in `sd`)."""
    if m.norm_type == "classic-rms":
        return rms_norm(x, sd[p + "weight"])
    if m.norm_type == "layer":
        n = F.layer_norm(x, x.shape[-1:], sd[p + "norm.weight"], sd[p + "norm.bias"], 1e-5) * sd[p + "scale"]
    elif m.norm_type == "positional":
        if training:  # r̄ = mean over B of the per-slot RMS, [S, 1]
            r = torch.sqrt((x * x).mean(-1, keepdim=True)).mean(0)
            sd[p + "ema_rms"] = m.norm_decay * sd[p + "ema_rms"] + (1 - m.norm_decay) * r
        n = x * torch.rsqrt(sd[p + "ema_rms"] + 1e-6) * sd[p + "scale"]
    elif m.norm_type == "adaptive" and training:  # one scalar RMS over B, S, D
        c = torch.sqrt((x * x).mean())
        sd[p + "ema_rms"] = m.norm_decay * sd[p + "ema_rms"] + (1 - m.norm_decay) * c
        n = x * torch.rsqrt(sd[p + "ema_rms"] + 1e-6) * sd[p + "scale"]
    else:  # rms, adaptive in eval: per-slot sqrt of the RMS
        n = x * torch.rsqrt(torch.sqrt((x * x).mean(-1, keepdim=True)) + 1e-6) * sd[p + "scale"]
    g = torch.sigmoid(sd[p + "gate"])
    return g * n + (1 - g) * x


def residual_gate(sd, p, old, new, m, enabled):
    """docs/spec.md#residual-gates: `old + new` when disabled, else gate value z (static / elementwise / linear, status
    from old + new) through sigmoid `g·new + (1−g)·old` or tanh `(1+g)·new + (1−g)·old`."""
    if not enabled:
        return old + new
    s_in = old + new
    if m.residual_gate_slot_status_type == "linear":
        status = s_in @ sd[p + "slot_status.weight"].T + sd[p + "slot_status.bias"]  # [B, S, 1]
    else:
        status = s_in.mean(-1, keepdim=True)
    if m.residual_gate_type == "static":
        z = sd[p + "gate"]
    elif m.residual_gate_type == "elementwise":
        z = sd[p + "gate"] * (status if m.residual_per_slot_gate else s_in.mean(dim=(1, 2), keepdim=True))
    else:
        z = (status.squeeze(-1) @ sd[p + "gate.weight"].T + sd[p + "gate.bias"]).unsqueeze(-1)
    if m.use_tanh_residual_gate:
        g = torch.tanh(z)
        return (1 + g) * new + (1 - g) * old
    g = torch.sigmoid(z)
    return g * new + (1 - g) * old


def memory_update(sd, cfg, stm, ed, mask, training=False):
    """docs/spec.md#main-update, docs/spec.md#variants: every layer from the pre-update STM; pre-step per variant, then
    main attention (RoPE on ED keys)."""
    m, v, P = cfg.memory_attention_config, cfg.memory_attention_variant, "model.memory_attention."
    L, hd = stm.shape[0], m.embed_dim // m.att_heads
    G = m.num_groups if v == "grouped-self-interlayer" else 1
    if v in ("interlayer", "self-interlayer", "grouped-self-interlayer"):
        n = L // G
        means = [memory_norm(sd, P + "mean_stm_norm.", stm[g * n : (g + 1) * n].mean(0), m, training) for g in range(G)]
    out = []
    for l in range(L):
        s = stm[l]
        if v == "simple":
            X = s
        elif v == "self":
            Pn = memory_norm(sd, P + f"self_memory_norm_layers.{l}.", s, m, training)
            A = attention(sd, P + f"self_attention_layers.{l}.", Pn, Pn, hd)
            X = residual_gate(sd, P + f"self_residual_gate_layers.{l}.", s, A, m, m.use_gate_for_self_attention)
        else:
            M = means[l // (L // G)]
            Pn = memory_norm(sd, P + f"mean_memory_norm_layers.{l}.", s, m, training)
            C = M if v == "interlayer" else residual_gate(sd, P + f"interlayer_gate_layers.{l}.", Pn, M, m,
                                                           m.use_gated_residual)  # fmt: skip
            A = attention(sd, P + f"mean_attention_layers.{l}.", Pn, C, hd)
            X = residual_gate(sd, P + f"mean_residual_gate_layers.{l}.", s, A, m, m.use_gated_residual)
        Q = memory_norm(sd, P + f"memory_norm_layers.{l}.", X, m, training)
        KV = rms_norm(ed[l], sd[P + f"memory_input_norm_layers.{l}.weight"])
        U = attention(sd, P + f"attention_layers.{l}.", Q, KV, hd, keymask=mask.bool(),
                      rope_k=(float(m.rope_base), cfg.rope_layout))  # fmt: skip
        if v == "simple" and m.disable_residual:
            out.append(U)
        else:
            out.append(residual_gate(sd, P + f"residual_gate_layers.{l}.", X, U, m, m.use_gated_residual))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------------
MOE = dict(use_moe=True, num_experts=4, moe_top_k=2, ff_dim=16)
CASES = {
    "base": {},
    "split-concat-rope": dict(rope_layout="split_concat", decoder=dict(use_head_norm=False)),
    "nope-layernorm-dense-ff": dict(
        decoder=dict(use_rope=False, use_rms_norm=False, use_gated=False, ff_activation="gelu",
                     head_norm_type="layer_norm"),
        encoder=dict(use_rope=False, use_rms_norm=False, use_gated=False, ff_activation="relu")),
    "gated-attn-tanh-silu": dict(
        decoder=dict(use_gated_attention=True, gated_attention_activation="tanh", use_gated_cross_attention=False,
                     use_attention_output_bias=False),
        encoder=dict(use_gated_attention=True, gated_attention_activation="silu")),
    "gated-cross-only-gelu": dict(decoder=dict(use_gated_cross_attention=True, gated_attention_activation="gelu"),
                                  encoder=dict(use_gated_attention=True, gated_attention_activation="relu")),
    "revsqa-gqa-mqa": dict(
        decoder=dict(att_query_groups=1, att_groups=4, cross_att_type="mqa"),
        encoder=dict(self_att_type="gqa", att_groups=2),
        memory_attention=dict(att_type="sqa", att_query_groups=1, att_groups=2, interlayer_att_type="mha")),
    "rope-bases": dict(decoder=dict(rope_base=100000), encoder=dict(rope_base=500), memory_attention=dict(rope_base=777)),
    "simple-disable-residual": dict(memory_attention_variant="simple", memory_attention=dict(disable_residual=True)),
    "simple-ungated": dict(memory_attention_variant="simple", memory_attention=dict(use_gated_residual=False)),
    "simple-static-tanh-shared": dict(memory_attention_variant="simple", memory_attention=dict(
        residual_gate_type="static", use_tanh_residual_gate=True, residual_per_slot_gate=False)),
    "self-rms-selfgate-elementwise-tanh": dict(memory_attention_variant="self", memory_attention=dict(
        norm_type="rms", use_gate_for_self_attention=True, residual_gate_type="elementwise",
        residual_per_slot_gate=False, use_tanh_residual_gate=True)),
    "self-ungated-main-linear-selfgate": dict(memory_attention_variant="self", memory_attention=dict(
        use_gated_residual=False, use_gate_for_self_attention=True, residual_gate_type="linear",
        self_att_query_groups=1, self_att_groups=2)),
    "interlayer-layernorm-linear-shared-tanh": dict(memory_attention_variant="interlayer", memory_attention=dict(
        norm_type="layer", residual_gate_type="linear", residual_per_slot_gate=False, use_tanh_residual_gate=True)),
    "self-interlayer-adaptive-linear-status": dict(memory_attention=dict(
        norm_type="adaptive", residual_gate_type="linear", residual_gate_slot_status_type="linear")),
    "self-interlayer-ungated-positional": dict(memory_attention=dict(use_gated_residual=False, norm_type="positional")),
    "grouped-positional-elementwise-linear-status": dict(
        num_layers=4, memory_attention_variant="grouped-self-interlayer",
        memory_attention=dict(num_groups=2, norm_type="positional", residual_gate_type="elementwise",
                              residual_gate_slot_status_type="linear")),
    "grouped-positional-per-dim-static": dict(
        num_layers=4, memory_attention_variant="grouped-self-interlayer",
        memory_attention=dict(num_groups=4, norm_type="positional", norm_per_dim_scale=True,
                              residual_gate_type="static")),
    "moe-global-shared1": dict(decoder=dict(**MOE, num_shared_experts=1, shared_expert_dim=12)),
    "moe-local-shared2-weighted-global-shared-bias": dict(decoder=dict(
        **MOE, num_shared_experts=2, moe_bias_mode="local", moe_shared_experts_bias_mode="global",
        moe_use_weighted_shared_experts=True)),
    "moe-top1-off-shared0": dict(decoder=dict(**{**MOE, "moe_top_k": 1}, num_shared_experts=0, moe_bias_mode="off")),
    "moe-dense-experts-weighted-shared1": dict(decoder=dict(
        **MOE, use_gated=False, ff_activation="relu", num_shared_experts=1, moe_shared_experts_bias_mode="off",
        moe_use_weighted_shared_experts=True)),
    "moe-shared3-local-weighted": dict(decoder=dict(
        **MOE, num_shared_experts=3, moe_bias_mode="global", moe_shared_experts_bias_mode="local",
        moe_use_weighted_shared_experts=True)),
    "moe-stateless-layers": dict(decoder=dict(
        **MOE, stateless_layers_config=["dense", "moe"], final_stateless_layers_config=["moe", "dense"],
        dense_layer_dim=24)),
    "dense-stateless-layers": dict(decoder=dict(
        stateless_layers_config=["moe", "dense"], final_stateless_layers_config=["moe"], dense_layer_dim=24)),
    "moe-encoder": dict(encoder=dict(**MOE, num_shared_experts=1)),
}  # fmt: skip


def make_config(kw, **extra) -> RxTConfig:
    kw = {k: dict(v) if isinstance(v, dict) else v for k, v in kw.items()}
    num_layers = kw.pop("num_layers", 2)
    return RxTConfig.tiny(num_layers=num_layers, use_mlm_head=True, **kw, **extra)


def randomised_model(cfg: RxTConfig, dtype: torch.dtype, seed: int = 1) -> RxTForCausalLM:
    """Every floating parameter and buffer redrawn: N(0, σ²) (σ 0.5 fp64, 0.15 fp32), `ema_rms` U[0.5, 1.5)."""
    torch.manual_seed(0)
    model = RxTForCausalLM(cfg).eval().to(dtype)
    g, scale = torch.Generator().manual_seed(seed), 0.5 if dtype == torch.float64 else 0.15
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dtype.is_floating_point:
                if name.endswith("ema_rms"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * scale)
    return model


def inputs(cfg: RxTConfig, dtype: torch.dtype, B: int = 2, T: int = 10, seed: int = 2):
    """ids `[B, T]`, mask with row 1 right-padded from position 7, random STM `[L, B, S, D]`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, cfg.decoder_config.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0
    stm = torch.randn(*cfg.stm_shape[:1], B, *cfg.stm_shape[1:], generator=g).to(dtype)
    return ids, mask, stm


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(CASES))
def test_model_matches_spec_formulas(name):
    """Decoder logits, ED, updated STM and MLM logits equal the oracle (fp64 atol 1e-10; MoE fp32 atol 1e-5)."""
    cfg = make_config(CASES[name])
    dtype, atol = (torch.float32, 1e-5) if name.startswith("moe") else (torch.float64, 1e-10)  # grouped GEMM: fp32
    model = randomised_model(cfg, dtype)
    sd = snapshot(model)
    ids, mask, stm = inputs(cfg, dtype)
    real = mask.bool()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, stm=stm.clone()).logits
        ed = model.encode(ids, attention_mask=mask)
        updated = model.update_memory(ids, attention_mask=mask, stm=stm.clone())
        mlm = model.mlm_logits(ids, attention_mask=mask)
        want_ed = encode(sd, cfg, ids, mask)
        checks = {
            "logits": (logits[real], decoder_logits(sd, cfg, ids, mask, stm)[real]),
            "ED": (ed[:, real], want_ed[:, real]),
            "STM": (updated, memory_update(sd, cfg, stm, want_ed, mask)),
            "MLM": (mlm[real], mlm_logits(sd, want_ed[-1])[real]),
        }
    for what, (got, want) in checks.items():
        torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda m, what=what: f"{name} {what}: {m}")


# ---------------------------------------------------------------------------------------------------------------------
# Training mode: ema_rms updates (docs/spec.md#memory-norms)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_type,per_dim", [("adaptive", False), ("positional", False), ("positional", True)])
def test_memory_norm_training_updates_ema_before_use(norm_type, per_dim):
    """Two training-mode calls: output and `ema_rms` follow the EMA-then-normalise recurrence; eval uses the buffer."""
    m = RxTMemoryAttentionConfig(num_layers=2, embed_dim=16, att_heads=2, stm_size=5, norm_type=norm_type,
                                 norm_decay=0.7, norm_per_dim_scale=per_dim)  # fmt: skip
    module = RxTMemoryNorm(m).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name == "ema_rms" else torch.randn(t.shape, generator=g))
    sd = snapshot(module)
    module.train()
    for step in range(2):
        x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64) * (1 + 2 * step)
        with torch.no_grad():
            y = module(x)
        want = memory_norm(sd, "", x, m, training=True)
        torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(module.ema_rms, sd["ema_rms"], rtol=0, atol=1e-12)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), memory_norm(sd, "", x, m), rtol=0, atol=1e-12)
    torch.testing.assert_close(module.ema_rms, sd["ema_rms"], rtol=0, atol=0)  # eval leaves the buffer alone


@pytest.mark.parametrize("norm_type", ["adaptive", "positional"])
def test_training_memory_update_updates_every_ema_buffer(norm_type):
    """A training-mode memory update (self-interlayer) equals the oracle's, and so does every `ema_rms` after it."""
    cfg = make_config(dict(memory_attention=dict(norm_type=norm_type, norm_decay=0.6)))
    model = randomised_model(cfg, torch.float64)
    sd = snapshot(model)
    ids, mask, stm = inputs(cfg, torch.float64)
    model.train()
    with torch.no_grad():
        updated = model(ids, attention_mask=mask, stm=stm.clone(), mode="memory_update").stm
        want = memory_update(sd, cfg, stm, encode(sd, cfg, ids, mask), mask, training=True)
    torch.testing.assert_close(updated, want, rtol=0, atol=1e-10)
    buffers = dict(model.named_buffers())
    ema = [k for k in buffers if k.endswith("ema_rms")]
    assert len(ema) == 5
    for key in ema:
        torch.testing.assert_close(buffers[key], sd[key], rtol=0, atol=1e-12, msg=lambda m, key=key: f"{key}: {m}")


# ---------------------------------------------------------------------------------------------------------------------
# MoE auxiliary loss (docs/spec.md#auxiliary-losses)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aux_layers,num_shared", [("all", 1), ("reference", 2), ("all", 3)])
def test_moe_aux_loss_formula(aux_layers, num_shared):
    """`aux_loss` = mean over the MoE layers of E·Σ f_e·P̄_e (+ shared-gate loss when Ns > 1);
    `moe_aux_layers='reference'` leaves the final stateless layers out. Eval outputs carry no aux loss."""
    cfg = make_config(
        dict(decoder=dict(**{**MOE, "num_experts": 5}, num_shared_experts=num_shared, dense_layer_dim=24,
                          stateless_layers_config=["moe", "dense"], final_stateless_layers_config=["moe"])),
        moe_aux_layers=aux_layers,
    )  # fmt: skip
    model = randomised_model(cfg, torch.float32)
    sd = snapshot(model)
    ids, mask, stm = inputs(cfg, torch.float32)
    # every position is routed, but padded rows' hidden states are unspecified (docs/spec.md#padding-semantics)
    mask = torch.ones_like(mask)
    model.train()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, stm=stm.clone())
        aux = {}
        logits = decoder_logits(sd, cfg, ids, mask, stm, aux)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-5)
    assert len(aux["leading"]) == 3 and len(aux["final"]) == 1
    layers = aux["leading"] + (aux["final"] if aux_layers == "all" else [])
    torch.testing.assert_close(out.aux_loss, torch.stack(layers).mean(), rtol=0, atol=1e-6)
    model.eval()
    with torch.no_grad():
        assert model(ids, attention_mask=mask, stm=stm.clone()).aux_loss is None


# ---------------------------------------------------------------------------------------------------------------------
# stm_init (docs/spec.md#short-term-memory)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["standard", "normal", "uniform", "ones", "zeros"])
def test_stm_init_modes(mode):
    """Initial STM has the documented distribution, is the same for every batch row, and is what the decoder reads
    when no STM is passed."""
    cfg = make_config({}, stm_init=mode, stm_size=64)
    model = randomised_model(cfg, torch.float64)
    stm = model.initial_stm(2)
    assert stm.shape == (2, 2, 64, 32) and stm.dtype == torch.float64
    torch.testing.assert_close(stm[:, 0], stm[:, 1], rtol=0, atol=0)
    x = stm[:, 0]
    if mode in ("ones", "zeros"):
        assert torch.equal(x, torch.full_like(x, float(mode == "ones")))
    elif mode == "uniform":  # U[0, 0.02): mean 0.01, std 0.02/√12
        assert 0 <= x.min() and x.max() < 0.02
        assert abs(x.mean() - 0.01) < 5e-4 and abs(x.std() - 0.02 / math.sqrt(12)) < 3e-4
    else:
        sigma = 1.0 if mode == "standard" else 0.02
        assert abs(x.mean()) < 0.06 * sigma and abs(x.std() / sigma - 1) < 0.05
    torch.testing.assert_close(model.initial_stm(2), stm, rtol=0, atol=0)  # deterministic
    ids, mask, _ = inputs(cfg, torch.float64)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    want = decoder_logits(snapshot(model), cfg, ids, mask, stm)
    torch.testing.assert_close(logits[mask.bool()], want[mask.bool()], rtol=0, atol=1e-10)
