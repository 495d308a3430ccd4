"""Config validation: every bad value is rejected at construction with an error naming the field and the expected value;
valid configs round-trip through save_pretrained / from_pretrained."""

import pytest

from modeling_rxt import RxTComponentConfig, RxTConfig, RxTMemoryAttentionConfig, RxTStatelessConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(decoder=dict(att_heads=5)), r"embed_dim=32 must be divisible by att_heads=5"),
        (dict(encoder=dict(num_layers=3)), r"memory layer counts differ .*'encoder': 3"),
        (dict(memory_attention=dict(num_layers=3)), r"memory layer counts differ"),
        (dict(decoder=dict(self_att_type="sqa", att_query_groups=None)), r"self_att_query_groups is required"),
        (dict(decoder=dict(self_att_type="sqa", att_query_groups=3, att_groups=2)), r"Hq=3, Hkv=2: one must divide"),
        (dict(decoder=dict(cross_att_type="banana")), r"cross_att_type='banana' is not supported; expected one of"),
        (dict(decoder=dict(self_att_type="hybrid")), r"self_att_type='hybrid' is out of scope"),
        (dict(decoder=dict(ff_activation="softplus")), r"ff_activation='softplus' is not supported"),
        (dict(decoder=dict(moe_bias_mode="sometimes")), r"moe_bias_mode='sometimes'"),
        (dict(decoder=dict(use_moe=True, num_experts=2, moe_top_k=3)), r"moe_top_k=3 must be <= num_experts=2"),
        (dict(decoder=dict(head_norm_type="batch_norm")), r"head_norm_type='batch_norm'"),
        (dict(decoder=dict(stateless_layers_config=["dense", "sparse"])), r"stateless_layers_config\[\*\]='sparse'"),
        (dict(encoder=dict(final_stateless_layers_config=["dense"])), r"stateless layers exist only in (a|the) decoder"),
        (dict(encoder=dict(use_head_norm=True)), r"encoder has no head|head norm exists only in a decoder"),
        (dict(decoder=dict(att_dropout=1.5)), r"att_dropout=1.5: expected a probability"),
        (dict(decoder=dict(stm_size=9)), r"decoder stm_size=9 but memory_attention stm_size=8"),
        (dict(decoder=dict(vocab_size=300)), r"vocab_size differs"),
        (dict(encoder=dict(embed_dim=48, att_heads=4)), r"embed_dim differs"),
        (dict(memory_attention_variant="grouped-self-interlayer", memory_attention=dict(num_groups=3)),
         r"layers % num_groups == 0"),
        (dict(memory_attention=dict(num_groups=2)), r"num_groups=2 applies only to the 'grouped-self-interlayer'"),
        (dict(memory_attention_variant="fancy"), r"memory_attention_variant='fancy' is not supported"),
        (dict(memory_attention=dict(norm_type="batch")), r"norm_type='batch'"),
        (dict(memory_attention=dict(residual_gate_type="random")), r"residual_gate_type='random'"),
        (dict(memory_attention=dict(residual_gate_slot_status_type="linear", residual_gate_type="elementwise",
                                    residual_per_slot_gate=False)), r"slot_status_type='linear' needs"),
        (dict(memory_attention=dict(att_experts=4)), r"att_experts=4: GMA/DMA.* out of scope"),
        (dict(memory_attention_variant="self", memory_attention=dict(disable_residual=True)),
         r"disable_residual=True exists only in the 'simple'"),
        (dict(rope_layout="spiral"), r"rope_layout='spiral'"),
        (dict(stm_init="random"), r"stm_init='random'"),
        (dict(answer_token_id=999), r"answer_token_id=999: expected an id in \[0, 256\)"),
        (dict(memory_attention=dict(residual_gate_init_range=[-1.0])), r"residual_gate_init_range"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RxTConfig.tiny(**kwargs)


def test_wrong_types_are_rejected():
    with pytest.raises(Exception, match="num_layers"):
        RxTComponentConfig(num_layers="two")


@pytest.mark.parametrize(
    "att_type, groups, query_groups, expected",
    [("mha", 3, None, (8, 8)), ("gqa", 2, None, (8, 2)), ("mqa", 5, None, (8, 1)), ("sqa", 2, 4, (4, 2)),
     ("sqa", 4, 4, (4, 4)), ("sqa", 2, 2, (2, 2)), ("sqa", 4, 2, (2, 4))],
)  # fmt: skip
def test_attention_types_resolve_to_head_pairs(att_type, groups, query_groups, expected):
    config = RxTComponentConfig(embed_dim=64, att_heads=8, self_att_type=att_type, cross_att_type=att_type, att_groups=groups,
                                att_query_groups=query_groups)  # fmt: skip
    assert config.self_attention_heads == expected


def test_reference_use_nope_is_accepted_and_cross_defaults():
    config = RxTComponentConfig(embed_dim=64, att_heads=8, use_nope=True, cross_att_groups=None, att_groups=4,
                                att_query_groups=4)  # fmt: skip
    assert config.use_rope is False
    assert config.cross_attention_heads == (4, 4)
    assert config.gated_cross_attention is False
    assert RxTComponentConfig(use_gated_attention=True).gated_cross_attention is True


def test_round_trip_and_defaults(tmp_path):
    config = RxTConfig.tiny(memory_attention_variant="self", rope_layout="split_concat", learned_stm_init=True)
    config.save_pretrained(tmp_path)
    loaded = RxTConfig.from_pretrained(tmp_path)
    assert loaded.to_dict()["decoder_config"] == config.to_dict()["decoder_config"]
    assert loaded.memory_attention_variant == "self" and loaded.rope_layout == "split_concat"
    assert loaded.encoder_config.skip_memory_cross_attention and not loaded.encoder_config.is_decoder
    assert loaded.stm_shape == (2, 8, 32)
    assert isinstance(loaded.memory_attention_config, RxTMemoryAttentionConfig)
    default = RxTConfig()  # the defaults build a valid model config
    assert default.decoder_config.self_attention_heads == (8, 8)
    # reference defaults that matter: ungated residuals, tanh if switched on
    assert default.memory_attention_config.use_gated_residual is False
    assert default.memory_attention_config.use_tanh_residual_gate is True


def test_stateless_config_from_rxt_config():
    config = RxTConfig.tiny(decoder=dict(stateless_layers_config=["dense"]))
    stateless = RxTStatelessConfig.from_rxt_config(config)
    assert stateless.decoder_config.skip_memory_cross_attention
    assert stateless.vocab_size == config.vocab_size and stateless.hidden_size == config.hidden_size
    assert stateless.decoder_config.stateless_layers_config == ["dense"]


def test_unknown_component_fields_are_rejected():
    with pytest.raises(ValueError, match=r"RxTComponentConfig: unknown field\(s\) \['use_gated_atention'\]"):
        RxTConfig.tiny(decoder={"use_gated_atention": True})
    with pytest.raises(ValueError, match=r"RxTMemoryAttentionConfig: unknown field\(s\) \['residual_gate_int'\]"):
        RxTMemoryAttentionConfig(residual_gate_int=2.0)
    saved = RxTConfig.tiny().to_dict()  # what save_pretrained writes loads back (transformers' own keys included)
    assert RxTConfig.from_dict(saved).decoder_config.to_dict() == RxTConfig.tiny().decoder_config.to_dict()
