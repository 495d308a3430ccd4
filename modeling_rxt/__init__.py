"""Reactive Transformer (RxT) as a native transformers model.

Importing this package registers the RxT classes with the transformers Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_rxt import RxTCache
from .configuration_rxt import (
    RxTComponentConfig,
    RxTConfig,
    RxTEncoderConfig,
    RxTMemoryAttentionConfig,
    RxTStatelessConfig,
)
from .modeling_rxt import (
    CACHE_KWARG,
    RxTChatSession,
    RxTForCausalLM,
    RxTMemoryUpdateError,
    RxTModel,
    RxTPreTrainedModel,
    RxTStatelessForCausalLM,
    RxTStatelessModel,
)

AutoConfig.register("rxt", RxTConfig, exist_ok=True)
AutoConfig.register("rxt_stateless", RxTStatelessConfig, exist_ok=True)
AutoModel.register(RxTConfig, RxTModel, exist_ok=True)
AutoModelForCausalLM.register(RxTConfig, RxTForCausalLM, exist_ok=True)
AutoModel.register(RxTStatelessConfig, RxTStatelessModel, exist_ok=True)
AutoModelForCausalLM.register(RxTStatelessConfig, RxTStatelessForCausalLM, exist_ok=True)

__all__ = [
    "CACHE_KWARG",
    "RxTCache",
    "RxTChatSession",
    "RxTComponentConfig",
    "RxTConfig",
    "RxTEncoderConfig",
    "RxTForCausalLM",
    "RxTMemoryAttentionConfig",
    "RxTMemoryUpdateError",
    "RxTModel",
    "RxTPreTrainedModel",
    "RxTStatelessConfig",
    "RxTStatelessForCausalLM",
    "RxTStatelessModel",
]
