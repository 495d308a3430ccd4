"""The key contract with the model: every parameter / persistent buffer of `RxTForCausalLM(config)` with its shape,
read from the model built on the meta device (no memory is allocated and nothing is initialised)."""

from __future__ import annotations

import copy

import torch

from ..configuration_rxt import RxTConfig
from ..modeling_rxt import RxTForCausalLM


def expected_state_dict_shapes(config: RxTConfig) -> dict[str, tuple[int, ...]]:
    """`{project key: shape}` of `RxTForCausalLM(config)` (the state dict a conversion must fill exactly)."""
    with torch.device("meta"):
        model = RxTForCausalLM(copy.deepcopy(config))
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}
