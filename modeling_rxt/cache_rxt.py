"""`RxTCache`: the per-conversation inference state passed as `cache` to stock `generate()`.

It holds
- the decoder self-attention KV of the **current turn only** (dynamic layers, or static ones of `max_cache_len`
  tokens for `torch.compile`; reset by `start_new_turn`),
- the STM `[L, B, S, D]` the decoder reads (None until the model fills in its initial STM),
- the memory cross-attention K/V, projected from the STM once per turn and reused for every generated token.

This file is self-contained (it is copied flat into saved model folders for `trust_remote_code`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import STATIC_LAYER_TYPE_MAPPING, Cache, get_layer_types_and_kwargs


class RxTCache(DynamicCache):
    """Self-attention KV of one turn + STM + per-turn memory K/V.

    Args:
        stm: `[L, B, S, D]` (or `[L, 1, S, D]`, broadcast over the batch); None → the model's initial STM.
        config: the model config: one self-attention layer per decoder layer (`num_hidden_layers`), as transformers'
            caches; without it, layers are added as the decoder fills them.
        max_cache_len: static self-attention layers of this many tokens per turn (prompt + answer), for
            `torch.compile` (`generate(cache_implementation="static")` builds one); needs `config`. The memory K/V
            are fixed-size already (`[B, Hkv, S, hd]` per memory layer).
    """

    def __init__(self, stm: torch.Tensor | None = None, config=None, max_cache_len: int | None = None, **kwargs):
        if max_cache_len is None:
            super().__init__(config=config, **kwargs)
        else:
            if config is None:
                raise ValueError("A static RxTCache (max_cache_len=...) needs the model config (config=model.config).")
            Cache.__init__(self, layers=self._static_layers(config, max_cache_len), **kwargs)
        self.config, self.max_cache_len = config, max_cache_len
        self.stm = stm
        self.memory_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _static_layers(config, max_cache_len: int) -> list:
        layer_types, per_layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        return [
            STATIC_LAYER_TYPE_MAPPING[kind](max_cache_len=max_cache_len, **kwargs)
            for kind, kwargs in zip(layer_types, per_layer_kwargs)
        ]

    @property
    def is_static(self) -> bool:
        return self.max_cache_len is not None

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
        if self.is_static:  # static layers keep their allocated batch: start them afresh at the new one
            self.layers = self._static_layers(self.config, self.max_cache_len)
        else:
            super().batch_select_indices(indices)
        if self.stm is not None:
            self.stm = self.stm[:, indices]
        self.memory_kv = {i: (k[indices], v[indices]) for i, (k, v) in self.memory_kv.items()}

    def select_conversations(self, batch_size: int) -> None:
        """Back to one row per conversation after `generate` ran `n = rows / batch_size` rows per conversation
        (`num_beams` or `num_return_sequences`): keeps rows `0, n, 2n, ...`. The rows of one conversation share its
        STM (generation only reads it), so the STM is exactly the conversation's (the chosen beam's); the turn's
        self-attention KV kept is that of the first row of each conversation (`start_new_turn` clears it)."""
        rows = self.stm.shape[1] if self.stm is not None else batch_size
        if rows == batch_size:
            return
        if rows % batch_size != 0:
            raise ValueError(f"The cache holds {rows} rows, not a multiple of {batch_size} conversations.")
        self.batch_select_indices(torch.arange(0, rows, rows // batch_size, device=self.stm.device))


__all__ = ["RxTCache"]
