"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) run on both RxT families, the way
`tests/models/llama/test_modeling_llama.py` in transformers uses them: a model tester with tiny configs.

The mixins come from the installed transformers' source distribution (tests/transformers_test_suite.py fetches and
caches it); the module is skipped only when that sdist is not cached and the package index cannot be reached.
The generate behaviours of `GenerationTesterMixin` (absent from the sdist) are tested in tests/test_generation.py.
"""

import unittest
from unittest import mock

import pytest
import torch
from transformers.models.auto import modeling_auto

import modeling_rxt  # noqa: F401 - registers the Auto classes
import transformers_test_suite
from modeling_rxt import (
    RxTConfig,
    RxTForCausalLM,
    RxTModel,
    RxTStatelessConfig,
    RxTStatelessForCausalLM,
    RxTStatelessModel,
)

try:
    modeling_common, configuration_common, training_mixin = transformers_test_suite.load(
        "test_modeling_common", "test_configuration_common", "test_training_mixin"
    )
except transformers_test_suite.Unavailable as error:  # offline and not cached
    pytest.skip(str(error), allow_module_level=True)

ModelTesterMixin = modeling_common.ModelTesterMixin
GenerationTesterMixin = modeling_common.GenerationTesterMixin
ConfigTester = configuration_common.ConfigTester
TrainingTesterMixin = training_mixin.TrainingTesterMixin
ids_tensor, random_attention_mask = modeling_common.ids_tensor, modeling_common.random_attention_mask


# The mixins pick a test's inputs (labels for causal LMs, base models skipped in training tests) by class *name*, from
# transformers' own name tables, where every in-library model is listed. The RxT classes are registered with the Auto
# classes at runtime instead, so each test class lists them in those tables while it runs (restored afterwards).
MAPPING_NAMES = {
    "MODEL_MAPPING_NAMES": {"rxt": "RxTModel", "rxt_stateless": "RxTStatelessModel"},
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": {"rxt": "RxTForCausalLM", "rxt_stateless": "RxTStatelessForCausalLM"},
}


class ListedInTransformersNameTables:
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        for table, names in MAPPING_NAMES.items():
            patcher = mock.patch.dict(getattr(modeling_auto, table), names)
            patcher.start()
            cls.addClassCleanup(patcher.stop)


def set_existing_config_eps(config):
    """Stand-in for transformers' `set_config_for_less_flaky_test`, which sets seven norm-epsilon names of other
    architectures (`rms_norm_eps`, `layer_norm_eps`, ...) on every config. Design difference: `RxTConfig` and
    `RxTStatelessConfig` refuse fields they do not have (a typo must not silently build another model), so the
    saved-and-reloaded config of the eager-vs-SDPA tests would be refused. RxT's norms take no epsilon from the config, so only names the config
    already has are set; the norm modules' own epsilon is still raised by `set_model_for_less_flaky_test`."""
    for name in ("rms_norm_eps", "post_norm_eps", "layer_norm_eps", "norm_eps", "norm_epsilon", "layer_norm_epsilon",
                 "batch_norm_eps"):  # fmt: skip
        if hasattr(config, name):
            setattr(config, name, 1.0)


class SetsOnlyExistingConfigEps:
    """Both configs refuse unknown fields: transformers' flaky-test helper is replaced by `set_existing_config_eps`."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        patcher = mock.patch.object(modeling_common, "set_config_for_less_flaky_test", set_existing_config_eps)
        patcher.start()
        cls.addClassCleanup(patcher.stop)


# transformers' common mixins, as tests/models/llama/ in transformers uses them
COMMON_TESTS = (
    SetsOnlyExistingConfigEps,
    ListedInTransformersNameTables,
    ModelTesterMixin,
    GenerationTesterMixin,
    TrainingTesterMixin,
    unittest.TestCase,
)


class RxTModelTester:
    """Tiny RxT / stateless configs and inputs (`[B, T]` ids with a random mask, vocabulary 99)."""

    def __init__(self, parent, stateless: bool = False, batch_size: int = 4, seq_length: int = 7):
        self.parent, self.stateless = parent, stateless
        self.batch_size, self.seq_length = batch_size, seq_length
        self.is_training, self.use_labels = True, True
        self.vocab_size, self.hidden_size = 99, 32
        self.num_hidden_layers, self.att_heads, self.stm_size = 2, 4, 8
        self.causal_lm_class = RxTStatelessForCausalLM if stateless else RxTForCausalLM  # TrainingTesterMixin
        self.base_model_class = RxTStatelessModel if stateless else RxTModel
        config = self.get_config()
        # sSQA: head dim 32 / 4 = 8, and 2 query / 2 key-value heads (the config's standard fields say so)
        self.num_attention_heads, self.num_key_value_heads = config.num_attention_heads, config.num_key_value_heads

    def get_config(self):
        config = RxTConfig.tiny(
            vocab_size=self.vocab_size,
            embed_dim=self.hidden_size,
            num_layers=self.num_hidden_layers,
            att_heads=self.att_heads,
            stm_size=self.stm_size,
        )
        return RxTStatelessConfig.from_rxt_config(config) if self.stateless else config

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        labels = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        return self.get_config(), input_ids, attention_mask, labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


class RxTModelTest(*COMMON_TESTS):
    all_model_classes = (RxTModel, RxTForCausalLM)
    # Design difference: a plain forward (one decoder step of a turn) never runs the memory encoder or the
    # memory-attention network (they write the STM after the answer, in `update_memory` / `mode="memory_update"`),
    # so their parameters get no gradient from an LM loss. The decoder's parameters, memory cross-attention
    # included, all do (tests/test_modeling.py trains every part through the memory path).
    test_all_params_have_gradient = False

    def setUp(self):
        self.model_tester = RxTModelTester(self)
        self.config_tester = ConfigTester(self, config_class=RxTConfig, common_properties=[
            "hidden_size", "num_attention_heads", "num_hidden_layers"])  # fmt: skip

    def test_config(self):
        self.config_tester.run_common_tests()


class RxTStatelessModelTest(*COMMON_TESTS):
    all_model_classes = (RxTStatelessModel, RxTStatelessForCausalLM)

    def setUp(self):
        self.model_tester = RxTModelTester(self, stateless=True)
        self.config_tester = ConfigTester(self, config_class=RxTStatelessConfig, common_properties=[
            "hidden_size", "num_attention_heads", "num_hidden_layers"])  # fmt: skip

    def test_config(self):
        self.config_tester.run_common_tests()


# -- the same contracts, checked directly on RxT specifics -----------------------------------------------------------
def tiny_lm(**kwargs) -> RxTForCausalLM:
    torch.manual_seed(0)
    return RxTForCausalLM(RxTConfig.tiny(**kwargs)).eval()


def test_base_model_folder_loads_into_the_lm_class_and_back(tmp_path):
    """Missing weights are initialised and reported (standard contract); shared weights are loaded."""
    lm = tiny_lm()
    lm.model.save_pretrained(tmp_path / "base")
    loaded, info = RxTForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert set(info["missing_keys"]) == {"lm_head.weight", "lm_head.bias"} and not info["unexpected_keys"]
    assert all(torch.equal(a, b) for a, b in zip(lm.model.state_dict().values(), loaded.model.state_dict().values()))
    assert torch.isfinite(loaded.lm_head.weight).all() and loaded.lm_head.weight.std() > 0  # initialised
    with pytest.raises(ValueError, match=r"strict=True\) does not match the checkpoint: missing \(2\): lm_head.bias"):
        RxTForCausalLM.from_pretrained(tmp_path / "base", strict=True)
    lm.save_pretrained(tmp_path / "lm")
    base, info = RxTModel.from_pretrained(tmp_path / "lm", output_loading_info=True)
    assert not info["missing_keys"]
    assert all(torch.equal(a, b) for a, b in zip(lm.model.state_dict().values(), base.state_dict().values()))
    torch.manual_seed(0)
    stateless = RxTStatelessForCausalLM(RxTStatelessConfig.from_rxt_config(RxTConfig.tiny()))
    stateless.model.save_pretrained(tmp_path / "stateless_base")  # the baseline's base model saves on its own
    assert isinstance(RxTStatelessModel.from_pretrained(tmp_path / "stateless_base", strict=True), RxTStatelessModel)


def test_a_folder_of_another_model_type_fails_clearly(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "llama")  # fmt: skip
    for cls, expected in ((RxTForCausalLM, "rxt"), (RxTModel, "rxt"), (RxTStatelessForCausalLM, "rxt_stateless")):
        with pytest.raises(ValueError, match=rf"model_type='llama', expected '{expected}'"):
            cls.from_pretrained(tmp_path / "llama")
    tiny_lm().save_pretrained(tmp_path / "rxt")
    with pytest.raises(ValueError, match=r"model_type='rxt', expected 'rxt_stateless'.*from_rxt_config"):
        RxTStatelessForCausalLM.from_pretrained(tmp_path / "rxt")


def test_resize_token_embeddings_resizes_every_head_and_the_vocab_fields(tmp_path):
    lm = tiny_lm(use_mlm_head=True)
    ids = torch.randint(7, 256, (2, 5))
    before = lm(ids).logits
    lm.resize_token_embeddings(300)
    config = lm.config
    assert config.vocab_size == config.decoder_config.vocab_size == config.encoder_config.vocab_size == 300
    assert lm.get_input_embeddings().num_embeddings == 300
    assert lm.lm_head.out_features == lm.lm_head.bias.shape[0] == lm.mlm_head.decoder.out_features == 300
    assert lm(ids).logits.shape == (2, 5, 300) and lm.mlm_logits(ids).shape == (2, 5, 300)
    torch.testing.assert_close(lm(ids).logits[..., :256], before)  # the old rows are kept
    lm.save_pretrained(tmp_path)
    reloaded = RxTForCausalLM.from_pretrained(tmp_path, strict=True)
    torch.testing.assert_close(reloaded.eval()(ids).logits, lm(ids).logits)
    config.vocab_size = 320  # settable: the decoder's and the encoder's (one shared embedding)
    assert (config.decoder_config.vocab_size, config.encoder_config.vocab_size) == (320, 320)


def test_sub_configs_round_trip_each_as_itself(tmp_path):
    from modeling_rxt import RxTComponentConfig, RxTEncoderConfig, RxTMemoryAttentionConfig

    config = RxTConfig.tiny()
    config.save_pretrained(tmp_path)
    for cls, sub in ((RxTComponentConfig, config.decoder_config), (RxTEncoderConfig, config.encoder_config),
                     (RxTMemoryAttentionConfig, config.memory_attention_config)):  # fmt: skip
        loaded = cls.from_pretrained(tmp_path)
        assert type(loaded) is type(sub) and loaded.to_dict() == sub.to_dict(), cls.__name__
    assert not RxTEncoderConfig.from_pretrained(tmp_path).has_memory_cross_attention
    assert RxTComponentConfig.from_pretrained(tmp_path).has_memory_cross_attention
    reloaded = RxTConfig.from_pretrained(tmp_path)
    assert type(reloaded.encoder_config) is RxTEncoderConfig and reloaded.to_dict() == config.to_dict()


def test_standard_config_fields_and_the_cache_layout():
    """`num_hidden_layers` counts every decoder layer (stateless ones too), head counts are the attention's."""
    config = RxTConfig.tiny(decoder={"stateless_layers_config": ["dense"], "final_stateless_layers_config": ["dense"],
                                     "self_att_type": "gqa", "att_groups": 1})  # fmt: skip
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (4, 4, 1)
    assert (config.hidden_size, config.head_dim) == (32, 8)
    torch.manual_seed(0)
    model = RxTForCausalLM(config).eval()
    ids = torch.randint(7, 256, (2, 5))
    out = model(ids)  # use_cache from the config (True)
    cache = out.cache
    assert len(cache.layers) == 4 and all(layer.keys.shape == (2, 1, 5, 8) for layer in cache.layers)
    assert cache.stm is out.stm
    model.config.use_cache = False
    assert model(ids).cache is None
    assert model(ids, use_cache=True).cache is not None
    hidden = model(ids, output_hidden_states=True).hidden_states
    assert len(hidden) == config.num_hidden_layers + 1
