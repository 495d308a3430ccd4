"""`RxTCache`: the per-conversation inference state passed as `cache` to stock `generate()`.

It holds
- the decoder self-attention KV of the **current turn only** (a `DynamicCache`; reset by `start_new_turn`),
- the STM `[L, B, S, D]` the decoder reads (None until the model fills in its initial STM),
- the memory cross-attention K/V, projected from the STM once per turn and reused for every generated token.

This file is self-contained (it is copied flat into saved model folders for `trust_remote_code`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache


class RxTCache(DynamicCache):
    """Self-attention KV of one turn + STM + per-turn memory K/V.

    Args:
        stm: `[L, B, S, D]` (or `[L, 1, S, D]`, broadcast over the batch); None → the model's initial STM.
    """

    def __init__(self, stm: torch.Tensor | None = None, **kwargs):
        super().__init__(**kwargs)
        self.stm = stm
        self.memory_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- memory ---------------------------------------------------------------------------------------------------
    def get_memory_kv(
        self, layer_idx: int, project: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of memory layer `layer_idx`, each `[B, Hkv, S, hd]`; `project(stm[layer_idx])` runs once per turn."""
        if layer_idx not in self.memory_kv:
            self.memory_kv[layer_idx] = project(self.stm[layer_idx])
        return self.memory_kv[layer_idx]

    def set_stm(self, stm: torch.Tensor | None) -> None:
        """Replace the STM (drops the memory K/V projected from the old one)."""
        self.stm = stm
        self.memory_kv.clear()

    def start_new_turn(self) -> None:
        """Forget this turn's self-attention KV and memory K/V; keep the STM. Call between turns."""
        for layer in self.layers:
            layer.reset()
        self.memory_kv.clear()

    # -- batch operations used by generate (beams, num_return_sequences, finished rows) ----------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.stm is not None:
            self.stm = self.stm.index_select(1, beam_idx.to(self.stm.device))
        self.memory_kv = {
            i: (k.index_select(0, beam_idx.to(k.device)), v.index_select(0, beam_idx.to(v.device)))
            for i, (k, v) in self.memory_kv.items()
        }

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.stm is not None:
            self.stm = self.stm.repeat_interleave(repeats, dim=1)
        self.memory_kv = {
            i: (k.repeat_interleave(repeats, dim=0), v.repeat_interleave(repeats, dim=0))
            for i, (k, v) in self.memory_kv.items()
        }

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.stm is not None:
            self.stm = self.stm[:, indices]
        self.memory_kv = {i: (k[indices], v[indices]) for i, (k, v) in self.memory_kv.items()}


__all__ = ["RxTCache"]
