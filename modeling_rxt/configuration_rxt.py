"""Configuration of the Reactive Transformer (RxT).

`RxTConfig` holds three sub-configs (decoder, memory encoder, memory-attention network) plus the model-level
fields (RoPE layout, memory-attention variant, STM init, special-token ids). Field names and defaults follow the
reference implementation (rxlm 0.3.80) except `use_rope` (reference `use_nope`, inverted). Every value is validated
at construction; errors name the field and the expected value.

This file is self-contained (it is copied flat into saved model folders for `trust_remote_code`).
"""

from __future__ import annotations

import dataclasses

from huggingface_hub.dataclasses import strict
from transformers import GenerationConfig, PreTrainedConfig

from .tokenization_rxt import RXT_DEFAULT_TOKEN_IDS as TOKEN_IDS
from .tokenization_rxt import RXT_TEMPLATES

ATTENTION_TYPES = ("mha", "gqa", "mqa", "sqa")
OUT_OF_SCOPE_ATTENTION_TYPES = ("hybrid", "gma", "dma")
ACTIVATIONS = ("relu", "gelu", "swish", "silu", "sigmoid", "tanh", "linear")
MOE_BIAS_MODES = ("global", "local", "off")
HEAD_NORM_TYPES = ("layer_norm", "rms_norm")
STATELESS_LAYER_TYPES = ("dense", "moe")
ROUTER_DTYPES = ("float32", "bfloat16", "float16")
MEMORY_NORM_TYPES = ("classic-rms", "rms", "adaptive", "positional", "layer")
RESIDUAL_GATE_TYPES = ("static", "elementwise", "linear")
SLOT_STATUS_TYPES = ("mean", "linear")
MEMORY_ATTENTION_VARIANTS = ("simple", "self", "interlayer", "self-interlayer", "grouped-self-interlayer")
ROPE_LAYOUTS = ("interleaved", "split_concat")
# Keys transformers writes or accepts on every config (besides PreTrainedConfig().to_dict()), and reference aliases.
HF_CONFIG_EXTRAS = {"torch_dtype", "auto_map", "use_nope", "tie_word_embeddings"}
# Keys `PreTrainedConfig.__post_init__` consumes besides its fields (`from_pretrained` passes some of them), and the
# generation parameters it drops from configs saved with them.
HF_INIT_KWARGS = {
    "name_or_path", "_commit_hash", "attn_implementation", "experts_implementation", "output_attentions",
    "num_labels", "per_layer_config", "_attn_implementation", "_attn_implementation_internal",
    "_experts_implementation", "_experts_implementation_internal",
} | set(getattr(GenerationConfig, "_get_default_generation_params", dict)())  # fmt: skip
STM_INIT_MODES = ("standard", "normal", "uniform", "ones", "zeros")
LINEAR_INIT_MODES = ("normal", "pytorch")
# Reference fields of features that are out of scope (GMA/DMA experts, hybrid/linear attention, fp8).
OUT_OF_SCOPE_FIELDS = (
    "att_experts", "att_query_experts", "interlayer_att_experts", "interlayer_att_query_experts",
    "self_att_experts", "self_att_query_experts", "cross_att_experts", "cross_att_query_experts",
    "attn_layer_types", "stateless_attn_layer_types", "final_stateless_attn_layer_types",
    "linear_attn_type", "linear_attn_config", "use_fp8", "use_transformer_engine",
)  # fmt: skip


def _check_choice(owner: str, field: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{field}={value!r} is not supported; expected one of {list(choices)}.")


def _check_init(owner: str, config) -> None:
    """`initializer_range` > 0 (std of embeddings, and of linears with `linear_init='normal'`); `linear_init` known."""
    _check_choice(owner, "linear_init", config.linear_init, LINEAR_INIT_MODES)
    value = config.initializer_range
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{owner}.initializer_range={config.initializer_range!r}: expected a positive float.")


def _check_positive(owner: str, field: str, value) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{field}={value!r}: expected a positive integer.")


def resolve_heads(owner: str, prefix: str, att_type: str, att_heads: int, groups, query_groups) -> tuple[int, int]:
    """Resolve an attention site's `(Hq, Hkv)` from its type and group fields
    (docs/spec.md#projections-and-head-counts)."""
    if att_type in OUT_OF_SCOPE_ATTENTION_TYPES:
        raise ValueError(f"{owner}.{prefix}type={att_type!r} is out of scope; expected one of {list(ATTENTION_TYPES)}.")
    _check_choice(owner, f"{prefix}type", att_type, ATTENTION_TYPES)
    if att_type == "mha":
        hq, hkv = att_heads, att_heads
    elif att_type == "mqa":
        hq, hkv = att_heads, 1
    elif att_type == "gqa":
        hq, hkv = att_heads, groups
    else:  # sqa
        if query_groups is None:
            raise ValueError(
                f"{owner}.{prefix}query_groups is required when {prefix}type='sqa' (the number of query heads Hq)."
            )
        hq, hkv = query_groups, groups
    _check_positive(owner, f"{prefix}groups (Hkv)", hkv)
    _check_positive(owner, f"{prefix}query_groups (Hq)", hq)
    if hq % hkv != 0 and hkv % hq != 0:
        raise ValueError(
            f"{owner}: {prefix}heads Hq={hq}, Hkv={hkv}: one must divide the other "
            f"(Hq > Hkv is grouped attention, Hq < Hkv is revSQA)."
        )
    return hq, hkv


def _reject_unknown(owner: str, cls, kwargs: dict) -> None:
    """A component field name the config does not have (a typo) is an error, not a silently stored attribute."""
    known = {f.name for f in dataclasses.fields(cls)} | set(PreTrainedConfig().to_dict()) | HF_CONFIG_EXTRAS
    known |= HF_INIT_KWARGS
    unknown = sorted(set(kwargs) - known - set(OUT_OF_SCOPE_FIELDS))
    if unknown:
        raise ValueError(f"{owner}: unknown field(s) {unknown}; expected fields of {cls.__name__} (see its docstring).")


def _reject_out_of_scope(owner: str, kwargs: dict) -> None:
    for field in OUT_OF_SCOPE_FIELDS:
        if kwargs.get(field) is not None:
            raise ValueError(
                f"{owner}.{field}={kwargs[field]!r}: GMA/DMA, hybrid/linear attention and fp8 are out of scope; "
                "expected None."
            )


def _check_model_type(cls, path, kwargs: dict) -> None:
    """Raise a ValueError naming `path` when its config's `model_type` is not `cls.model_type`."""
    keys = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")
    config_dict, _ = PreTrainedConfig.get_config_dict(path, **{k: kwargs[k] for k in keys if k in kwargs})
    model_type = config_dict.get("model_type")
    if model_type is not None and model_type != cls.model_type:
        hint = ("build the baseline with RxTStatelessConfig.from_rxt_config(config)" if model_type == "rxt"
                else "convert the checkpoint to RxT first")  # fmt: skip
        raise ValueError(
            f"{path} holds a config of model_type={model_type!r}, expected {cls.model_type!r} ({cls.__name__}); "
            f"load it with its own class (AutoConfig / AutoModel), or {hint}."
        )


class _RefusesOtherModelTypes:
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedConfig.from_pretrained`, refusing a `config.json` of another model type before anything is
        built (transformers would only warn and fill an RxT config from foreign fields). Model classes load their
        config through it, so their `from_pretrained` refuses such a folder too."""
        _check_model_type(cls, pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


class _DecoderSizes:
    """The standard fields generic tools read on the top-level config, for the decoder: `vocab_size` (settable: the
    decoder's and, with a memory encoder, the encoder's, which share the embedding), `hidden_size`, `head_dim`,
    `num_hidden_layers` (every decoder layer: leading stateless + memory + final stateless; one self-attention KV
    cache layer each), `num_attention_heads` (attention heads after query tiling, `max(Hq, Hkv)`, as in the
    attention weights) and `num_key_value_heads` (`Hkv` of the cached keys / values)."""

    @property
    def vocab_size(self) -> int:
        return self.decoder_config.vocab_size

    @vocab_size.setter
    def vocab_size(self, value: int) -> None:
        self.decoder_config.vocab_size = value
        if getattr(self, "encoder_config", None) is not None:
            self.encoder_config.vocab_size = value

    @property
    def hidden_size(self) -> int:
        return self.decoder_config.embed_dim

    @property
    def head_dim(self) -> int:
        return self.decoder_config.head_dim

    @property
    def num_hidden_layers(self) -> int:
        dec = self.decoder_config
        return len(dec.stateless_layers_config or ()) + dec.num_layers + len(dec.final_stateless_layers_config or ())

    @property
    def num_attention_heads(self) -> int:
        return max(self.decoder_config.self_attention_heads)

    @property
    def num_key_value_heads(self) -> int:
        return self.decoder_config.self_attention_heads[1]


@strict
class RxTComponentConfig(PreTrainedConfig):
    r"""Decoder or memory-encoder settings (docs/spec.md#configuration).

    Defaults are the reference's (rxlm 0.3.80) except the head fields, which default to a valid sSQA (8/8 of 16);
    the reference default `sqa` without query groups cannot be built. Converted checkpoints state every field.

    The encoder uses the same fields with `skip_memory_cross_attention=True`; stateless layers and the head norm are
    decoder-only. `att_heads` only fixes the head dim `embed_dim // att_heads`; the per-site query / key-value head
    counts come from the `*_att_type` / `*_groups` / `*_query_groups` fields.
    """

    model_type = "rxt_component"
    base_config_key = "decoder_config"  # RxTComponentConfig.from_pretrained(rxt_folder) is the decoder's
    attribute_map = {
        "hidden_size": "embed_dim",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "att_heads",
        "intermediate_size": "ff_dim",
    }

    num_layers: int = 12
    vocab_size: int = 20000
    embed_dim: int = 512
    ff_dim: int = 1536
    att_heads: int = 16
    seq_len: int = 1024
    stm_size: int = 1024
    use_gated: bool = True
    ff_activation: str = "swish"
    ff_dropout: float | int = 0.0
    att_dropout: float | int = 0.0
    use_rms_norm: bool = True
    self_att_type: str = "sqa"
    att_groups: int = 8
    att_query_groups: int | None = 8
    cross_att_type: str = "sqa"
    cross_att_groups: int | None = None
    cross_att_query_groups: int | None = None
    use_gated_attention: bool = False
    gated_attention_activation: str = "sigmoid"
    use_gated_cross_attention: bool | None = None
    use_attention_output_bias: bool = True
    rope_base: float | int = 10000.0
    use_rope: bool = True
    use_moe: bool = False
    num_experts: int = 1
    moe_top_k: int = 1
    num_shared_experts: int = 1
    shared_expert_dim: int | None = None
    moe_bias_mode: str = "global"
    moe_shared_experts_bias_mode: str = "local"
    moe_use_weighted_shared_experts: bool = False
    router_amp: bool = False
    router_dtype: str = "float32"
    use_head_norm: bool = False
    head_norm_type: str = "layer_norm"
    init_identity_norm: bool = False
    skip_memory_cross_attention: bool = False
    stateless_layers_config: list[str] | None = None
    final_stateless_layers_config: list[str] | None = None
    dense_layer_dim: int = 1536
    use_flash_attention: bool = False  # reference backend flag, recorded only (docs/spec.md#padding-semantics)
    is_decoder: bool = True

    def __post_init__(self, **kwargs):
        _reject_out_of_scope("RxTComponentConfig", kwargs)
        _reject_unknown("RxTComponentConfig", type(self), kwargs)
        if kwargs.get("use_nope") is not None:  # reference name
            self.use_rope = not kwargs.pop("use_nope")
        super().__post_init__(**kwargs)
        self.validate_component()

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.att_heads

    @property
    def self_attention_heads(self) -> tuple[int, int]:
        """`(Hq, Hkv)` of self-attention."""
        return resolve_heads(
            "RxTComponentConfig", "self_att_", self.self_att_type, self.att_heads, self.att_groups,
            self.att_query_groups,
        )

    @property
    def cross_attention_heads(self) -> tuple[int, int]:
        """`(Hq, Hkv)` of memory cross-attention (`cross_att_*`, falling back to the self-attention groups)."""
        groups = self.cross_att_groups if self.cross_att_groups is not None else self.att_groups
        query_groups = self.cross_att_query_groups if self.cross_att_query_groups is not None else self.att_query_groups
        return resolve_heads(
            "RxTComponentConfig", "cross_att_", self.cross_att_type, self.att_heads, groups, query_groups
        )

    @property
    def gated_cross_attention(self) -> bool:
        return self.use_gated_attention if self.use_gated_cross_attention is None else self.use_gated_cross_attention

    @property
    def has_memory_cross_attention(self) -> bool:
        return not self.skip_memory_cross_attention

    def validate_component(self) -> None:
        owner = "RxTComponentConfig"
        for field in ("num_layers", "vocab_size", "embed_dim", "ff_dim", "att_heads", "seq_len", "stm_size",
                      "dense_layer_dim", "num_experts", "moe_top_k"):  # fmt: skip
            _check_positive(owner, field, getattr(self, field))
        if self.embed_dim % self.att_heads != 0:
            raise ValueError(
                f"{owner}: embed_dim={self.embed_dim} must be divisible by att_heads={self.att_heads} "
                "(head dim = embed_dim / att_heads)."
            )
        if self.use_rope and self.head_dim % 2 != 0:
            raise ValueError(f"{owner}: RoPE needs an even head dim, got embed_dim/att_heads={self.head_dim}.")
        _check_choice(owner, "ff_activation", self.ff_activation, ACTIVATIONS)
        _check_choice(owner, "gated_attention_activation", self.gated_attention_activation, ACTIVATIONS)
        _check_choice(owner, "moe_bias_mode", self.moe_bias_mode, MOE_BIAS_MODES)
        _check_choice(owner, "moe_shared_experts_bias_mode", self.moe_shared_experts_bias_mode, MOE_BIAS_MODES)
        _check_choice(owner, "head_norm_type", self.head_norm_type, HEAD_NORM_TYPES)
        _check_choice(owner, "router_dtype", self.router_dtype, ROUTER_DTYPES)
        self.self_attention_heads  # noqa: B018 - validates the self-attention heads
        if self.has_memory_cross_attention:
            self.cross_attention_heads  # noqa: B018 - validates the cross-attention heads
        if self.moe_top_k > self.num_experts:
            raise ValueError(f"{owner}: moe_top_k={self.moe_top_k} must be <= num_experts={self.num_experts}.")
        if self.num_shared_experts < 0:
            raise ValueError(f"{owner}.num_shared_experts={self.num_shared_experts}: expected >= 0.")
        if self.rope_base <= 0:
            raise ValueError(f"{owner}.rope_base={self.rope_base}: expected a positive number.")
        for field in ("ff_dropout", "att_dropout"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"{owner}.{field}={getattr(self, field)}: expected a probability in [0, 1).")
        for field in ("stateless_layers_config", "final_stateless_layers_config"):
            kinds = getattr(self, field)
            if not kinds:
                continue
            if not self.is_decoder:
                raise ValueError(f"{owner}.{field}={kinds}: stateless layers exist only in a decoder; expected None.")
            for kind in kinds:
                _check_choice(owner, field + "[*]", kind, STATELESS_LAYER_TYPES)
        if self.use_head_norm and not self.is_decoder:
            raise ValueError(f"{owner}.use_head_norm=True: the head norm exists only in a decoder; expected False.")


@strict
class RxTEncoderConfig(RxTComponentConfig):
    r"""Memory-encoder settings: the fields of `RxTComponentConfig`, without memory cross-attention and decoder-only
    parts (`skip_memory_cross_attention=True`, `is_decoder=False`). `RxTEncoderConfig.from_pretrained(rxt_folder)`
    is the encoder's sub-config."""

    base_config_key = "encoder_config"

    skip_memory_cross_attention: bool = True
    is_decoder: bool = False


@strict
class RxTMemoryAttentionConfig(PreTrainedConfig):
    r"""Memory-attention network settings (docs/spec.md#configuration, docs/spec.md#memory-attention)."""

    model_type = "rxt_memory_attention"
    base_config_key = "memory_attention_config"
    attribute_map = {"hidden_size": "embed_dim", "num_hidden_layers": "num_layers", "num_attention_heads": "att_heads"}

    num_layers: int = 12
    embed_dim: int = 512
    att_heads: int = 16
    seq_len: int = 1024
    stm_size: int = 1024
    att_type: str = "sqa"
    att_groups: int = 8
    att_query_groups: int | None = 8
    att_dropout: float | int = 0.0
    interlayer_att_type: str = "sqa"
    interlayer_att_groups: int = 8
    interlayer_att_query_groups: int | None = 8
    interlayer_att_dropout: float | int = 0.0
    self_att_type: str = "sqa"
    self_att_groups: int = 8
    self_att_query_groups: int | None = 8
    self_att_dropout: float | int = 0.0
    use_gate_for_self_attention: bool = False
    num_groups: int = 1
    disable_residual: bool = False
    norm_type: str = "classic-rms"
    norm_init_gate: float | int = -2.0
    norm_per_dim_scale: bool = False
    norm_decay: float | int = 0.9
    use_gated_residual: bool = False
    residual_gate_type: str = "static"
    residual_per_slot_gate: bool = True
    residual_gate_init: float | int = 3.0
    residual_gate_init_range: list[float] | None = None  # project: per-slot gate inits linspace(low, high, S)
    residual_gate_slot_status_type: str = "mean"
    use_tanh_residual_gate: bool = True
    rope_base: float | int = 10000.0
    use_flash_attention: bool = False  # recorded only
    debug_mode: bool = False  # recorded only
    debug_interval: int = 10  # recorded only

    def __post_init__(self, **kwargs):
        _reject_out_of_scope("RxTMemoryAttentionConfig", kwargs)
        _reject_unknown("RxTMemoryAttentionConfig", type(self), kwargs)
        super().__post_init__(**kwargs)
        self.validate_memory_attention()

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.att_heads

    def heads(self, prefix: str) -> tuple[int, int]:
        """`(Hq, Hkv)` of the attention named by `prefix` in {'att_', 'interlayer_att_', 'self_att_'}."""
        return resolve_heads(
            "RxTMemoryAttentionConfig", prefix, getattr(self, prefix + "type"), self.att_heads,
            getattr(self, prefix + "groups"), getattr(self, prefix + "query_groups"),
        )  # fmt: skip

    def validate_memory_attention(self) -> None:
        owner = "RxTMemoryAttentionConfig"
        for field in ("num_layers", "embed_dim", "att_heads", "seq_len", "stm_size", "num_groups"):
            _check_positive(owner, field, getattr(self, field))
        if self.embed_dim % self.att_heads != 0:
            raise ValueError(
                f"{owner}: embed_dim={self.embed_dim} must be divisible by att_heads={self.att_heads}."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"{owner}: RoPE on ED keys needs an even head dim, got {self.head_dim}.")
        _check_choice(owner, "norm_type", self.norm_type, MEMORY_NORM_TYPES)
        _check_choice(owner, "residual_gate_type", self.residual_gate_type, RESIDUAL_GATE_TYPES)
        _check_choice(owner, "residual_gate_slot_status_type", self.residual_gate_slot_status_type, SLOT_STATUS_TYPES)
        self.heads("att_")
        if (
            self.residual_gate_slot_status_type == "linear"
            and self.residual_gate_type != "linear"
            and not self.residual_per_slot_gate
        ):
            raise ValueError(
                f"{owner}: residual_gate_slot_status_type='linear' needs residual_gate_type='linear' or "
                "residual_per_slot_gate=True."
            )
        if self.residual_gate_init_range is not None and (
            len(self.residual_gate_init_range) != 2 or not self.residual_per_slot_gate
        ):
            raise ValueError(
                f"{owner}.residual_gate_init_range={self.residual_gate_init_range}: expected [low, high] with "
                "residual_per_slot_gate=True."
            )
        if not 0.0 <= self.norm_decay <= 1.0:
            raise ValueError(f"{owner}.norm_decay={self.norm_decay}: expected a value in [0, 1].")


@strict
class RxTConfig(_RefusesOtherModelTypes, _DecoderSizes, PreTrainedConfig):
    r"""Reactive Transformer: decoder + memory encoder + memory-attention network around a fixed-size STM.

    Args:
        decoder_config / encoder_config / memory_attention_config: sub-configs (dicts are accepted).
        memory_attention_variant: one of `simple, self, interlayer, self-interlayer, grouped-self-interlayer`.
        rope_layout: `interleaved` (rxlm >= 0.3.40) or `split_concat` (older checkpoints).
        stm_init: initial STM distribution `standard` N(0,1), `normal` N(0,0.02), `uniform` U[0,0.02), `ones`,
            `zeros`; drawn from `stm_init_seed`, so the initial STM is deterministic.
        learned_stm_init: the initial STM `[L, 1, S, D]` is a trained parameter (`stm_init.stm`).
        use_mlm_head: add the encoder MLM head (joint pre-training).
        initializer_range: std of the N(0, std) init of embeddings (and of linears with `linear_init='normal'`).
        linear_init: `normal` (transformers' N(0, initializer_range), zero bias) or `pytorch` (`nn.Linear`'s own
            Kaiming-uniform init; the memory path is learnt faster early on with it, docs/training.md).
        system_template, system_prompt_title: template of the system-prompt / memory-initialisation text (`{system}`,
            `{title}`; RxTChatSession.init_stm, docs/spec.md#memory-initialisation-from-text) and the Beta title.

    Use `RxTConfig.tiny()` for a small test/example model.
    """

    model_type = "rxt"
    sub_configs_defaults = {
        "decoder_config": RxTComponentConfig,
        "encoder_config": RxTEncoderConfig,
        "memory_attention_config": RxTMemoryAttentionConfig,
    }
    keys_to_ignore_at_inference = ["cache"]

    decoder_config: RxTComponentConfig | dict | None = None
    encoder_config: RxTComponentConfig | dict | None = None
    memory_attention_config: RxTMemoryAttentionConfig | dict | None = None
    memory_attention_variant: str = "self-interlayer"
    rope_layout: str = "interleaved"
    stm_init: str = "standard"
    stm_init_seed: int = 0
    learned_stm_init: bool = False
    use_mlm_head: bool = False
    system_prompt_title: str = "SYSTEM INSTRUCTIONS"
    system_template: str = RXT_TEMPLATES["system_alpha"]
    pad_token_id: int | None = TOKEN_IDS["pad_token_id"]
    unk_token_id: int | None = TOKEN_IDS["unk_token_id"]
    bos_token_id: int | None = TOKEN_IDS["bos_token_id"]
    eos_token_id: int | list[int] | None = TOKEN_IDS["eos_token_id"]
    mask_token_id: int | None = TOKEN_IDS["mask_token_id"]
    query_token_id: int | None = TOKEN_IDS["query_token_id"]
    answer_token_id: int | None = TOKEN_IDS["answer_token_id"]
    think_token_id: int | None = None
    tool_call_token_id: int | None = None
    tool_use_token_id: int | None = None
    internal_token_id: int | None = None
    moe_aux_layers: str = "all"
    initializer_range: float = 0.02
    linear_init: str = "normal"
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        _reject_unknown("RxTConfig", type(self), kwargs)
        super().__post_init__(**kwargs)
        for name in ("decoder_config", "encoder_config"):
            sub = getattr(self, name)
            if isinstance(sub, dict):  # a sub-config created before the spec resolved it
                setattr(self, name, self.sub_configs_defaults[name](**sub))
        self.encoder_config.skip_memory_cross_attention = True
        self.encoder_config.is_decoder = False
        self.validate_model()

    @property
    def stm_shape(self) -> tuple[int, int, int]:
        """`(L, S, D)` of one conversation's STM."""
        return (self.decoder_config.num_layers, self.memory_attention_config.stm_size, self.decoder_config.embed_dim)

    def validate_model(self) -> None:
        owner = "RxTConfig"
        _check_choice(owner, "memory_attention_variant", self.memory_attention_variant, MEMORY_ATTENTION_VARIANTS)
        _check_choice(owner, "rope_layout", self.rope_layout, ROPE_LAYOUTS)
        _check_choice(owner, "stm_init", self.stm_init, STM_INIT_MODES)
        _check_choice(owner, "moe_aux_layers", self.moe_aux_layers, ("all", "reference"))
        _check_init(owner, self)
        dec, enc, mem = self.decoder_config, self.encoder_config, self.memory_attention_config
        if dec.skip_memory_cross_attention:
            raise ValueError(f"{owner}.decoder_config.skip_memory_cross_attention=True: the RxT decoder reads the STM.")
        if enc.stateless_layers_config or enc.final_stateless_layers_config:
            raise ValueError(f"{owner}.encoder_config: stateless layers exist only in the decoder; expected None.")
        if enc.use_head_norm:
            raise ValueError(f"{owner}.encoder_config.use_head_norm=True: the encoder has no head; expected False.")
        layers = {"decoder": dec.num_layers, "encoder": enc.num_layers, "memory_attention": mem.num_layers}
        if len(set(layers.values())) != 1:
            raise ValueError(
                f"{owner}: memory layer counts differ {layers}; decoder, encoder and memory attention must have the "
                "same num_layers (one STM layer each)."
            )
        dims = {"decoder": dec.embed_dim, "encoder": enc.embed_dim, "memory_attention": mem.embed_dim}
        if len(set(dims.values())) != 1:
            raise ValueError(f"{owner}: embed_dim differs {dims}; expected one width D for all components.")
        if dec.vocab_size != enc.vocab_size:
            raise ValueError(
                f"{owner}: vocab_size differs (decoder {dec.vocab_size}, encoder {enc.vocab_size}); the embedding is "
                "shared, expected equal."
            )
        if dec.stm_size != mem.stm_size:
            raise ValueError(
                f"{owner}: decoder stm_size={dec.stm_size} but memory_attention stm_size={mem.stm_size}; expected equal."
            )
        if self.memory_attention_variant != "grouped-self-interlayer" and mem.num_groups != 1:
            raise ValueError(
                f"{owner}: memory_attention_config.num_groups={mem.num_groups} applies only to the "
                f"'grouped-self-interlayer' variant (this one is {self.memory_attention_variant!r}); expected 1."
            )
        if self.memory_attention_variant == "grouped-self-interlayer" and mem.num_layers % mem.num_groups != 0:
            raise ValueError(
                f"{owner}: grouped-self-interlayer needs num_layers % num_groups == 0, got {mem.num_layers} layers "
                f"and num_groups={mem.num_groups}."
            )
        if self.memory_attention_variant in ("interlayer", "self-interlayer", "grouped-self-interlayer"):
            mem.heads("interlayer_att_")
        if self.memory_attention_variant == "self":
            mem.heads("self_att_")
        if mem.disable_residual and self.memory_attention_variant != "simple":
            raise ValueError(f"{owner}: disable_residual=True exists only in the 'simple' memory-attention variant.")
        for field in ("pad_token_id", "bos_token_id", "query_token_id", "answer_token_id"):
            value = getattr(self, field)
            if value is not None and not 0 <= value < dec.vocab_size:
                raise ValueError(f"{owner}.{field}={value}: expected an id in [0, {dec.vocab_size}).")

    @classmethod
    def tiny(
        cls,
        vocab_size: int = 256,
        embed_dim: int = 32,
        num_layers: int = 2,
        att_heads: int = 4,
        stm_size: int = 8,
        memory_attention_variant: str = "self-interlayer",
        **kwargs,
    ) -> RxTConfig:
        """A small dense sSQA model (D=32, 2 layers, 4 heads, 8 STM slots) for tests and examples.

        Keyword arguments override model-level fields; `decoder=`/`encoder=`/`memory_attention=` dicts override
        sub-config fields.
        """
        half = max(att_heads // 2, 1)
        common = dict(
            num_layers=num_layers, vocab_size=vocab_size, embed_dim=embed_dim, ff_dim=embed_dim * 2,
            att_heads=att_heads, seq_len=256, stm_size=stm_size, self_att_type="sqa", att_groups=half,
            att_query_groups=half, cross_att_type="sqa", cross_att_groups=half, cross_att_query_groups=half,
            ff_activation="silu", use_gated=True,
        )  # fmt: skip
        decoder = {**common, "use_head_norm": True, "head_norm_type": "rms_norm", **kwargs.pop("decoder", {})}
        encoder = {**common, **kwargs.pop("encoder", {})}
        memory_attention = dict(
            num_layers=num_layers, embed_dim=embed_dim, att_heads=att_heads, seq_len=256, stm_size=stm_size,
            att_type="sqa", att_groups=half, att_query_groups=half, interlayer_att_type="sqa",
            interlayer_att_groups=half, interlayer_att_query_groups=half, self_att_type="sqa", self_att_groups=half,
            self_att_query_groups=half, use_gated_residual=True, residual_gate_type="elementwise",
            use_tanh_residual_gate=False,
        )  # fmt: skip
        memory_attention.update(kwargs.pop("memory_attention", {}))
        return cls(
            decoder_config=decoder,
            encoder_config=encoder,
            memory_attention_config=memory_attention,
            memory_attention_variant=memory_attention_variant,
            **kwargs,
        )


@strict
class RxTStatelessConfig(_RefusesOtherModelTypes, _DecoderSizes, PreTrainedConfig):
    r"""Stateless decoder-only baseline built from RxT blocks (no STM, no memory cross-attention).

    `RxTStatelessConfig.from_rxt_config(config)` gives the same-size decoder as an RxT model.
    """

    model_type = "rxt_stateless"
    sub_configs_defaults = {"decoder_config": RxTComponentConfig}
    keys_to_ignore_at_inference = ["cache"]

    decoder_config: RxTComponentConfig | dict | None = None
    rope_layout: str = "interleaved"
    pad_token_id: int | None = TOKEN_IDS["pad_token_id"]
    bos_token_id: int | None = TOKEN_IDS["bos_token_id"]
    eos_token_id: int | list[int] | None = TOKEN_IDS["eos_token_id"]
    query_token_id: int | None = TOKEN_IDS["query_token_id"]
    answer_token_id: int | None = TOKEN_IDS["answer_token_id"]
    initializer_range: float = 0.02
    linear_init: str = "normal"
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        _reject_unknown("RxTStatelessConfig", type(self), kwargs)
        super().__post_init__(**kwargs)
        self.decoder_config.skip_memory_cross_attention = True
        _check_choice("RxTStatelessConfig", "rope_layout", self.rope_layout, ROPE_LAYOUTS)
        _check_init("RxTStatelessConfig", self)

    @classmethod
    def from_rxt_config(cls, config: RxTConfig, **kwargs) -> RxTStatelessConfig:
        """The decoder of `config` without memory (same layers, widths, heads, vocab, token ids)."""
        decoder = config.decoder_config.to_dict()
        for key in ("model_type", "transformers_version", "architectures"):
            decoder.pop(key, None)
        decoder["skip_memory_cross_attention"] = True
        ids = {k: getattr(config, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id", "query_token_id",
                                                 "answer_token_id", "initializer_range", "linear_init")}  # fmt: skip
        return cls(decoder_config=decoder, rope_layout=config.rope_layout, **{**ids, **kwargs})


RxTConfig.register_for_auto_class()
RxTStatelessConfig.register_for_auto_class()

__all__ = ["RxTComponentConfig", "RxTEncoderConfig", "RxTMemoryAttentionConfig", "RxTConfig", "RxTStatelessConfig"]
