"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) run on both RxT families, the way
`tests/models/llama/test_modeling_llama.py` in transformers uses them: a model tester with tiny configs.

The mixins come from the installed transformers' source distribution (tests/transformers_test_suite.py fetches and
caches it); the module is skipped only when that sdist is not cached and the package index cannot be reached.
The generate behaviours of `GenerationTesterMixin` (absent from the sdist) are tested in tests/test_generation.py.
"""

import unittest
from unittest import mock

import pytest
from transformers.models.auto import modeling_auto

import modeling_rxt  # noqa: F401 - registers the Auto classes
from modeling_rxt import (
    RxTConfig,
    RxTForCausalLM,
    RxTModel,
    RxTStatelessConfig,
    RxTStatelessForCausalLM,
    RxTStatelessModel,
)

import transformers_test_suite

try:
    modeling_common, configuration_common = transformers_test_suite.load(
        "test_modeling_common", "test_configuration_common"
    )
except transformers_test_suite.Unavailable as error:  # offline and not cached
    pytest.skip(str(error), allow_module_level=True)

ModelTesterMixin = modeling_common.ModelTesterMixin
GenerationTesterMixin = modeling_common.GenerationTesterMixin
ConfigTester = configuration_common.ConfigTester
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


class RxTModelTester:
    """Tiny RxT / stateless configs and inputs (`[B, T]` ids with a random mask, vocabulary 99)."""

    def __init__(self, parent, stateless: bool = False, batch_size: int = 4, seq_length: int = 7):
        self.parent, self.stateless = parent, stateless
        self.batch_size, self.seq_length = batch_size, seq_length
        self.is_training, self.use_labels = True, True
        self.vocab_size, self.hidden_size = 99, 32
        self.num_hidden_layers, self.att_heads, self.stm_size = 2, 4, 8
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


class RxTModelTest(ListedInTransformersNameTables, ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
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


class RxTStatelessModelTest(ListedInTransformersNameTables, ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (RxTStatelessModel, RxTStatelessForCausalLM)

    def setUp(self):
        self.model_tester = RxTModelTester(self, stateless=True)
        self.config_tester = ConfigTester(self, config_class=RxTStatelessConfig, common_properties=[
            "hidden_size", "num_attention_heads", "num_hidden_layers"])  # fmt: skip

    def test_config(self):
        self.config_tester.run_common_tests()
