"""Reactive Transformer (RxT) for transformers.

One turn (event): the decoder answers the query while reading the fixed-size Short-Term Memory (STM, `[L, B, S, D]`)
through memory cross-attention (memory K/V projected once per turn); afterwards the memory encoder encodes
query + answer (`ED [L, B, T, D]`) and the memory-attention network writes it into the STM.

Modules follow the reference maths exactly (see the project's docs/architecture.md). Shapes: `B` batch, `T` tokens,
`D` width, `L` memory layers, `S` STM slots, `Hq`/`Hkv` query / key-value heads, `hd` head dim.

This file is self-contained apart from its flat siblings (`configuration_rxt.py`, `cache_rxt.py`); it is copied into
saved model folders for `trust_remote_code`.
"""

from __future__ import annotations

import inspect
import math
import os
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.utils import ModelOutput, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .cache_rxt import RxTCache
from .configuration_rxt import RxTComponentConfig, RxTConfig, RxTMemoryAttentionConfig, RxTStatelessConfig
from .tokenization_rxt import RXT_TOKEN_ID_FIELDS, check_rxt_tokenizer

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the KV-cache keyword `past_key_values` to `cache` (model arguments, output fields and
# generate()'s model kwargs). RxT uses `cache` and runs on both sides of the rename: `CACHE_KWARG` is the name the
# installed transformers passes around.
CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


# `forward(past_key_values=...)` is the pre-5.24 name of `cache`: renamed, with a FutureWarning; both at once is an error
# (PEFT prefix tuning / P-tuning / CPT add their own virtual-token cache, which would drop the STM).
_rename_past_key_values = deprecate_kwarg(
    "past_key_values",
    version="5.40.0",
    new_name="cache",
    raise_if_both_names=True,
    additional_message="Pass the RxTCache once, as `cache` (PEFT prefix tuning / P-tuning / CPT replace the KV cache "
    "and would drop the STM: use a LoRA-family adapter instead).",
)


def accept_past_key_values(forward: Callable) -> Callable:
    """`deprecate_kwarg("past_key_values", new_name="cache")` on `forward`, its signature computed once (generate()
    inspects forward's signature on every step for remote-code models)."""
    renamed = _rename_past_key_values(forward)
    renamed.__signature__ = inspect.signature(forward)
    return renamed


# ---------------------------------------------------------------------------------------------------------------------
# Small building blocks
# ---------------------------------------------------------------------------------------------------------------------
def make_norm(dim: int, use_rms_norm: bool) -> nn.Module:
    """RMSNorm with the input dtype's finfo eps (reference convention), or LayerNorm with eps 1e-5."""
    return nn.RMSNorm(dim, eps=None) if use_rms_norm else nn.LayerNorm(dim)


class RxTRotaryEmbedding(nn.Module):
    """RoPE angles for one component (docs/spec.md#rope). No buffers: `inv_freq` (R values) is computed once per
    device."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim = head_dim
        self.base = float(base)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """`1 / base^(2j / hd)`, `[R]` fp32 (computed once per device)."""
        if device not in self._inv_freq:
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
            self._inv_freq[device] = 1.0 / (self.base**exponent)
        return self._inv_freq[device]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`position_ids [B, T]` → `(cos, sin)`, each `[B, 1, T, hd/2]` in `dtype`."""
        angles = (position_ids[..., None].float() * self.inv_freq(position_ids.device)).to(dtype)  # [B, T, R]
        return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate adjacent pairs `(2j, 2j+1)` of `x [B, H, T, hd]`; write them back `interleaved` or `split_concat`."""
    if (  # view_as_complex needs fp32 here (complex32 support is partial), contiguous pairs, even offset and strides
        not torch.compiler.is_compiling()  # first: storage_offset() would break a compiled graph
        and layout == "interleaved"
        and x.dtype == torch.float32
        and x.stride(-1) == 1
        and x.storage_offset() % 2 == 0
        and all(stride % 2 == 0 for stride in x.stride()[:-1])
    ):
        # The same rotation as one complex multiply (pair j = a + ib times cos + i·sin): 2-4× fewer kernels, which
        # is what a decode step pays for on CPU. Compiled graphs keep the real form.
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))  # [B, H, T, hd/2]
        return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)
    a, b = x[..., 0::2], x[..., 1::2]
    rotated_a = a * cos - b * sin
    rotated_b = a * sin + b * cos
    if layout == "interleaved":
        return torch.stack((rotated_a, rotated_b), dim=-1).flatten(-2)
    return torch.cat((rotated_a, rotated_b), dim=-1)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`q [B, Hq, Tq, hd]`, `k, v [B, Hkv, Tk, hd]` → `([B, Tq, Hq, hd], weights)`; kv heads repeat-interleaved."""
    groups = module.num_key_value_groups
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


# ---------------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------------
class RxTAttention(nn.Module):
    """Projections + attention core of one site, for any `(Hq, Hkv)` (MHA/GQA/MQA/SQA/sSQA/xSQA/revSQA).

    `Hq > Hkv`: kv heads are shared by consecutive q heads; `Hq < Hkv` (revSQA): q heads are tiled to `Hkv`.
    The merged output has `Hout = max(Hq, Hkv)` heads; with gating it is multiplied by `act(gate_proj(x_q))`
    before `out_proj`. Used directly by the memory-attention network; subclassed for the decoder / encoder.
    """

    is_causal = False

    def __init__(
        self,
        config,
        embed_dim: int,
        head_dim: int,
        heads: tuple[int, int],
        out_bias: bool = True,
        gated: bool = False,
        gate_activation: str = "sigmoid",
        dropout: float = 0.0,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.config = config  # carries `_attn_implementation`
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.num_heads, self.num_key_value_heads = heads
        self.num_out_heads = max(heads)
        self.query_repeats = self.num_out_heads // self.num_heads  # > 1 only for revSQA
        self.num_key_value_groups = self.num_out_heads // self.num_key_value_heads
        self.scaling = head_dim**-0.5
        self.dropout = float(dropout)
        self.q_proj = nn.Linear(embed_dim, self.num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, self.num_key_value_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, self.num_key_value_heads * head_dim, bias=False)
        self.out_proj = nn.Linear(self.num_out_heads * head_dim, embed_dim, bias=out_bias)
        if gated:
            self.gate_proj = nn.Linear(embed_dim, self.num_out_heads * head_dim, bias=False)
            self.gate_proj._rxt_gate_init = True  # N(1, 0.01), docs/spec.md#gated-attention (see init_rxt_weights)
            self.gate_activation = ACT2FN[gate_activation]
        else:
            self.gate_proj = None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, n·hd]` → `[B, n, T, hd]`."""
        return x.view(*x.shape[:2], -1, self.head_dim).transpose(1, 2)

    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        return self._split(self.q_proj(x))

    def project_key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`x [B, Tk, D]` → `k, v [B, Hkv, Tk, hd]`."""
        return self._split(self.k_proj(x)), self._split(self.v_proj(x))

    def attend(
        self,
        x_query: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        is_causal: bool,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention over heads → `([B, Tq, D], weights [B, Hout, Tq, Tk] or None)` (weights from eager attention;
        the fused kernels return None)."""
        if self.query_repeats > 1:
            query = query.repeat(1, self.query_repeats, 1, 1)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=is_causal,
            **kwargs,
        )
        return self.project_output(x_query, output.reshape(*x_query.shape[:2], -1)), weights

    def project_output(self, x_query: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Merged heads `output [B, Tq, Hout·hd]` → `[B, Tq, D]` (times `act(gate_proj(x_query))` if gated)."""
        if self.gate_proj is not None:
            output = output * self.gate_activation(self.gate_proj(x_query))
        return self.out_proj(output)

    def forward(
        self,
        x_query: torch.Tensor,
        x_key_value: torch.Tensor,
        attention_mask=None,
        key_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        rope_layout: str = "interleaved",
    ) -> torch.Tensor:
        """Memory-attention site: `x_query [B, S, D]`, `x_key_value [B, Tk, D]`; RoPE on keys only if given."""
        query = self.project_query(x_query)
        key, value = self.project_key_value(x_key_value)
        if key_position_embeddings is not None:
            key = apply_rotary(key, *key_position_embeddings, rope_layout)
        return self.attend(x_query, query, key, value, attention_mask, is_causal=False)[0]


class RxTSelfAttention(RxTAttention):
    """Decoder (causal) or encoder (bidirectional) self-attention; RoPE on q and k; KV cached during generation."""

    def __init__(self, config: RxTComponentConfig, layer_idx: int, is_causal: bool, rope_layout: str, attn_config):
        super().__init__(
            attn_config,
            config.embed_dim,
            config.head_dim,
            config.self_attention_heads,
            out_bias=config.use_attention_output_bias,
            gated=config.use_gated_attention,
            gate_activation=config.gated_attention_activation,
            dropout=config.att_dropout,
            layer_idx=layer_idx,
        )
        self.is_causal = is_causal
        self.rope_layout = rope_layout

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        """`hidden_states [B, T, D]` → `([B, T, D], weights [B, Hout, T, T_past + T] or None)`."""
        query = self.project_query(hidden_states)
        key, value = self.project_key_value(hidden_states)
        if position_embeddings is not None:
            query = apply_rotary(query, *position_embeddings, self.rope_layout)
            key = apply_rotary(key, *position_embeddings, self.rope_layout)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        return self.attend(hidden_states, query, key, value, attention_mask, is_causal=self.is_causal, **kwargs)


class RxTMemoryCrossAttention(RxTAttention):
    """Decoder memory cross-attention: queries from tokens (RoPE on q only), keys/values from the STM (no mask)."""

    def __init__(self, config: RxTComponentConfig, rope_layout: str, attn_config):
        super().__init__(
            attn_config,
            config.embed_dim,
            config.head_dim,
            config.cross_attention_heads,
            out_bias=config.use_attention_output_bias,
            gated=config.gated_cross_attention,
            gate_activation=config.gated_attention_activation,
            dropout=config.att_dropout,
        )
        self.rope_layout = rope_layout

    def forward(self, hidden_states, memory_key_value, position_embeddings=None):
        """`hidden_states [B, T, D]`, memory `k, v [B, Hkv, S, hd]` → `([B, T, D], weights [B, Hout, T, S] or None)`."""
        query = self.project_query(hidden_states)
        if position_embeddings is not None:
            query = apply_rotary(query, *position_embeddings, self.rope_layout)
        key, value = memory_key_value
        if (
            query.shape[2] == 1
            and self.query_repeats == 1
            and not self.training
            and self.config._attn_implementation == "sdpa"
            and torch.compiler.is_compiling()
        ):  # a compiled decode step: the compiler fuses this read into one kernel (docs/benchmarks.md, static decode)
            return self.project_output(hidden_states, read_memory_one_query(query, key, value, self.scaling)), None
        # No **kwargs: packed-sequence kwargs of self-attention must never reach the memory call.
        return self.attend(hidden_states, query, key, value, None, is_causal=False)


def read_memory_one_query(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of one query per row over the memory slots, as multiply-reduce: `query [B, Hq, 1, hd]`, `key, value
    [B, Hkv, S, hd]` (q heads `g·j … g·j + g − 1` read kv head `j`, `g = Hq / Hkv`) → merged heads `[B, 1, Hq·hd]`.
    Equal to SDPA; compiled, it becomes one fused loop, where torch's CPU SDPA kernel for a single query costs more
    than the rest of the memory sub-layer."""
    batch, heads, _, head_dim = query.shape
    query = query.view(batch, key.shape[1], -1, head_dim, 1)  # [B, Hkv, g, hd, 1]
    scores = (query * key.transpose(-1, -2).unsqueeze(2)).sum(-2) * scaling  # [B, Hkv, g, S]
    weights = scores.softmax(-1, dtype=torch.float32).to(value.dtype)
    output = (weights.unsqueeze(-1) * value.unsqueeze(2)).sum(-2)  # [B, Hkv, g, hd]
    return output.reshape(batch, 1, heads * head_dim)


# ---------------------------------------------------------------------------------------------------------------------
# Feed-forward and Mixture of Experts
# ---------------------------------------------------------------------------------------------------------------------
class RxTFeedForward(nn.Module):
    """Dense `fc2(act(fc1(x)))` or gated `fc2(l · act(g))` with `[l | g] = fc1(x)` (first half linear)."""

    def __init__(self, embed_dim: int, ff_dim: int, gated: bool, activation: str, dropout: float, bias: bool = True):
        super().__init__()
        self.ff_dim = ff_dim
        self.gated = gated
        self.fc1 = nn.Linear(embed_dim, 2 * ff_dim if gated else ff_dim, bias=bias)
        self.fc2 = nn.Linear(ff_dim, embed_dim, bias=bias)
        self.activation = ACT2FN[activation]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if self.gated:  # chunk, not two slices: its backward is one cat, not two zero-filled [.., 2F] buffers
            linear, gate = hidden.chunk(2, dim=-1)  # [.., F] each
            hidden = linear * self.activation(gate)
        else:
            hidden = self.activation(hidden)
        return self.fc2(self.dropout(hidden))


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`x [N, in]` sorted by group, `weight [G, in, out]`, cumulative `offsets [G]` → `[N, out]`."""
    aligned = all((size * x.element_size()) % 16 == 0 for size in (x.shape[-1], weight.shape[-1]))
    if aligned and hasattr(F, "grouped_mm"):
        out = F.grouped_mm(x.contiguous(), weight.contiguous(), offs=offsets.to(torch.int32))
        if out.requires_grad:
            out.register_hook(lambda grad: grad.contiguous())  # the kernel rejects broadcast (stride-0) gradients
        return out
    from transformers.integrations import moe as hf_moe  # registers transformers' grouped-mm fallback op

    del hf_moe
    return torch.ops.transformers.grouped_mm_fallback(x, weight, offsets.to(torch.int64))


class RxTMoE(nn.Module):
    """Top-k routed experts (stacked `w1 [E, D, 2F|F]`, `w2 [E, F, D]`) + optional shared experts
    (docs/spec.md#mixture-of-experts).

    Tokens are sorted by expert and multiplied with grouped GEMMs (no Python loop over experts or tokens).
    In training mode the load-balancing loss of this call is kept in `self.router_loss`.
    """

    def __init__(self, config: RxTComponentConfig):
        super().__init__()
        dim, ff_dim = config.embed_dim, config.ff_dim
        self.num_experts, self.top_k = config.num_experts, config.moe_top_k
        self.ff_dim, self.gated = ff_dim, config.use_gated
        self.num_shared = config.num_shared_experts
        self.shared_dim = config.shared_expert_dim or ff_dim
        self.weighted_shared = config.moe_use_weighted_shared_experts
        self.router_amp, self.router_dtype = config.router_amp, getattr(torch, config.router_dtype)
        width = 2 * ff_dim if self.gated else ff_dim
        self.router = nn.Linear(dim, self.num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(self.num_experts, dim, width))
        self.w2 = nn.Parameter(torch.empty(self.num_experts, ff_dim, dim))
        self.b1 = self.b2 = self.global_bias = None
        if config.moe_bias_mode == "local":
            self.b1 = nn.Parameter(torch.zeros(self.num_experts, width))
            self.b2 = nn.Parameter(torch.zeros(self.num_experts, dim))
        elif config.moe_bias_mode == "global":
            self.global_bias = nn.Parameter(torch.zeros(dim))
        self.activation = ACT2FN[config.ff_activation]
        self.dropout = nn.Dropout(config.ff_dropout)
        shared_local = config.moe_shared_experts_bias_mode == "local"
        self.shared_expert = self.shared_w1 = self.shared_w2 = self.shared_b1 = self.shared_b2 = None
        self.shared_expert_gate = self.shared_experts_bias = None
        if self.num_shared == 1:
            self.shared_expert = RxTFeedForward(
                dim, self.shared_dim, self.gated, config.ff_activation, config.ff_dropout, bias=shared_local
            )
        elif self.num_shared > 1:
            shared_width = 2 * self.shared_dim if self.gated else self.shared_dim
            self.shared_w1 = nn.Parameter(torch.empty(self.num_shared, dim, shared_width))
            self.shared_w2 = nn.Parameter(torch.empty(self.num_shared, self.shared_dim, dim))
            if shared_local:
                self.shared_b1 = nn.Parameter(torch.zeros(self.num_shared, shared_width))
                self.shared_b2 = nn.Parameter(torch.zeros(self.num_shared, dim))
            self.shared_expert_gate = nn.Linear(dim, self.num_shared, bias=False)
        if self.num_shared > 0 and config.moe_shared_experts_bias_mode == "global":
            self.shared_experts_bias = nn.Parameter(torch.zeros(dim))
        self.router_loss: torch.Tensor | None = None

    def _activate(self, hidden: torch.Tensor, ff_dim: int) -> torch.Tensor:
        if self.gated:
            linear, gate = hidden.split(ff_dim, dim=-1)  # [.., F] each: one cat in backward (RxTFeedForward)
            return linear * self.activation(gate)
        return self.activation(hidden)

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`x [N, D]` → router probabilities `[N, E]`, top-k weights and expert ids `[N, K]` (docs/spec.md#router)."""
        if self.router_amp:
            with torch.autocast(device_type=x.device.type, dtype=self.router_dtype):
                logits = self.router(x)
        else:
            logits = self.router(x)
        probs = logits.softmax(dim=-1)
        top_probs, top_experts = probs.topk(self.top_k, dim=-1)
        weights = top_probs / (top_probs.sum(dim=-1, keepdim=True) + 1e-9)
        return probs, weights.to(x.dtype), top_experts

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_expert is not None:
            return self.shared_expert(x)
        hidden = torch.einsum("nd,sdf->nsf", x, self.shared_w1)  # [N, Ns, 2Fs|Fs]
        if self.shared_b1 is not None:
            hidden = hidden + self.shared_b1
        out = torch.einsum("nsf,sfd->nsd", self.dropout(self._activate(hidden, self.shared_dim)), self.shared_w2)
        if self.shared_b2 is not None:
            out = out + self.shared_b2
        mix = self.shared_expert_gate(x).softmax(dim=-1)  # [N, Ns]
        if self.training:
            self._shared_gate_loss = (mix - 1.0 / self.num_shared).abs().mean()
        return (mix.unsqueeze(-1) * out).sum(dim=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [N, D]
        probs, weights, experts = self._route(x)
        flat_experts = experts.reshape(-1)  # [N·K]
        order = flat_experts.argsort(stable=True)
        token_index = order // self.top_k
        sorted_experts = flat_experts[order]
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        offsets = counts.cumsum(0)
        hidden = _grouped_mm(x[token_index], self.w1.to(x.dtype), offsets)
        if self.b1 is not None:
            hidden = hidden + self.b1[sorted_experts]
        hidden = self.dropout(self._activate(hidden, self.ff_dim))
        out = _grouped_mm(hidden, self.w2.to(x.dtype), offsets)
        if self.b2 is not None:
            out = out + self.b2[sorted_experts]
        routed_scale = self.top_k / (self.top_k + self.num_shared) if self.weighted_shared and self.num_shared else 1.0
        out = out * (weights.reshape(-1)[order] * routed_scale).unsqueeze(-1)
        y = torch.zeros_like(x).index_add_(0, token_index, out)
        if self.global_bias is not None:
            y = y + self.global_bias
        if self.num_shared > 0:
            shared = self._shared(x)
            if self.shared_experts_bias is not None:
                shared = shared + self.shared_experts_bias
            if self.weighted_shared:
                shared = shared * (self.num_shared / (self.top_k + self.num_shared))
            y = y + shared
        if self.training:
            self.router_loss = self._load_balancing_loss(probs, experts, counts)
        return y.view(shape)

    def _load_balancing_loss(self, probs: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """`E · Σ_e f_e · P̄_e` with `P̄_e` the mean probability over tokens that selected `e`
        (docs/spec.md#auxiliary-losses)."""
        num_tokens = probs.shape[0]
        counts = counts.to(probs.dtype)
        fraction = counts / (num_tokens * self.top_k + 1e-6)
        selected_probs = torch.zeros_like(counts).index_add_(0, experts.reshape(-1), probs.gather(1, experts).reshape(-1))
        mean_probs = selected_probs / counts.clamp(min=1e-6)
        loss = self.num_experts * (fraction * mean_probs).sum()
        if self.num_shared > 1:
            loss = loss + self._shared_gate_loss
        return loss


# ---------------------------------------------------------------------------------------------------------------------
# Decoder / encoder layers
# ---------------------------------------------------------------------------------------------------------------------
class RxTDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: self-attention, memory cross-attention (memory layers only), feed-forward.

    `ff_kind`: `'memory'` (MoE if `use_moe` else dense/gated `ff_dim`), `'dense'` (width `dense_layer_dim`) or
    `'moe'` (MoE if `use_moe`, else dense/gated `ff_dim`). `memory_layer_idx` is the STM layer it reads (None for
    stateless layers). `layer_idx` is its index in the self-attention KV cache.
    """

    is_causal = True

    def __init__(
        self,
        config: RxTComponentConfig,
        layer_idx: int,
        rope_layout: str,
        attn_config,
        memory_layer_idx: int | None = None,
        ff_kind: str = "memory",
    ):
        super().__init__()
        self.memory_layer_idx = memory_layer_idx
        self.attention = RxTSelfAttention(config, layer_idx, self.is_causal, rope_layout, attn_config)
        self.norm1 = make_norm(config.embed_dim, config.use_rms_norm)
        self.norm3 = make_norm(config.embed_dim, config.use_rms_norm)
        if memory_layer_idx is not None:
            self.memory_cross_attention = RxTMemoryCrossAttention(config, rope_layout, attn_config)
            self.norm2 = make_norm(config.embed_dim, config.use_rms_norm)
            self.stm_norm = make_norm(config.embed_dim, config.use_rms_norm)
        if ff_kind != "dense" and config.use_moe:
            self.ff = RxTMoE(config)
        else:
            width = config.dense_layer_dim if ff_kind == "dense" else config.ff_dim
            self.ff = RxTFeedForward(config.embed_dim, width, config.use_gated, config.ff_activation, config.ff_dropout)

    def project_memory(self, stm_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`STM[i] [B, S, D]` → memory `k, v [B, Hkv, S, hd]` (once per turn at inference; contiguous, since they are
        read by every generated token)."""
        key, value = self.memory_cross_attention.project_key_value(self.stm_norm(stm_layer))
        return key.contiguous(), value.contiguous()

    def forward(
        self,
        hidden_states: torch.Tensor,
        stm_layer: torch.Tensor | None = None,
        position_embeddings=None,
        attention_mask=None,
        cache=None,
        use_cache: bool | None = False,
        **kwargs,
    ) -> torch.Tensor:
        h = hidden_states
        h = h + self.attention(self.norm1(h), position_embeddings, attention_mask, cache, **kwargs)[0]
        if self.memory_layer_idx is not None:
            if cache is not None and hasattr(cache, "get_memory_kv") and not self.training:
                memory_key_value = cache.get_memory_kv(self.memory_layer_idx, self.project_memory)
            else:  # training (and activation checkpointing, which drops the cache): STM layer passed positionally
                memory_key_value = self.project_memory(stm_layer)
            h = h + self.memory_cross_attention(self.norm2(h), memory_key_value, position_embeddings)[0]
        return h + self.ff(self.norm3(h))


class RxTEncoderLayer(RxTDecoderLayer):
    """Memory-encoder block: bidirectional self-attention and feed-forward (no memory cross-attention)."""

    is_causal = False

    def __init__(self, config: RxTComponentConfig, layer_idx: int, rope_layout: str, attn_config):
        super().__init__(config, layer_idx, rope_layout, attn_config, memory_layer_idx=None, ff_kind="memory")


def _moe_router_loss(modules) -> torch.Tensor | None:
    losses = [m.ff.router_loss for m in modules if isinstance(m.ff, RxTMoE) and m.ff.router_loss is not None]
    return torch.stack(losses).mean() if losses else None


def position_ids_from_mask(attention_mask: torch.Tensor | None, length: int, past_length: int, device) -> torch.Tensor:
    """Token positions `[B or 1, T]`: `cumsum(mask) − 1` (so left padding keeps real tokens at 0..n−1), else arange."""
    if attention_mask is not None and attention_mask.dim() == 2:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions[:, -length:]
    return torch.arange(past_length, past_length + length, device=device).unsqueeze(0)


class RxTDecoder(nn.Module):
    """Leading stateless layers → memory layers (layer `i` reads `STM[i]`) → final stateless layers → head norm."""

    def __init__(self, config: RxTComponentConfig, rope_layout: str, attn_config):
        super().__init__()
        self.config = config
        self.rotary = RxTRotaryEmbedding(config.head_dim, config.rope_base) if config.use_rope else None
        kinds = list(config.stateless_layers_config or [])
        final_kinds = list(config.final_stateless_layers_config or [])
        has_memory = config.has_memory_cross_attention
        self.stateless_layers = nn.ModuleList(
            RxTDecoderLayer(config, j, rope_layout, attn_config, None, kind) for j, kind in enumerate(kinds)
        )
        offset = len(kinds)
        self.layers = nn.ModuleList(
            RxTDecoderLayer(config, offset + i, rope_layout, attn_config, i if has_memory else None)
            for i in range(config.num_layers)
        )
        offset += config.num_layers
        self.final_stateless_layers = nn.ModuleList(
            RxTDecoderLayer(config, offset + j, rope_layout, attn_config, None, kind) for j, kind in enumerate(final_kinds)
        )
        self.head_norm = None
        if config.use_head_norm:
            self.head_norm = make_norm(config.embed_dim, config.head_norm_type == "rms_norm")

    def forward(self, hidden_states, stm=None, attention_mask=None, position_ids=None, cache=None, **kwargs):
        """`hidden_states [B, T, D]`, `stm [L, B, S, D]` → `[B, T, D]` (after the head norm, before the LM head)."""
        position_embeddings = self.rotary(position_ids, hidden_states.dtype) if self.rotary is not None else None
        common = dict(position_embeddings=position_embeddings, attention_mask=attention_mask)
        for layer in self.stateless_layers:
            hidden_states = layer(hidden_states, None, cache=cache, **common, **kwargs)
        for i, layer in enumerate(self.layers):
            stm_layer = stm[i] if stm is not None else None
            hidden_states = layer(hidden_states, stm_layer, cache=cache, **common, **kwargs)
        for layer in self.final_stateless_layers:
            hidden_states = layer(hidden_states, None, cache=cache, **common, **kwargs)
        if self.head_norm is not None:
            hidden_states = self.head_norm(hidden_states)
        return hidden_states

    def router_loss(self, include_final: bool = True) -> torch.Tensor | None:
        modules = list(self.stateless_layers) + list(self.layers)
        if include_final:
            modules += list(self.final_stateless_layers)
        return _moe_router_loss(modules)


class RxTEncoder(nn.Module):
    """Bidirectional memory encoder: returns `ED [L, B, T, D]`, the un-normalised output of every layer."""

    def __init__(self, config: RxTComponentConfig, rope_layout: str, attn_config):
        super().__init__()
        self.config = config
        self.rotary = RxTRotaryEmbedding(config.head_dim, config.rope_base) if config.use_rope else None
        self.layers = nn.ModuleList(
            RxTEncoderLayer(config, i, rope_layout, attn_config) for i in range(config.num_layers)
        )

    def forward(self, hidden_states, attention_mask=None, position_ids=None) -> torch.Tensor:
        position_embeddings = self.rotary(position_ids, hidden_states.dtype) if self.rotary is not None else None
        outputs = []
        for layer in self.layers:
            hidden_states = layer(hidden_states, None, position_embeddings, attention_mask)
            outputs.append(hidden_states)
        return torch.stack(outputs)


# ---------------------------------------------------------------------------------------------------------------------
# Memory attention: norms, residual gates, network
# ---------------------------------------------------------------------------------------------------------------------
class RxTMemoryNorm(nn.Module):
    """Gated memory norms `rms`, `adaptive`, `positional`, `layer` (docs/spec.md#memory-norms):
    `y = σ(gate)·n(x) + (1−σ(gate))·x`.

    (`classic-rms` is a plain `nn.RMSNorm`, built by `make_memory_norm`.)
    """

    def __init__(self, config: RxTMemoryAttentionConfig):
        super().__init__()
        self.norm_type, self.decay = config.norm_type, float(config.norm_decay)
        dim, slots = config.embed_dim, config.stm_size
        self.init_gate = float(config.norm_init_gate)
        if self.norm_type == "positional":
            self.scale = nn.Parameter(torch.ones(dim) if config.norm_per_dim_scale else torch.ones(slots, 1))
            self.gate = nn.Parameter(torch.full((slots, 1), self.init_gate))
            self.register_buffer("ema_rms", torch.ones(slots, 1))
        else:
            self.scale = nn.Parameter(torch.ones(dim))
            self.gate = nn.Parameter(torch.full((1,), self.init_gate))
            if self.norm_type == "adaptive":
                self.register_buffer("ema_rms", torch.ones(1))
            if self.norm_type == "layer":
                self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [B, S, D]` → same shape."""
        if self.norm_type == "layer":
            normed = self.norm(x) * self.scale
        elif self.norm_type == "positional":
            rms = self.ema_rms
            if self.training:
                current = x.detach().pow(2).mean(dim=-1, keepdim=True).sqrt().mean(dim=0)  # [S, 1]
                rms = self.decay * self.ema_rms + (1 - self.decay) * current
                self.ema_rms.copy_(rms)
            normed = x * torch.rsqrt(rms + 1e-6) * self.scale
        elif self.norm_type == "adaptive" and self.training:
            current = x.pow(2).mean().sqrt()  # one scalar for the whole input; gradient flows through it
            rms = self.decay * self.ema_rms + (1 - self.decay) * current
            self.ema_rms.copy_(rms.detach())
            normed = x * torch.rsqrt(rms + 1e-6) * self.scale
        else:  # rms, and adaptive in eval mode: per-slot RMS
            rms = x.pow(2).mean(dim=-1, keepdim=True).sqrt()
            normed = x * torch.rsqrt(rms + 1e-6) * self.scale
        gate = torch.sigmoid(self.gate)
        return gate * normed + (1 - gate) * x


def make_memory_norm(config: RxTMemoryAttentionConfig) -> nn.Module:
    return nn.RMSNorm(config.embed_dim, eps=None) if config.norm_type == "classic-rms" else RxTMemoryNorm(config)


class RxTResidualGate(nn.Module):
    """`Gate(old, new)` (docs/spec.md#residual-gates): `old + new` when disabled; else gate value `g` (static /
    elementwise / linear) and sigmoid `g·new + (1−g)·old` or tanh `(1+g)·new + (1−g)·old`."""

    def __init__(self, config: RxTMemoryAttentionConfig, enabled: bool):
        super().__init__()
        self.enabled = enabled
        self.gate_type = config.residual_gate_type
        self.per_slot = config.residual_per_slot_gate
        self.use_tanh = config.use_tanh_residual_gate
        self.slot_status = None
        if not enabled:
            return
        slots = config.stm_size
        self.init_value = float(config.residual_gate_init)
        self.init_range = config.residual_gate_init_range
        if self.gate_type == "linear":
            self.gate = nn.Linear(slots, slots if self.per_slot else 1)
            self.gate._torch_default_init = True
        else:
            self.gate = nn.Parameter(self.initial_gate(slots))
        uses_status = self.gate_type == "linear" or (self.gate_type == "elementwise" and self.per_slot)
        if config.residual_gate_slot_status_type == "linear" and uses_status:
            self.slot_status = nn.Linear(config.embed_dim, 1)
            self.slot_status._torch_default_init = True

    def initial_gate(self, slots: int) -> torch.Tensor:
        """`residual_gate_init` everywhere, or per-slot values spread over `residual_gate_init_range`."""
        if not self.per_slot:
            return torch.full((1,), self.init_value)
        if self.init_range is not None:
            return torch.linspace(*self.init_range, slots).unsqueeze(-1)
        return torch.full((slots, 1), self.init_value)

    def _status(self, x: torch.Tensor) -> torch.Tensor:
        """Slot status `[B, S, 1]` of `x [B, S, D]`."""
        return self.slot_status(x) if self.slot_status is not None else x.mean(dim=-1, keepdim=True)

    def forward(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return old + new
        if self.gate_type == "static":
            logits = self.gate
        elif self.gate_type == "elementwise":
            status = self._status(old + new) if self.per_slot else (old + new).mean(dim=(1, 2), keepdim=True)
            logits = self.gate * status
        else:  # linear: [B, S] → [B, S] or [B, 1]
            logits = self.gate(self._status(old + new).squeeze(-1)).unsqueeze(-1)
        if self.use_tanh:
            gate = torch.tanh(logits)
            return (1 + gate) * new + (1 - gate) * old
        gate = torch.sigmoid(logits)
        return gate * new + (1 - gate) * old


class RxTMemoryAttention(nn.Module):
    """Memory-attention network: `STM_{t−1} [L, B, S, D]`, `ED [L, B, T, D]` → `STM_t [L, B, S, D]`
    (docs/spec.md#memory-attention).

    Variants: `simple`, `self` (STM self-attention pre-step), `interlayer` (attention to the mean of all STM layers),
    `self-interlayer` (the interlayer keys/values are a gate of the layer and the mean) and
    `grouped-self-interlayer` (means over `num_groups` contiguous groups of layers).
    """

    def __init__(self, config: RxTMemoryAttentionConfig, variant: str, rope_layout: str, attn_config):
        super().__init__()
        self.config, self.variant, self.rope_layout = config, variant, rope_layout
        dim, hd, layers = config.embed_dim, config.head_dim, config.num_layers
        self.rotary = RxTRotaryEmbedding(hd, config.rope_base)

        def attention(prefix: str) -> RxTAttention:
            return RxTAttention(attn_config, dim, hd, config.heads(prefix), dropout=getattr(config, prefix + "dropout"))

        def norms() -> nn.ModuleList:
            return nn.ModuleList(make_memory_norm(config) for _ in range(layers))

        def gates(enabled: bool) -> nn.ModuleList:
            return nn.ModuleList(RxTResidualGate(config, enabled) for _ in range(layers))

        self.attention_layers = nn.ModuleList(attention("att_") for _ in range(layers))
        self.memory_norm_layers = norms()
        self.memory_input_norm_layers = nn.ModuleList(nn.RMSNorm(dim, eps=None) for _ in range(layers))
        self.residual_gate_layers = None if config.disable_residual else gates(config.use_gated_residual)
        if variant == "self":
            self.self_attention_layers = nn.ModuleList(attention("self_att_") for _ in range(layers))
            self.self_memory_norm_layers = norms()
            self.self_residual_gate_layers = gates(config.use_gate_for_self_attention)
        elif variant != "simple":
            self.mean_attention_layers = nn.ModuleList(attention("interlayer_att_") for _ in range(layers))
            self.mean_memory_norm_layers = norms()
            self.mean_stm_norm = make_memory_norm(config)
            self.mean_residual_gate_layers = gates(config.use_gated_residual)
            if variant != "interlayer":
                self.interlayer_gate_layers = gates(config.use_gated_residual)
        self.num_groups = config.num_groups if variant == "grouped-self-interlayer" else 1

    def _layer_means(self, stm: torch.Tensor) -> torch.Tensor:
        """Normalised mean STM per group `[G, B, S, D]` (G = 1 except the grouped variant)."""
        num_layers, batch = stm.shape[:2]
        means = stm.view(self.num_groups, num_layers // self.num_groups, *stm.shape[1:]).mean(dim=1)
        return self.mean_stm_norm(means.flatten(0, 1)).view_as(means)

    def forward(self, stm, encoded, attention_mask=None, position_ids=None) -> torch.Tensor:
        """`stm [L, B|1, S, D]`, `encoded [L, B, T, D]`, `attention_mask` (prepared ED key mask) → `[L, B, S, D]`."""
        stm = stm.expand(stm.shape[0], encoded.shape[1], *stm.shape[2:])
        key_position_embeddings = self.rotary(position_ids, encoded.dtype)
        group_size = stm.shape[0] // self.num_groups
        means = self._layer_means(stm) if self.variant not in ("simple", "self") else None
        new_layers = []
        for i, stm_layer in enumerate(stm):
            if self.variant == "simple":
                x = stm_layer
            elif self.variant == "self":
                normed = self.self_memory_norm_layers[i](stm_layer)
                x = self.self_residual_gate_layers[i](stm_layer, self.self_attention_layers[i](normed, normed))
            else:
                normed = self.mean_memory_norm_layers[i](stm_layer)
                mean = means[i // group_size]
                key_value = mean if self.variant == "interlayer" else self.interlayer_gate_layers[i](normed, mean)
                x = self.mean_residual_gate_layers[i](stm_layer, self.mean_attention_layers[i](normed, key_value))
            update = self.attention_layers[i](
                self.memory_norm_layers[i](x),
                self.memory_input_norm_layers[i](encoded[i]),
                attention_mask,
                key_position_embeddings,
                self.rope_layout,
            )
            new_layers.append(update if self.residual_gate_layers is None else self.residual_gate_layers[i](x, update))
        return torch.stack(new_layers)


class RxTSTMInit(nn.Module):
    """Initial STM `[L, 1, S, D]`: a trained parameter (`learned_stm_init`) or a deterministic draw from `stm_init`
    seeded by `stm_init_seed` (not saved: recomputed identically on every load)."""

    def __init__(self, config: RxTConfig):
        super().__init__()
        self.shape = (config.stm_shape[0], 1, *config.stm_shape[1:])
        self.mode, self.seed = config.stm_init, config.stm_init_seed
        self.stm = nn.Parameter(self.draw()) if config.learned_stm_init else None
        self._fixed: dict[tuple, torch.Tensor] = {}

    def draw(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        if self.mode == "standard":
            return torch.randn(self.shape, generator=generator)
        if self.mode == "normal":
            return torch.randn(self.shape, generator=generator) * 0.02
        if self.mode == "uniform":
            return torch.rand(self.shape, generator=generator) * 0.02
        return torch.ones(self.shape) if self.mode == "ones" else torch.zeros(self.shape)

    def forward(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        """A fresh `[L, batch_size, S, D]` tensor (differentiable w.r.t. `stm` when learned)."""
        if self.stm is not None:
            base = self.stm
        else:
            key = (torch.device(device or "cpu"), dtype or torch.float32)
            if key not in self._fixed:
                self._fixed[key] = self.draw().to(device=key[0], dtype=key[1])
            base = self._fixed[key]
        return base.expand(self.shape[0], batch_size, *self.shape[2:]).clone()


class RxTMLMHead(nn.Module):
    """Encoder MLM head: `decoder(layer_norm(gelu(dense(h))))` (docs/spec.md#encoder-and-mlm-head)."""

    def __init__(self, embed_dim: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.decoder = nn.Linear(embed_dim, vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(F.gelu(self.dense(hidden_states))))


def init_pytorch_linear(module: nn.Linear) -> None:
    """`nn.Linear`'s own init: weight Kaiming-uniform (a = √5), i.e. U(±1/√fan_in); bias U(±1/√fan_in)."""
    init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    if module.bias is not None:
        bound = 1 / math.sqrt(module.in_features) if module.in_features > 0 else 0.0
        init.uniform_(module.bias, -bound, bound)


@torch.no_grad()
def init_rxt_weights(model: PreTrainedModel, module: nn.Module) -> None:
    """transformers' defaults (N(0, `initializer_range`) linears/embeddings, unit norms; linears get PyTorch's own
    init with `linear_init='pytorch'`), then the RxT-specific parameters: gated-attention `gate_proj` N(1, 0.01),
    MoE expert stacks, memory norms, residual gates (`residual_gate_init`; linear gates and slot status keep
    PyTorch's default init, as the reference), learned STM init."""
    if isinstance(module, nn.Linear) and getattr(module, "_rxt_gate_init", False):
        # on the Linear itself: transformers initialises children after their parent, which would overwrite it
        init.normal_(module.weight, mean=1.0, std=0.01)
        return
    if isinstance(module, nn.Linear) and (
        getattr(module, "_torch_default_init", False) or model.config.linear_init == "pytorch"
    ):
        init_pytorch_linear(module)
        return
    PreTrainedModel._init_weights(model, module)
    if isinstance(module, RxTMoE):
        for name in ("w1", "w2", "shared_w1", "shared_w2"):
            if getattr(module, name) is not None:
                init.normal_(getattr(module, name), mean=0.0, std=model.config.initializer_range)
        for name in ("b1", "b2", "global_bias", "shared_b1", "shared_b2", "shared_experts_bias"):
            if getattr(module, name) is not None:
                init.zeros_(getattr(module, name))
    elif isinstance(module, RxTMemoryNorm):
        # positional: [S, 1], or [D] with norm_per_dim_scale: N(1, 0.1) (docs/spec.md#memory-norms)
        if module.norm_type == "positional":
            init.normal_(module.scale, mean=1.0, std=0.1)
        else:
            init.ones_(module.scale)
        init.constant_(module.gate, module.init_gate)
        if hasattr(module, "ema_rms"):
            init.ones_(module.ema_rms)
    elif isinstance(module, RxTResidualGate) and isinstance(getattr(module, "gate", None), nn.Parameter):
        init.copy_(module.gate, module.initial_gate(module.gate.shape[0]))
    elif isinstance(module, RxTSTMInit) and module.stm is not None:
        init.copy_(module.stm, module.draw())


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class RxTModelOutput(ModelOutput):
    """Decoder outputs (batch first): `last_hidden_state [B, T, D]` (after the head norm), `cache` (the `RxTCache`),
    `hidden_states` (embeddings + every decoder layer, each `[B, T, D]`), `attentions` (self-attention weights
    `[B, Hout, T, T]` per decoder layer), `cross_attentions` (memory cross-attention weights `[B, Hout, T, S]` per
    memory layer; the keys are the STM slots), `aux_loss` (MoE router loss, training).

    Layer-first tensors: `encoder_hidden_states` = ED `[L, B, T, D]` (`encode`, `memory_update`) and `stm
    [L, B, S, D]` (the new STM in `memory_update`). In `decode`, `output.stm` is the STM the decoder read: a field
    without a cache (training, `use_cache=False`: trainers read it, also through DDP / FSDP), and with a cache
    (inference) an attribute outside the output's fields — it is `cache.stm` — so that generic code splitting
    outputs by batch row (pipelines, `to_tuple`) sees batch-first tensors only."""

    last_hidden_state: torch.Tensor | None = None
    cache: RxTCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    stm: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class RxTCausalLMOutput(ModelOutput):
    """`logits [B, T, V]`; `loss` = LM loss (+ nothing else: add `aux_loss` in the trainer); `mlm_logits [B, T, V]`
    in `mlm` mode; the other fields (and the `stm` attribute in `decode`) as in `RxTModelOutput`."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: RxTCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    stm: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None
    mlm_logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


def with_read_stm(output: ModelOutput, stm: torch.Tensor | None) -> ModelOutput:
    """`output.stm = stm` (the STM `[L, B, S, D]` the decoder read): an output field when the output has no cache,
    else a plain attribute outside the fields (the STM is `output.cache.stm`; see `RxTModelOutput`)."""
    if output.cache is None:
        output["stm"] = stm
    else:
        object.__setattr__(output, "stm", stm)
    return output


MODES = ("decode", "encode", "memory_update", "mlm")


def check_labels(labels: torch.Tensor | None, inputs: torch.Tensor | None) -> None:
    """`labels` must be integer ids of the input's `[batch, tokens]` shape (-100 = ignored)."""
    if labels is None or not isinstance(inputs, torch.Tensor):
        return
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be integer token ids (-100 = ignored), got {got}.")
    if tuple(labels.shape) != tuple(inputs.shape[:2]):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}, expected {tuple(inputs.shape[:2])} (the input's [batch, tokens])."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Pre-trained model classes
# ---------------------------------------------------------------------------------------------------------------------
def _unreadable_weights(cls, path, error: Exception) -> ValueError | None:
    """None, or for a truncated / non-safetensors / pickle weights file (safetensors and pickle name neither
    the file nor the problem) a ValueError naming the folder, its weights files and what was expected."""
    if not isinstance(error, (SafetensorError, pickle.UnpicklingError, EOFError)):
        return None
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".pt"))) if (
        isinstance(path, (str, os.PathLike)) and os.path.isdir(path)) else []  # fmt: skip
    return ValueError(
        f"{cls.__name__}.from_pretrained({path!s}): a weights file is unreadable ({type(error).__name__}: {error}); "
        f"weights files there: {files}. Expected complete safetensors weights written by save_pretrained "
        "(model.safetensors, or the shards listed in model.safetensors.index.json)."
    )


class _StrictFromPretrained:
    """`from_pretrained` for every RxT model class (stateful and stateless)."""

    @classmethod
    def from_pretrained(cls, *args, strict: bool = False, **kwargs):
        """`PreTrainedModel.from_pretrained`: missing weights are initialised and reported (warning, and
        `output_loading_info`), as for every transformers model; a base-model folder loads into the LM class and
        back. `strict=True` raises a ValueError listing every missing, unexpected or mismatched weight instead
        (docs/conversion.md#strictness-and-the-report); keys of a head this class does not have (`lm_head.*`,
        `mlm_head.*` loaded into `RxTModel`) are not counted. A folder of another model type is refused by the config
        class before anything is built."""
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except Exception as error:
            readable = _unreadable_weights(cls, args[0] if args else kwargs.get("pretrained_model_name_or_path"), error)
            if readable is None:
                raise
            raise readable from error
        if strict:
            own = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
            heads = () if any(n.startswith(("lm_head.", "mlm_head.")) for n in own) else ("lm_head.", "mlm_head.")
            problems = {
                "missing": sorted(info.get("missing_keys") or ()),
                "unexpected": sorted(k for k in info.get("unexpected_keys") or () if not k.startswith(heads)),
                "mismatched": sorted(str(k) for k in info.get("mismatched_keys") or ()),
            }
            problems = {kind: keys for kind, keys in problems.items() if keys}
            if problems:
                listed = "; ".join(f"{kind} ({len(keys)}): {', '.join(keys)}" for kind, keys in problems.items())
                raise ValueError(
                    f"{cls.__name__}.from_pretrained({args[0] if args else ''!s}, strict=True) does not match the "
                    f"checkpoint: {listed}. Expected every weight of the model to be filled and every stored weight "
                    "used."
                )
        return (model, info) if want_info else model


# Output capturing (`output_hidden_states` / `output_attentions`): the decoder's layers only (the memory encoder's
# layers share the class); `cross_attentions` are the memory cross-attention weights over the STM slots.
DECODER_OUTPUTS = {
    "hidden_states": OutputRecorder(RxTDecoderLayer, index=0, layer_name="decoder"),
    "attentions": OutputRecorder(RxTSelfAttention, index=1, layer_name="decoder"),
    "cross_attentions": OutputRecorder(RxTMemoryCrossAttention, index=1, layer_name="decoder"),
}


# `auto_map` written into every saved folder: the whole family loads with `trust_remote_code`.
AUTO_MAP = {
    "AutoConfig": "configuration_rxt.RxTConfig",
    "AutoModel": "modeling_rxt.RxTModel",
    "AutoModelForCausalLM": "modeling_rxt.RxTForCausalLM",
}
STATELESS_AUTO_MAP = {
    "AutoConfig": "configuration_rxt.RxTStatelessConfig",
    "AutoModel": "modeling_rxt.RxTStatelessModel",
    "AutoModelForCausalLM": "modeling_rxt.RxTStatelessForCausalLM",
}


class RxTPreTrainedModel(_StrictFromPretrained, PreTrainedModel):
    config_class = RxTConfig
    config: RxTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RxTDecoderLayer", "RxTEncoderLayer", "RxTMemoryAttention"]
    _skip_keys_device_placement = ["cache", "past_key_values"]  # either name reaches forward (see CACHE_KWARG)
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # a decode step with a static RxTCache compiles without graph breaks
    _can_record_outputs = DECODER_OUTPUTS
    _auto_map = AUTO_MAP

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_rxt_weights(self, module)

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False):
        """transformers' `set_attn_implementation`. Every attention site reads the top-level config, so a name given
        as a string is first checked there and handed to the sub-configs (they have no sub-model of their own), which
        spares the warning transformers gives about sub-configs it could not check."""
        if isinstance(attn_implementation, str):
            name = self._check_and_adjust_attn_implementation(attn_implementation, allow_all_kernels=allow_all_kernels)
            for key in self.config.sub_configs:
                if (sub_config := getattr(self.config, key, None)) is not None:
                    sub_config._attn_implementation_internal = name
        return super().set_attn_implementation(attn_implementation, allow_all_kernels=allow_all_kernels)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights, config and the flat code files with a full `auto_map` (loads with `trust_remote_code`)."""
        self.config.auto_map = dict(self._auto_map)
        return super().save_pretrained(save_directory, *args, **kwargs)


class RxTModel(RxTPreTrainedModel):
    """Decoder, memory encoder and memory-attention network with one shared token embedding and the STM init."""

    def __init__(self, config: RxTConfig):
        super().__init__(config)
        dec = config.decoder_config
        self.embed_tokens = nn.Embedding(dec.vocab_size, dec.embed_dim)
        self.decoder = RxTDecoder(dec, config.rope_layout, config)
        self.encoder = RxTEncoder(config.encoder_config, config.rope_layout, config)
        self.memory_attention = RxTMemoryAttention(
            config.memory_attention_config, config.memory_attention_variant, config.rope_layout, config
        )
        self.stm_init = RxTSTMInit(config)
        self.post_init()

    # -- validation -----------------------------------------------------------------------------------------------
    def _check_input(
        self, input_ids, inputs_embeds, attention_mask, cache=None, stm=None, mode: str = "decode"
    ) -> tuple[int, int, int]:
        """Validate one call's inputs before any compute → `(batch, tokens, past_length)`; a ValueError names the
        expected vs the given value.

        Shape and type checks run on every call. Checks that read values (ids in `[0, vocab)`, a mask that is not all
        zeros, a finite STM) run where the inputs enter: every call without a cache, and the prompt phase
        (`past_length == 0`) of a generation; later decode steps only feed back the model's own tokens and STM. They
        cost one `aminmax` over the ids, one sum over the mask and one fused `isfinite().all()` over the STM."""
        if cache is not None and not hasattr(cache, "set_stm"):
            legacy = " (the legacy tuple-of-tensors cache format is not supported)" if isinstance(cache, (tuple, list)) else ""
            raise ValueError(
                f"cache must be an RxTCache (self-attention KV + STM), got {type(cache).__name__}{legacy}. "
                "PEFT prefix tuning / P-tuning / CPT replace the KV cache and would drop the STM: use a LoRA-family "
                "adapter instead."
            )
        past_length = cache.get_seq_length() if cache is not None else 0
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids [B, T] or inputs_embeds [B, T, D].")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor):
                raise ValueError(f"input_ids must be a LongTensor [batch, tokens], got {type(input_ids).__name__}.")
            if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
                raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
            shape = input_ids.shape
        else:
            dim = self.embed_tokens.embedding_dim
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != dim:
                raise ValueError(
                    f"inputs_embeds has shape {tuple(inputs_embeds.shape)}, expected [batch, tokens, D={dim}]."
                )
            shape = inputs_embeds.shape[:2]
        if len(shape) != 2 or shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, tokens] tensor, got shape {tuple(shape)}.")
        # seq_len is not a hard limit: RoPE angles are computed per position (docs/spec.md#configuration)
        batch, length = shape
        # A compiled decode step (static cache: `past_length` is a tensor) checks shapes only: its inputs were checked
        # as they entered, in the prompt phase, and a value-dependent branch would break the graph.
        compiling = torch.compiler.is_compiling()
        if attention_mask is not None:
            if attention_mask.dim() == 2 and not compiling and tuple(attention_mask.shape) != (batch, past_length + length):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, past_length + length)} "
                    f"(batch, cached + new tokens: {past_length} + {length})."
                )
            if attention_mask.dim() not in (2, 4):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected [batch, tokens] "
                    "(or a prepared 4-D mask)."
                )
        entering = not compiling and past_length == 0
        flat_mask = attention_mask is not None and attention_mask.dim() == 2
        if entering and (input_ids is not None or flat_mask):
            # one device sync: min / max id (one aminmax) and whether any token is unmasked
            stats = [*torch.aminmax(input_ids)] if input_ids is not None else []
            stats += [attention_mask.any()] if flat_mask else []
            stats = torch.stack([x.to(stats[0].device, torch.long) for x in stats]).tolist()
            vocab = self.embed_tokens.num_embeddings
            if input_ids is not None and (stats[0] < 0 or stats[1] >= vocab):
                bad = stats[0] if stats[0] < 0 else stats[1]
                raise ValueError(f"input_ids contains token id {bad}, expected ids in [0, {vocab}) (the vocabulary).")
            if flat_mask and not stats[-1]:
                raise ValueError("attention_mask is all zeros (every token masked); expected at least one 1 per call.")
        if mode == "decode" and stm is None and cache is not None and cache.stm is not None:
            stm = cache.stm  # the STM entering through the cache is checked like an `stm` argument
            self.check_stm(stm, batch, check_finite=entering)
        elif stm is not None and mode != "encode":
            self.check_stm(stm, batch, check_finite=not self.training, any_slots=self.training and mode == "decode")
        return batch, length, past_length

    def check_stm(
        self, stm: torch.Tensor, batch_size: int | None = None, check_finite: bool = True, any_slots: bool = False
    ) -> None:
        """Raise a ValueError naming the expected vs the given value unless `stm` fits this model: a floating tensor
        `[L, B|1, S, D]` on the model's device, in the model's dtype (outside training / autocast) and finite.

        `any_slots=True` accepts any slot count (joint pre-training reads the encoder states `[L, B, T, D]` as a
        stand-in memory). `check_finite=False` skips the finiteness check (one fused `isfinite().all()`, one device
        sync)."""
        layers, slots, dim = self.config.stm_shape
        if not isinstance(stm, torch.Tensor) or stm.dim() != 4:
            got = tuple(stm.shape) if isinstance(stm, torch.Tensor) else type(stm).__name__
            raise ValueError(f"stm must be a tensor [L={layers}, batch, S={slots}, D={dim}], got {got}.")
        if (stm.shape[0], stm.shape[3]) != (layers, dim) or (not any_slots and stm.shape[2] != slots):
            raise ValueError(
                f"stm has shape {tuple(stm.shape)}, expected [L={layers}, batch, S={slots}, D={dim}] "
                "(layers, slots, width of this model)."
            )
        if batch_size is not None and stm.shape[1] not in (1, batch_size) and batch_size % stm.shape[1] != 0:
            raise ValueError(
                f"stm batch {stm.shape[1]} does not fit the input batch {batch_size}; expected 1 (broadcast), "
                f"{batch_size}, or a divisor of it (rows repeated, e.g. num_return_sequences)."
            )
        param = self.embed_tokens.weight
        if stm.device != param.device:
            raise ValueError(f"stm is on {stm.device}, expected the model's device {param.device}.")
        if not stm.is_floating_point():
            raise ValueError(f"stm has dtype {stm.dtype}, expected a floating dtype ({param.dtype}, the model's).")
        if stm.dtype != param.dtype and not self.training and not torch.is_autocast_enabled(stm.device.type):
            raise ValueError(
                f"stm has dtype {stm.dtype}, expected the model's dtype {param.dtype} (convert it explicitly: "
                f"stm.to({param.dtype}))."
            )
        if check_finite and not torch.isfinite(stm).all():
            bad = int((~torch.isfinite(stm)).sum())
            raise ValueError(
                f"stm contains NaN or Inf values ({bad} of {stm.numel()}); expected a finite STM (start over from "
                "initial_stm(), or restore a saved one)."
            )

    @staticmethod
    def _fit_stm_batch(stm: torch.Tensor, batch_size: int) -> torch.Tensor:
        if stm.shape[1] == batch_size:
            return stm
        if stm.shape[1] == 1:
            return stm.expand(stm.shape[0], batch_size, *stm.shape[2:])
        return stm.repeat_interleave(batch_size // stm.shape[1], dim=1)

    def initial_stm(self, batch_size: int = 1) -> torch.Tensor:
        """The model's initial STM `[L, batch_size, S, D]` (deterministic, or learned)."""
        param = self.embed_tokens.weight
        return self.stm_init(batch_size, device=param.device, dtype=param.dtype)

    # -- forward --------------------------------------------------------------------------------------------------
    @accept_past_key_values
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: RxTCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        stm: torch.Tensor | None = None,
        mode: str = "decode",
        encoder_hidden_states: torch.Tensor | None = None,
        **kwargs,
    ) -> RxTModelOutput:
        """`mode`: `decode` (decoder reading the STM), `encode` (ED of the memory encoder), `memory_update`
        (encoder + memory attention: `stm` is the previous STM, the output `stm` the new one; with a precomputed
        `encoder_hidden_states` ED `[L, B, T, D]` the encoder is skipped)."""
        if mode not in ("decode", "encode", "memory_update"):
            raise ValueError(f"mode={mode!r} is not supported by RxTModel; expected 'decode', 'encode' or 'memory_update'.")
        if mode == "memory_update" and encoder_hidden_states is not None:
            return self._write_memory(encoder_hidden_states, attention_mask, stm)
        batch, length, past_length = self._check_input(input_ids, inputs_embeds, attention_mask, cache, stm, mode)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if mode != "decode":
            return self._memory_forward(inputs_embeds, attention_mask, stm, mode)

        if cache is not None:
            if stm is not None and stm is not cache.stm:
                cache.set_stm(stm)
            elif cache.stm is None:
                cache.set_stm(self.initial_stm(1))
            if cache.stm.shape[1] != batch:
                cache.set_stm(self._fit_stm_batch(cache.stm, batch))
            stm = cache.stm
        elif stm is None:
            stm = self.initial_stm(1)
        stm = self._fit_stm_batch(stm, batch)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = RxTCache(stm=stm, config=self.config)

        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, length, past_length, inputs_embeds.device)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_KWARG: cache},
        )
        hidden_states = self.decoder(
            inputs_embeds, stm, causal_mask, position_ids, cache=cache, **kwargs
        )
        aux_loss = None
        if self.training:
            aux_loss = self.decoder.router_loss(include_final=self.config.moe_aux_layers == "all")
        return with_read_stm(RxTModelOutput(last_hidden_state=hidden_states, cache=cache, aux_loss=aux_loss), stm)

    def _memory_forward(self, inputs_embeds, attention_mask, stm, mode: str) -> RxTModelOutput:
        length = inputs_embeds.shape[1]
        position_ids = position_ids_from_mask(attention_mask, length, 0, inputs_embeds.device)
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask
        )
        encoded = self.encoder(inputs_embeds, mask, position_ids)  # [L, B, T, D]
        if mode == "encode":
            return RxTModelOutput(last_hidden_state=encoded[-1], encoder_hidden_states=encoded)
        return self._write_memory(encoded, attention_mask, stm, check_finite=False)  # checked by _check_input

    def _write_memory(self, encoded: torch.Tensor, attention_mask, stm, check_finite: bool = True) -> RxTModelOutput:
        """Memory attention over `encoded [L, B, T, D]` (ED key mask from `attention_mask`) → new STM."""
        layers, _, dim = self.config.stm_shape
        if encoded.dim() != 4 or encoded.shape[0] != layers or encoded.shape[3] != dim:
            raise ValueError(
                f"encoder_hidden_states has shape {tuple(encoded.shape)}, expected [L={layers}, B, T, D={dim}]."
            )
        batch, length = encoded.shape[1:3]
        position_ids = position_ids_from_mask(attention_mask, length, 0, encoded.device)
        if stm is None:
            stm = self.initial_stm(1)
        self.check_stm(stm, batch, check_finite=check_finite and not self.training)
        memory_mask = create_bidirectional_mask(
            config=self.config,
            inputs_embeds=stm[0].expand(batch, *stm.shape[2:]),
            attention_mask=attention_mask,
            encoder_hidden_states=encoded[0],
        )
        new_stm = self.memory_attention(self._fit_stm_batch(stm, batch), encoded, memory_mask, position_ids)
        return RxTModelOutput(stm=new_stm, encoder_hidden_states=encoded)


class RxTForCausalLM(RxTPreTrainedModel, GenerationMixin):
    """RxT with its LM head (`Linear(D, V)` with bias, untied) and optional MLM head; stateful generation.

    Inference API: `forward(input_ids, attention_mask, stm=...)`, `encode`, `mlm_logits`, `update_memory`,
    `initial_stm`, `generate(..., cache=RxTCache(stm))`, `interact` and `RxTChatSession`.
    """

    _tied_weights_keys = {}

    def __init__(self, config: RxTConfig):
        super().__init__(config)
        self.model = RxTModel(config)
        dec = config.decoder_config
        self.lm_head = nn.Linear(dec.embed_dim, dec.vocab_size, bias=True)
        self.mlm_head = RxTMLMHead(dec.embed_dim, dec.vocab_size) if config.use_mlm_head else None
        self.post_init()

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:  # fmt: skip
        """transformers' resize of the shared embedding and the LM head, plus the MLM head's output layer; the
        decoder and encoder `vocab_size` follow."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        if self.mlm_head is not None and self.mlm_head.decoder.out_features != embeddings.num_embeddings:
            self.mlm_head.decoder = self._get_resized_lm_head(
                self.mlm_head.decoder, embeddings.num_embeddings, mean_resizing=mean_resizing
            )
        return embeddings

    # -- forward --------------------------------------------------------------------------------------------------
    @accept_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: RxTCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        stm: torch.Tensor | None = None,
        mode: str = "decode",
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> RxTCausalLMOutput:
        """`decode` → `logits [B, T, V]` (+ `loss` with `labels`, shifted inside); `encode` → ED; `memory_update`
        → new `stm`; `mlm` → `mlm_logits` (+ `loss` with unshifted MLM `labels`, -100 ignored)."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not supported; expected one of {list(MODES)}.")
        check_labels(labels, input_ids if input_ids is not None else inputs_embeds)
        if mode == "mlm":
            if self.mlm_head is None:
                raise ValueError("This model has no MLM head (config.use_mlm_head=False).")
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, mode="encode")
            mlm_logits = self.mlm_head(outputs.last_hidden_state)
            loss = None
            if labels is not None:
                targets = labels.flatten()
                loss = F.cross_entropy(mlm_logits.flatten(0, 1).float(), targets, ignore_index=-100, reduction="sum")
                loss = loss / (targets != -100).sum().clamp(min=1)
            return RxTCausalLMOutput(
                loss=loss, mlm_logits=mlm_logits, encoder_hidden_states=outputs.encoder_hidden_states
            )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            stm=stm,
            mode=mode,
            **kwargs,
        )
        if mode != "decode":
            return RxTCausalLMOutput(stm=outputs.stm, encoder_hidden_states=outputs.encoder_hidden_states)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = RxTCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions,
            aux_loss=outputs.aux_loss,
            last_hidden_state=outputs.last_hidden_state,
        )
        return with_read_stm(output, outputs.stm)

    # -- inference API --------------------------------------------------------------------------------------------
    def initial_stm(self, batch_size: int = 1) -> torch.Tensor:
        """The initial STM `[L, batch_size, S, D]`."""
        return self.model.initial_stm(batch_size)

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Memory-encoder outputs of every layer, `[L, B, T, D]`."""
        return self(input_ids=input_ids, attention_mask=attention_mask, mode="encode").encoder_hidden_states

    @torch.no_grad()
    def mlm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """MLM-head logits `[B, T, V]` over the encoder's last layer."""
        return self(input_ids=input_ids, attention_mask=attention_mask, mode="mlm").mlm_logits

    @torch.no_grad()
    def update_memory(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        stm: torch.Tensor | RxTCache | None = None,
    ) -> torch.Tensor:
        """Encode the full interaction `[BOS][Q]query[A]answer[EOS]` and write it into memory → new STM `[L, B, S, D]`.

        `stm` is the previous STM (default: the initial STM) or an `RxTCache`, whose STM is replaced by the new one,
        whose turn state is reset (`start_new_turn`) and whose memory K/V for the next turn are projected
        (`prepare_memory_kv`).
        """
        cache = stm if hasattr(stm, "set_stm") else None
        previous = cache.stm if cache is not None else stm
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}."
                )
            empty = (attention_mask.sum(dim=-1) == 0).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"Rows {empty} of the interaction batch are empty (all padding); expected >= 1 token.")
        new_stm = self(input_ids=input_ids, attention_mask=attention_mask, stm=previous, mode="memory_update").stm
        if cache is not None:
            cache.set_stm(new_stm)
            cache.start_new_turn()
            self.prepare_memory_kv(cache)
        return new_stm

    @torch.no_grad()
    def prepare_memory_kv(self, cache: RxTCache) -> None:
        """Project the memory cross-attention K/V `[B, Hkv, S, hd]` of every memory layer from `cache.stm` into
        `cache` now, so that the next turn's prompt phase does not (`update_memory(..., cache)` calls it: in a
        background update it runs while the user types). No-op in training mode, where the K/V are not cached."""
        if self.training:
            return
        if cache.stm is None:
            cache.set_stm(self.initial_stm(1))
        for layer in self.model.decoder.layers:
            if layer.memory_layer_idx is not None:
                cache.get_memory_kv(layer.memory_layer_idx, layer.project_memory)

    @torch.no_grad()
    def init_stm(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        force: bool = False,
        noise_level: float = 0.0,
        stm: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Memory initialisation from text (docs/spec.md#memory-initialisation-from-text) → STM `[L, B, S, D]`.

        `input_ids` is the rendered system template (`config.system_template`, e.g. `[BOS][Q]{system}[A][EOS]`).
        The text is encoded (ED `[L, B, T, D]`), `noise_level * N(0, 1)` is added to ED when `noise_level > 0`, then
        one memory-attention update runs from `stm` (default: the initial STM); with `force=True` ED is copied into
        the STM instead, which needs `T == S`: shorter inputs are right-padded to `S` (`[PAD]`, mask 0), longer ones
        raise a ValueError.
        """
        if noise_level < 0:
            raise ValueError(f"noise_level={noise_level}: expected a value >= 0 (standard deviation of the ED noise).")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if force:
            slots, length = self.config.stm_shape[1], input_ids.shape[1]
            if length > slots:
                raise ValueError(
                    f"force=True copies ED [L, B, T, D] into the STM [L, B, S, D] and needs T == S, but the text has "
                    f"T={length} tokens and the STM S={slots} slots; shorten the text or use force=False."
                )
            if length < slots:
                input_ids = F.pad(input_ids, (0, slots - length), value=self.config.pad_token_id or 0)
                attention_mask = F.pad(attention_mask, (0, slots - length), value=0)
        encoded = self.encode(input_ids, attention_mask)
        if noise_level > 0:
            noise = torch.randn(encoded.shape, generator=generator, device=encoded.device, dtype=encoded.dtype)
            encoded = encoded + noise_level * noise
        if force:
            return encoded.contiguous()
        previous = stm if stm is not None else self.initial_stm(input_ids.shape[0])
        output = self.model(encoder_hidden_states=encoded, attention_mask=attention_mask, stm=previous, mode="memory_update")
        return output.stm

    # -- generation hooks -----------------------------------------------------------------------------------------
    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size: int, max_cache_length: int, *args
    ):
        """The turn's `RxTCache`: the one passed as `cache` (its STM is the conversation's), else a new one with the
        initial STM. `cache_implementation="static"` gives it static self-attention layers of `max_cache_length`
        tokens (for `torch.compile`); other cache implementations would drop the STM and are refused."""
        legacy = "past_key_values" if CACHE_KWARG == "cache" else "cache"  # `cache=` works on transformers < 5.24 too
        if model_kwargs.get(legacy) is not None:
            if model_kwargs.get(CACHE_KWARG) is not None:
                raise ValueError("Got a KV cache as both `cache` and `past_key_values`; pass the RxTCache once, as `cache`.")
            model_kwargs[CACHE_KWARG] = model_kwargs.pop(legacy)
        model_kwargs.pop(legacy, None)
        cache = model_kwargs.get(CACHE_KWARG)
        implementation = generation_config.cache_implementation
        if implementation not in (None, "dynamic", "static"):
            raise ValueError(
                f"cache_implementation={implementation!r}: RxT keeps its STM in an RxTCache; expected None / "
                "'dynamic' or 'static' (static self-attention layers inside the RxTCache)."
            )
        if cache is None and generation_config.use_cache is not False:
            cache = model_kwargs[CACHE_KWARG] = RxTCache(config=self.config)
        elif cache is not None and not hasattr(cache, "set_stm"):
            raise ValueError(
                f"cache must be an RxTCache (self-attention KV + STM), got {type(cache).__name__}."
            )
        elif cache is not None and cache.get_seq_length() > 0 and not generation_config.is_assistant:
            # (an assistant model drafting for assisted decoding continues its cache from round to round of one turn)
            raise ValueError(
                f"The RxTCache still holds {cache.get_seq_length()} tokens of the previous turn. Each generate() call "
                "is one turn: call model.update_memory(interaction_ids, mask, cache) (or cache.start_new_turn()) first."
            )
        if cache is not None and implementation == "static" and (cache.max_cache_len or 0) < max_cache_length:
            cache.config, cache.max_cache_len = self.config, max_cache_length
            cache.layers = RxTCache._static_layers(self.config, max_cache_length)
        generation_config.cache_implementation = None  # the RxTCache is the cache
        return super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args
        )

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """`GenerationMixin.generate` (one turn); afterwards the `RxTCache` holds one STM row per input row again.

        With `num_beams > 1` or `num_return_sequences > 1`, generation runs `n` rows per input row, each reading
        that row's STM (generation only reads the STM); afterwards the cache's STM is the input's `[L, B, S, D]` —
        the chosen beam's, which is the row's — so `update_memory(interaction [B, T], cache)` and the next turn
        work. With `num_return_sequences > 1` the caller picks which of the `n` answers of each row to write into
        memory (or repeats the STM, `cache.set_stm(cache.stm.repeat_interleave(n, 1))`, to branch conversations).
        """
        output = super().generate(inputs, *args, **kwargs)
        rows = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None and isinstance(output, ModelOutput):
            cache = output.get(CACHE_KWARG)
        if hasattr(cache, "select_conversations") and isinstance(rows, torch.Tensor) and rows.dim() >= 2:
            cache.select_conversations(rows.shape[0])
        return output

    # -- chat-level API -------------------------------------------------------------------------------------------
    def interact(self, query, session: RxTChatSession | None = None, tokenizer=None, streamer=None, **generate_kwargs):
        """Answer `query` (a string, or a list of strings for a batch of conversations) in `session`, then update its
        memory. Returns the decoded answer(s); see `RxTChatSession.interact`."""
        if session is None:
            if tokenizer is None:
                raise ValueError("interact() needs a session or a tokenizer to start one.")
            session = RxTChatSession(self, tokenizer)
        return session.interact(query, streamer=streamer, **generate_kwargs)


class RxTMemoryUpdateError(RuntimeError):
    """A background memory update of `RxTChatSession` failed. `turn` is the number of the turn (1-based, counted per
    session) whose interaction was not written into memory; the session's STM is the one from before that turn."""

    def __init__(self, message: str, turn: int):
        super().__init__(message)
        self.turn = turn


class RxTChatSession:
    """One or more conversations with an RxT model: an `RxTCache` (STM + memory K/V of the next turn) plus a lock.

    `interact(query)` renders `[BOS][Q]query[A]`, generates with stock `generate`, then writes the prompt ids + the
    generated ids (up to and including `[EOS]`) into the STM (docs/spec.md#one-turn). With `background_update=True` the
    memory update runs in a thread after the answer is returned; the next turn (and `stm`, `wait`, `save`) waits for
    it.

    RxT-Beta (tokenizers with `[T] [C] [U] [I]`, docs/spec.md#templates):
    `interact(query, thinking_mode=..., internal=...)` renders `[BOS]([I]internal)?[Q]query` and the first generated
    token is `[A]` (`fast`), `[T]` (`extended`) or whichever of the two has the larger logit (`auto`);
    `tool_result(result)` runs a `[BOS]([I]internal)?[U]result` turn. Beta turns return the generated text with its
    section tokens (e.g. `[T]...[A]...`). `init_stm(text)` initialises the memory from a system prompt
    (docs/spec.md#memory-initialisation-from-text). Templates: `modeling_rxt.tokenization_rxt.RXT_TEMPLATES`.

    Guarantees:
    - A turn is all or nothing. It generates on a copy of the session's cache and the session adopts the new STM only
      after the memory update succeeded; a turn that raises (tokenizing, generation, a streamer that raises when its
      client disconnects, a logits processor, the memory update) leaves the STM bit for bit as before that turn, and
      the next turn works. A streamer is sent `end()` when generation fails, so a reader of a `TextIteratorStreamer`
      stops instead of waiting forever.
    - Failures reach the caller of the failing turn: a foreground update (`background_update=False`) raises its own
      error from `interact`. A background update can only fail after `interact` returned; the next call that waits
      for it (`interact`, `tool_result`, `init_stm`, `wait`, `stm`, `save`) raises `RxTMemoryUpdateError` once,
      naming the turn, and does nothing else; the STM is then the one from before that turn (its interaction is not
      in memory), and later calls work. `reset()` discards such a failure (logged as a warning).
    - All public methods take the session lock: a `reset()` or `init_stm()` while a turn runs in another thread waits
      for that turn (and its background update) to finish, so an old turn never writes into the new memory.
    - One answer per conversation: `num_beams > 1` and `num_return_sequences > 1` (in the arguments or the model's
      generation config) are refused with a ValueError. For several candidates use `model.generate(...,
      cache=RxTCache(stm=session.stm))` and write the chosen interaction with `model.update_memory`.
    - User text (queries, tool results, internal instructions, system prompts) that contains an RxT control token
      (`RXT_SPECIAL_TOKENS`: `[Q]`, `[A]`, `[EOS]`, ...) is refused with a ValueError (`control_tokens='refuse'`, the
      default) or tokenized as plain text (`control_tokens='escape'`); it never becomes a control token.

    Parameters:
        model (`RxTForCausalLM`): the model (in eval mode for inference).
        tokenizer: its RxT tokenizer (special-token ids must match the model's config).
        stm (`torch.Tensor`, *optional*): starting STM `[L, B, S, D]` in the model's dtype and device.
        batch_size (`int`, *optional*): number of conversations; default 1, or the batch of `stm`. With an `stm` of
            one conversation, `batch_size=n` starts `n` conversations from it; any other mismatch is a ValueError.
        background_update (`bool`, defaults to False): run the memory update in a thread after answering.
        control_tokens (`str`, defaults to `'refuse'`): `'refuse'` or `'escape'` control tokens in user text.
    """

    _REQUIRED_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "query_token_id", "answer_token_id")
    _OPTIONAL_IDS = ("think_token_id", "tool_call_token_id", "tool_use_token_id", "internal_token_id")

    class _FirstSectionToken:
        """Logits processor: at the first generated position keep only one of `choices` (the one with the larger
        logit; a single choice is forced); later positions are untouched."""

        def __init__(self, prompt_length: int, choices: list[int]):
            self.prompt_length, self.choices = prompt_length, choices

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if input_ids.shape[1] != self.prompt_length:
                return scores
            choices = torch.tensor(self.choices, device=scores.device)
            pick = choices[scores[:, choices].argmax(dim=-1)]
            return torch.full_like(scores, float("-inf")).scatter_(1, pick[:, None], 0.0)

    def __init__(self, model: RxTForCausalLM, tokenizer, stm: torch.Tensor | None = None, batch_size: int | None = None,
                 background_update: bool = False, control_tokens: str = "refuse"):  # fmt: skip
        from .tokenization_rxt import CONTROL_TOKEN_POLICIES

        self.model, self.tokenizer = model, tokenizer
        ids = check_rxt_tokenizer(tokenizer)
        config = model.config
        wrong = {k: (v, getattr(config, k)) for k, v in ids.items() if (k in self._REQUIRED_IDS or (
                 k in self._OPTIONAL_IDS and getattr(config, k) is not None)) and v != getattr(config, k)}  # fmt: skip
        if wrong:
            raise ValueError(
                "tokenizer and model disagree on special-token ids (tokenizer, model): "
                + ", ".join(f"{k}={t} vs {m}" for k, (t, m) in wrong.items())
                + "; use the tokenizer saved with the model."
            )
        if control_tokens not in CONTROL_TOKEN_POLICIES:
            raise ValueError(f"control_tokens={control_tokens!r}: expected one of {list(CONTROL_TOKEN_POLICIES)}.")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r}: expected a positive integer (number of conversations).")
        self.token_ids = ids
        self.background_update = background_update
        self.control_tokens = control_tokens
        self._lock = threading.RLock()
        self._update_thread: threading.Thread | None = None
        self._update_error: tuple[int, BaseException] | None = None
        self._turns = 0
        if stm is not None:
            model.model.check_stm(stm)
            if batch_size is not None and batch_size != stm.shape[1]:
                if stm.shape[1] != 1:
                    raise ValueError(
                        f"batch_size={batch_size} but the STM holds {stm.shape[1]} conversations; expected "
                        f"batch_size={stm.shape[1]} or None (an STM of one conversation can be repeated)."
                    )
                stm = stm.repeat(1, batch_size, 1, 1)
        else:
            stm = model.initial_stm(batch_size or 1)
        self.cache = RxTCache(stm=stm)

    # -- state ----------------------------------------------------------------------------------------------------
    def _join_update(self) -> None:
        """With the lock held: wait for a background update; raise its failure once (`RxTMemoryUpdateError`)."""
        thread = self._update_thread
        if thread is not None:
            thread.join()
            self._update_thread = None
        if self._update_error is not None:
            (turn, error), self._update_error = self._update_error, None
            raise RxTMemoryUpdateError(
                f"The background memory update of turn {turn} failed ({type(error).__name__}: {error}). That "
                f"interaction is not in memory: the STM is the one from before turn {turn}; the session continues "
                "from there.",
                turn,
            ) from error

    def wait(self) -> None:
        """Block until a background memory update has finished; if it failed, raise `RxTMemoryUpdateError` (once)."""
        with self._lock:
            self._join_update()

    @property
    def stm(self) -> torch.Tensor:
        """The conversation(s)' STM `[L, B, S, D]` after every finished turn (waits for a background update)."""
        with self._lock:
            self._join_update()
            return self.cache.stm

    def reset(self, batch_size: int | None = None) -> None:
        """Start over from the model's initial STM. Waits for a turn running in another thread and for a background
        update; a failed background update is discarded (its memory is replaced anyway) and logged as a warning."""
        with self._lock:
            try:
                self._join_update()
            except RxTMemoryUpdateError as error:
                logger.warning("reset() discards a failed background memory update: %s", error)
            self.cache = RxTCache(stm=self.model.initial_stm(batch_size or self.cache.stm.shape[1]))

    def save(self, path) -> None:
        """Save this conversation's STM to a safetensors file (bit-exact, in the model's dtype)."""
        from safetensors.torch import save_file

        save_file({"stm": self.stm.detach().contiguous().cpu()}, str(path), metadata={"format": "rxt-stm"})

    @classmethod
    def load(cls, model: RxTForCausalLM, tokenizer, path, convert_dtype: bool = False, **kwargs) -> RxTChatSession:
        """Restore a conversation saved with `save` (bit-exact). Keyword arguments go to the constructor
        (`batch_size`: the saved batch, or `n` from a saved single conversation; anything else is refused).

        A file that is missing, truncated or not safetensors (e.g. a `torch.save` pickle), that has no `stm` tensor or
        whose STM does not fit the model raises an error naming the path. An STM stored in another dtype than the
        model's is refused unless `convert_dtype=True` (then cast explicitly; narrowing rounds)."""
        path = os.fspath(path)
        expected = "expected a safetensors file with an 'stm' tensor [L, B, S, D] written by RxTChatSession.save()"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file; {expected}.")
        try:
            with safe_open(path, framework="pt") as handle:
                if "stm" not in handle.keys():
                    raise KeyError(f"tensors {sorted(handle.keys())}")
                stm = handle.get_tensor("stm")
        except Exception as error:  # safetensors raises its own error type, without the path
            with open(path, "rb") as handle:
                magic = handle.read(2)
            kind = "a torch.save archive/pickle, not safetensors" if magic[:2] == b"PK" or magic[:1] == b"\x80" else (
                "not a complete safetensors file")  # fmt: skip
            if isinstance(error, KeyError):
                kind = f"a safetensors file without an 'stm' tensor ({error.args[0]})"
            raise ValueError(f"{path} is {kind}: {expected}.") from error
        param = model.get_input_embeddings().weight
        if stm.is_floating_point() and stm.dtype != param.dtype:
            if not convert_dtype:
                raise ValueError(
                    f"{path} holds an STM in {stm.dtype}, but the model runs in {param.dtype}; expected the same dtype. "
                    "Pass convert_dtype=True to cast it, or load the model in the file's dtype."
                )
            stm = stm.to(param.dtype)
        stm = stm.to(param.device)
        try:
            model.model.check_stm(stm)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        return cls(model, tokenizer, stm=stm, **kwargs)

    # -- templates (docs/spec.md#templates) ---------------------------------------------------------------------------
    def _need(self, key: str, token: str, what: str) -> int:
        token_id = self.token_ids.get(key)
        if token_id is None:
            raise ValueError(
                f"{what} needs the {token} token, which this tokenizer lacks; expected an RxT-Beta tokenizer with "
                "[T] [C] [U] [I] (train_rxt_tokenizer adds them)."
            )
        return token_id

    def _system_segments(self, text: str, template: str | None = None) -> list[tuple[str, bool]]:
        from .tokenization_rxt import system_segments

        config = self.model.config
        return system_segments(text, template or config.system_template, config.system_prompt_title)

    def render_system(self, text: str, template: str | None = None) -> str:
        """System prompt / memory-initialisation text rendered with `template` (default `config.system_template`;
        `{title}` is `config.system_prompt_title`)."""
        return "".join(part for part, _ in self._system_segments(text, template))

    def _prompt_segments(self, text: str, kind: str = "query", internal: str | None = None,
                         thinking_mode: str | None = None) -> list[tuple[str, bool]]:  # fmt: skip
        from .tokenization_rxt import RXT_TEMPLATES, turn_prompt_segments

        if kind == "tool_result":
            self._need("tool_use_token_id", RXT_TOKEN_ID_FIELDS["tool_use_token_id"], "a tool-result turn")
        if internal is not None:
            self._need("internal_token_id", RXT_TOKEN_ID_FIELDS["internal_token_id"], "an internal instruction")
        segments = turn_prompt_segments(text, kind, internal)
        if kind == "query" and thinking_mode is None:
            segments.append((RXT_TEMPLATES["alpha_answer_prompt"], False))
        return segments

    def render_prompt(self, text: str, kind: str = "query", internal: str | None = None,
                      thinking_mode: str | None = None) -> str:  # fmt: skip
        """The decoder prompt of one turn: Alpha `[BOS][Q]query[A]` (`thinking_mode=None`), or Beta
        `[BOS]([I]internal)?[Q]query` / `[BOS]([I]internal)?[U]result` (the section token is generated)."""
        return "".join(part for part, _ in self._prompt_segments(text, kind, internal, thinking_mode))

    def _first_tokens(self, thinking_mode: str | None) -> list[int] | None:
        from .tokenization_rxt import RXT_THINKING_MODES

        if thinking_mode is None:
            return None
        if thinking_mode not in RXT_THINKING_MODES:
            modes = ", ".join(map(repr, RXT_THINKING_MODES))
            raise ValueError(f"thinking_mode={thinking_mode!r}: expected None or one of {modes}.")
        field = {token: name for name, token in RXT_TOKEN_ID_FIELDS.items()}
        return [self._need(field[t], t, f"thinking_mode={thinking_mode!r}") for t in RXT_THINKING_MODES[thinking_mode]]

    # -- one turn -------------------------------------------------------------------------------------------------
    def _encode(self, rows: list[list[tuple[str, bool]]], padding_side: str) -> dict[str, torch.Tensor]:
        """Rendered rows (`(text, is_user_text)` segments) → padded `input_ids` / `attention_mask` on the model's
        device; user text follows `self.control_tokens`."""
        from .tokenization_rxt import tokenize_segments

        ids = tokenize_segments(self.tokenizer, rows, self.control_tokens)
        width = max(len(row) for row in ids)
        pad = self.model.config.pad_token_id or 0
        device = self.model.get_input_embeddings().weight.device
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):  # per conversation, once per turn (not per token)
            span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}

    def _rows(self, value, name: str) -> list:
        """A str / None for every conversation, or a list with one per conversation."""
        batch = self.cache.stm.shape[1]
        values = [value] * batch if value is None or isinstance(value, str) else list(value)
        if len(values) != batch:
            raise ValueError(f"{len(values)} {name} values for a session of {batch} conversations; expected equal.")
        return values

    def _check_user_texts(self, texts: list, what: str) -> None:
        from .tokenization_rxt import check_user_text

        for i, text in enumerate(texts):
            if text is not None:
                check_user_text(text, what if len(texts) == 1 else f"{what} {i}", self.control_tokens)

    def _check_generate_kwargs(self, generate_kwargs: dict) -> None:
        for key in ("cache", "past_key_values", "input_ids", "attention_mask", "inputs_embeds"):
            if key in generate_kwargs:
                raise ValueError(f"{key}= is set by the session (it owns the prompt and the RxTCache); remove it.")
        config = generate_kwargs.get("generation_config") or self.model.generation_config
        for key in ("num_beams", "num_return_sequences"):
            value = generate_kwargs.get(key, getattr(config, key, None))
            if value not in (None, 1):
                raise ValueError(
                    f"{key}={value}: a chat session keeps one answer per conversation, expected 1. For several "
                    "candidates call model.generate(..., cache=RxTCache(stm=session.stm)) and write the chosen one "
                    "with model.update_memory."
                )

    def interact(self, query, streamer=None, max_new_tokens: int = 64, thinking_mode: str | None = None,
                 internal=None, **generate_kwargs):  # fmt: skip
        """Answer `query` (str, or list of str — one per conversation in the batch) and update memory.

        Returns the answer text (or a list). `thinking_mode=None` is the Alpha turn (`[BOS][Q]query[A]`, the answer
        is returned without special tokens); `'fast'` / `'extended'` / `'auto'` make it a Beta turn whose first
        generated token is `[A]` / `[T]` / the larger-logit one of the two, returned with its section tokens.
        `internal` (str, or one per conversation) adds `[I]internal` after `[BOS]`. `streamer` (e.g.
        `TextIteratorStreamer`) receives tokens as they are generated; the memory update starts after generation.
        If anything in the turn raises, the session is as before the turn (see the class docstring).
        """
        queries = [query] if isinstance(query, str) else list(query)
        if any(not isinstance(q, str) or not q for q in queries):
            raise ValueError("Empty query: expected non-empty text for every conversation.")
        answers = self._turn(queries, "query", thinking_mode, internal, streamer, max_new_tokens, generate_kwargs)
        return answers[0] if isinstance(query, str) else answers

    def tool_result(self, result, streamer=None, max_new_tokens: int = 64, thinking_mode: str | None = None,
                    internal=None, **generate_kwargs):  # fmt: skip
        """A Beta tool-result turn `[BOS]([I]internal)?[U]result` (str, or one per conversation): generate the reply
        (the first section token forced / chosen by `thinking_mode`, or free with None) and update memory. Returns
        the generated text with its section tokens, without `[EOS]`."""
        results = [result] if isinstance(result, str) else list(result)
        if any(not isinstance(r, str) or not r for r in results):
            raise ValueError("Empty tool result: expected non-empty text for every conversation.")
        answers = self._turn(results, "tool_result", thinking_mode, internal, streamer, max_new_tokens, generate_kwargs)
        return answers[0] if isinstance(result, str) else answers

    def _turn(self, texts, kind, thinking_mode, internal, streamer, max_new_tokens, generate_kwargs) -> list[str]:
        from transformers import LogitsProcessorList

        first = self._first_tokens(thinking_mode)
        self._check_generate_kwargs(generate_kwargs)
        with self._lock:
            self._join_update()  # a failed background update is raised here, once, and this turn does not run
            committed = self.cache
            batch = committed.stm.shape[1]
            if len(texts) != batch:
                raise ValueError(f"{len(texts)} queries for a session of {batch} conversations; expected equal.")
            internals = self._rows(internal, "internal")
            self._check_user_texts(texts, "query" if kind == "query" else "tool result")
            self._check_user_texts(internals, "internal")
            self._turns += 1
            turn = self._turns
            # Left-pad prompts so every row's generation starts right after its own prompt.
            rows = [self._prompt_segments(t, kind, i, thinking_mode) for t, i in zip(texts, internals)]
            prompt = self._encode(rows, padding_side="left")
            config = self.model.config
            generate_kwargs.setdefault("do_sample", False)
            if first is not None:
                processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
                processors.append(self._FirstSectionToken(prompt["input_ids"].shape[1], first))
                generate_kwargs["logits_processor"] = processors
            # Generate on a copy of the committed cache (same STM and memory K/V tensors, nothing is written into
            # them): whatever fails below, the session still holds `committed`.
            turn_cache = RxTCache(stm=committed.stm)
            turn_cache.memory_kv.update(committed.memory_kv)
            try:
                output = self.model.generate(
                    **prompt,
                    cache=turn_cache,
                    streamer=streamer,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=config.eos_token_id,
                    pad_token_id=config.pad_token_id,
                    **generate_kwargs,
                )
            except BaseException:
                if streamer is not None:
                    self._end_streamer(streamer)
                raise
            output = getattr(output, "sequences", output)  # return_dict_in_generate=True
            interaction, generated = self._interaction(prompt, output)
            keep_sections = kind != "query" or thinking_mode is not None  # e.g. [T]...[A]... of Beta turns
            answers = self.tokenizer.batch_decode(generated, skip_special_tokens=not keep_sections)
            if self.background_update:
                self._update_thread = threading.Thread(
                    target=self._update_in_background, args=(committed, interaction, turn), daemon=True
                )
                self._update_thread.start()
            else:
                self.cache = self._updated(committed, interaction)
        return answers

    @staticmethod
    def _end_streamer(streamer) -> None:
        """Release a streamer's reader after a failed generation (its own error, if any, is logged, not raised)."""
        try:
            streamer.end()
        except Exception as error:
            logger.warning("streamer.end() after a failed turn raised %s: %s", type(error).__name__, error)

    def _interaction(self, prompt: dict, output: torch.Tensor) -> tuple[dict, list[torch.Tensor]]:
        """Memory-update input (docs/spec.md#one-turn): per row the prompt ids (left padding removed) + the generated
        ids up to and including the first `[EOS]` (all of them when stopped by length), left-aligned and right-padded
        with `[PAD]` (mask 0). Also returns each row's generated ids without that `[EOS]` (the answer to decode)."""
        eos = self.model.config.eos_token_id
        eos = torch.tensor([] if eos is None else eos, dtype=output.dtype, device=output.device).reshape(-1)
        prompt_ids, prompt_mask = prompt["input_ids"], prompt["attention_mask"].bool()  # [B, P]
        new = output[:, prompt_ids.shape[1] :]  # [B, G]
        is_eos = torch.isin(new, eos)
        before_eos = (is_eos.cumsum(1) - is_eos.long()) == 0  # [B, G]: up to and including the first [EOS]
        tokens = torch.cat([prompt_ids, new], dim=1)  # [B, P + G]
        keep = torch.cat([prompt_mask, before_eos], dim=1)
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # kept tokens first, in order
        mask = keep.gather(1, order)[:, : int(keep.sum(1).max())]
        ids = tokens.gather(1, order)[:, : mask.shape[1]].masked_fill(~mask, self.model.config.pad_token_id or 0)
        answers = before_eos & ~is_eos
        return {"input_ids": ids, "attention_mask": mask.long()}, [row[keep_row] for row, keep_row in zip(new, answers)]

    def _updated(self, committed: RxTCache, interaction: dict) -> RxTCache:
        """A new cache holding the STM after writing `interaction` into `committed.stm` (and the next turn's memory
        K/V); `committed` is left untouched."""
        cache = RxTCache(stm=committed.stm)
        self.model.update_memory(interaction["input_ids"], interaction["attention_mask"], cache)
        return cache

    def _update_in_background(self, committed: RxTCache, interaction: dict, turn: int) -> None:
        try:
            cache = self._updated(committed, interaction)
        except BaseException as error:  # raised once by the next call that waits (_join_update)
            self._update_error = (turn, error)
        else:
            self.cache = cache

    # -- memory initialisation from text (docs/spec.md#memory-initialisation-from-text) -------------------------------
    def init_stm(self, text, force: bool = False, noise_level: float = 0.0, template: str | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        """Start the conversation(s) from a fresh initial STM initialised with `text` (a system prompt; str for every
        conversation, or one per conversation) rendered with `template` (default `config.system_template`).

        Default: one memory-attention update from the initial STM; `force=True`: the (right-padded to `S`) ED is
        copied into the STM (a ValueError names both lengths when the text is longer than `S` tokens).
        `noise_level` adds Gaussian noise of that standard deviation to ED. Returns the new STM. On an error the
        session keeps its STM.
        """
        with self._lock:
            self._join_update()
            texts = self._rows(text, "text")
            if any(not isinstance(t, str) or not t for t in texts):
                raise ValueError("init_stm() needs non-empty text for every conversation.")
            self._check_user_texts(texts, "system text")
            batch = self._encode([self._system_segments(t, template) for t in texts], padding_side="right")
            stm = self.model.init_stm(
                batch["input_ids"], batch["attention_mask"], force=force, noise_level=noise_level, generator=generator
            )
            self.cache = RxTCache(stm=stm)
        return stm


# ---------------------------------------------------------------------------------------------------------------------
# Stateless baseline
# ---------------------------------------------------------------------------------------------------------------------


class RxTStatelessPreTrainedModel(RxTPreTrainedModel):
    """The stateless baseline's family: RxT's flags and initialisation with its own config class and `auto_map`."""

    config_class = RxTStatelessConfig
    config: RxTStatelessConfig
    _no_split_modules = ["RxTDecoderLayer"]
    _auto_map = STATELESS_AUTO_MAP


class RxTStatelessModel(RxTStatelessPreTrainedModel):
    """Decoder-only baseline from the same blocks, without memory (no STM, no cross-attention): token embedding and
    decoder."""

    def __init__(self, config: RxTStatelessConfig):
        super().__init__(config)
        dec = config.decoder_config
        self.embed_tokens = nn.Embedding(dec.vocab_size, dec.embed_dim)
        self.decoder = RxTDecoder(dec, config.rope_layout, config)
        self.post_init()

    @accept_past_key_values
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> RxTModelOutput:
        """`input_ids [B, T]` → `last_hidden_state [B, T, D]` (after the head norm)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids [B, T] or inputs_embeds [B, T, D].")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        past_length = cache.get_seq_length() if cache is not None else 0
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, inputs_embeds.shape[1], past_length, inputs_embeds.device)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_KWARG: cache},
        )
        hidden_states = self.decoder(inputs_embeds, None, mask, position_ids, cache, **kwargs)
        aux_loss = self.decoder.router_loss() if self.training else None
        return RxTModelOutput(last_hidden_state=hidden_states, cache=cache, aux_loss=aux_loss)


class RxTStatelessForCausalLM(RxTStatelessPreTrainedModel, GenerationMixin):
    """The stateless baseline with its LM head (`Linear(D, V)` with bias, untied), for comparisons with RxT."""

    _tied_weights_keys = {}

    def __init__(self, config: RxTStatelessConfig):
        super().__init__(config)
        self.model = RxTStatelessModel(config)
        self.lm_head = nn.Linear(config.decoder_config.embed_dim, config.decoder_config.vocab_size, bias=True)
        self.post_init()

    @accept_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> RxTCausalLMOutput:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return RxTCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=outputs.aux_loss,
        )


RxTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
RxTStatelessForCausalLM.register_for_auto_class("AutoModelForCausalLM")


__all__ = [
    "RxTPreTrainedModel",
    "RxTModel",
    "RxTForCausalLM",
    "RxTStatelessPreTrainedModel",
    "RxTStatelessModel",
    "RxTStatelessForCausalLM",
    "RxTChatSession",
    "RxTMemoryUpdateError",
    "RxTCache",
]
