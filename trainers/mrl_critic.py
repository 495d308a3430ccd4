"""The MRL critic (docs/spec.md#mrl-critic): a value head on a copy of the policy's memory encoder, and its folder
layout (`critic/model.safetensors` + `critic/config.json`), written by `MRLTrainer` and the checkpoint converter and
read back by MRL's `--critic_name_or_path`."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


def _scalars_to_0d(module, state_dict, prefix, local_metadata) -> None:
    """`RxTCritic.state_dict()`: `scale` / `shift` as 0-dim tensors (gathered first when FSDP2 sharded them)."""
    for name in ("scale", "shift"):
        value = state_dict.get(prefix + name)
        if value is not None:
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            state_dict[prefix + name] = value.reshape(())


def _scalars_from_0d(module, state_dict, prefix, *args) -> None:
    """`RxTCritic.load_state_dict()`: 0-dim `scale` / `shift` (the saved layout) into the `[1]` parameters."""
    for name in ("scale", "shift"):
        value = state_dict.get(prefix + name)
        if value is not None and value.dim() == 0:
            state_dict[prefix + name] = value.reshape(1)


class RxTCritic(nn.Module):
    """`V(s) = act(Linear(LayerNorm(GLU_SiLU(masked_mean(encoder(s)[-1]))))) · scale + shift`
    (docs/spec.md#mrl-critic).

    The encoder (with its embedding) is a separate copy of the policy's memory encoder. Input `[B, T]` → `[B]`."""

    def __init__(self, policy, activation: str = "sigmoid", init_scale: float = 10.0):
        super().__init__()
        self.encoder = copy.deepcopy(policy.model)
        self.encoder.decoder = None  # only embedding + memory encoder are used (mode="encode")
        self.encoder.memory_attention = None
        self.encoder.stm_init = None
        dim = policy.config.encoder_config.embed_dim
        self.glu = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        self.value = nn.Linear(dim, 1)
        self.activation = activation
        # [1], not 0-dim: FSDP2 shards no 0-dim parameter. Saved and loaded 0-dim, the reference critic's layout.
        self.scale = nn.Parameter(torch.full((1,), float(init_scale)))
        self.shift = nn.Parameter(torch.zeros(1))
        self.register_state_dict_post_hook(_scalars_to_0d)
        self.register_load_state_dict_pre_hook(_scalars_from_0d)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, mode="encode").last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B, D]
        # first half linear, second through SiLU (docs/conversion.md#critic)
        linear, gate = self.glu(pooled).chunk(2, dim=-1)
        value = self.value(self.norm(linear * F.silu(gate))).squeeze(-1)
        if self.activation == "sigmoid":
            value = torch.sigmoid(value)
        elif self.activation == "tanh":
            value = torch.tanh(value)
        return value * self.scale + self.shift

    def load_weights(self, folder: str) -> None:
        """Load `folder/critic/model.safetensors` (else `folder/model.safetensors`) strictly; the `activation` in
        the `config.json` beside it (written by MRL and the converter) must be this critic's."""
        paths = [os.path.join(folder, "critic", "model.safetensors"), os.path.join(folder, "model.safetensors")]
        path = next((p for p in paths if os.path.isfile(p)), None)
        if path is None:
            raise ValueError(f"critic_name_or_path={folder!r}: found neither {paths[0]} nor {paths[1]}.")
        config_path = os.path.join(os.path.dirname(path), "config.json")
        if os.path.isfile(config_path):
            with open(config_path) as file:
                stored = json.load(file).get("activation", self.activation)
            if stored != self.activation:
                raise ValueError(
                    f"critic_name_or_path={folder!r}: the critic was trained with activation {stored!r}, this run "
                    f"uses critic_activation={self.activation!r}; pass --critic_activation {stored}."
                )
        try:
            self.load_state_dict(load_file(path), strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"critic_name_or_path={folder!r}: {path} does not fit this policy's critic: {error}"
            ) from None


def write_critic_folder(state_dict: dict, activation: str, init_scale: float, output) -> Path:
    """The MRL critic layout: `output/critic/model.safetensors` + `output/critic/config.json` (`activation`,
    `init_scale`), read back by `RxTCritic.load_weights` (MRL's `--critic_name_or_path`). Returns the critic
    folder."""
    folder = Path(output) / "critic"
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"activation": activation, "init_scale": init_scale}, indent=2))
    return folder
