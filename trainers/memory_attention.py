"""Stage 3: self-supervised memory-attention pre-training (docs/spec.md#memory-attention-pre-training).

Per turn `k` of an episode batch: `ED = encoder(x_k)` (frozen, no grad); `STM_new = MemAttn(STM_prev, ED + σ_in·ε)`;
pseudo-label `Y = w_acc·STM_prev + w_new·ED_label + σ_label·ε'` from the clean ED; `loss_k = −mean cos(STM_new, Y)`
(+ `stm_diff_factor·sqrt(k+1)·MSE(STM_new, STM_prev)`). The STM is detached between turns (the reference's
truncation); one Trainer step is one episode batch and averages the per-turn losses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .common import RxTTrainer, RxTTrainingArguments, stm_update_norm

ED_LABEL_MODES = ("elementwise", "pool")


@dataclass
class MemoryAttentionConfig(RxTTrainingArguments):
    """Stage-3 settings. `label_weights`: list of `[w_acc, w_new]` per turn (the last entry repeats); None → the
    project schedule `w_new(0) = 0.9`, `w_new(k) = max(0.05, 0.5 − 0.05·(k−1))`."""

    label_weights: list[list[float]] | None = field(default=None, metadata={"help": "Per-turn [w_acc, w_new]."})
    label_weights_random_factor: float | None = field(default=None, metadata={"help": "Jitter f: δ = f·U[0,1)."})
    input_noise: float = field(default=0.0, metadata={"help": "σ_in: noise added to ED fed to memory attention."})
    label_noise: float = field(default=0.0, metadata={"help": "σ_label: noise added to the pseudo-label."})
    stm_diff_factor: float | None = field(default=None, metadata={"help": "Weight of sqrt(k+1)·MSE(STM_new, STM_prev)."})
    ed_label_mode: str = field(default="elementwise", metadata={"help": "'elementwise' (needs T == S) or 'pool'."})
    max_length: int = field(default=256, metadata={"help": "Padded interaction length T."})

    def __post_init__(self):
        super().__post_init__()
        if self.ed_label_mode not in ED_LABEL_MODES:
            raise ValueError(f"ed_label_mode={self.ed_label_mode!r}: expected one of {list(ED_LABEL_MODES)}.")
        for pair in self.label_weights or []:
            if len(pair) != 2:
                raise ValueError(f"label_weights entries must be [w_acc, w_new], got {pair}.")

    def weights(self, turn: int) -> tuple[float, float]:
        if self.label_weights:
            w_acc, w_new = self.label_weights[min(turn, len(self.label_weights) - 1)]
        else:
            w_new = 0.9 if turn == 0 else max(0.05, 0.5 - 0.05 * (turn - 1))
            w_acc = 1.0 - w_new
        if self.label_weights_random_factor:
            delta = self.label_weights_random_factor * random.random()
            sign = 1.0 if random.random() < 0.5 else -1.0
            w_acc, w_new = w_acc + sign * delta, w_new - sign * delta
        return w_acc, w_new


def pseudo_label_ed(encoded: torch.Tensor, slots: int, mode: str) -> torch.Tensor:
    """ED term of the label per slot: `[L, B, T, D]` → `[L, B, S, D]` (elementwise needs `T == S`; pool averages)."""
    if mode == "elementwise":
        if encoded.shape[2] != slots:
            raise ValueError(
                f"ed_label_mode='elementwise' needs the padded interaction length T ({encoded.shape[2]}) to equal "
                f"stm_size ({slots}); set max_length = stm_size or use ed_label_mode='pool'."
            )
        return encoded
    layers, batch, length, dim = encoded.shape
    pooled = F.adaptive_avg_pool1d(encoded.reshape(-1, length, dim).transpose(1, 2), slots)
    return pooled.transpose(1, 2).reshape(layers, batch, slots, dim)


def memory_attention_loss(
    new_stm: torch.Tensor, previous: torch.Tensor, label: torch.Tensor, turn: int, stm_diff_factor: float | None
) -> torch.Tensor:
    """`−mean_{L,B,S} cos_D(new, label)` (+ `stm_diff_factor·sqrt(turn+1)·MSE(new, previous)`)."""
    loss = -F.cosine_similarity(new_stm, label, dim=-1).mean()
    if stm_diff_factor:
        loss = loss + stm_diff_factor * (turn + 1) ** 0.5 * F.mse_loss(new_stm, previous.expand_as(new_stm))
    return loss


class MemoryAttentionTrainer(RxTTrainer):
    """Trains the memory-attention network only; batches come from `trainers.data.EpisodeCollator` (`input_ids [N, B, T]`,
    `attention_mask`, `turn_mask [N, B]`). Give it a model whose other components are frozen
    (`freeze_for_memory_attention_stage(model)`), or it freezes them itself."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        freeze_for_memory_attention_stage(self.rxt_model())
        if self.args.ed_label_mode == "elementwise":
            slots = self.rxt_model().config.memory_attention_config.stm_size
            if self.args.max_length != slots:
                raise ValueError(
                    f"ed_label_mode='elementwise' needs max_length ({self.args.max_length}) == stm_size ({slots}) "
                    "(the label mixes slot j with token j); use ed_label_mode='pool' otherwise."
                )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, masks, turn_mask = inputs["input_ids"], inputs["attention_mask"], inputs["turn_mask"].bool()
        if self.args.ed_label_mode == "elementwise":  # pad to T = S so slot j pairs with token j
            pad = self.args.max_length - ids.shape[-1]
            ids, masks = F.pad(ids, (0, pad)), F.pad(masks, (0, pad))
        slots = self.rxt_model().config.memory_attention_config.stm_size
        stm = self.rxt_model().initial_stm(ids.shape[1])
        losses, norms, placeholders = [], [], []
        local_turns = int(turn_mask.any(1).cumprod(0).sum())  # up to the first turn no episode has
        turns = self.agreed_turns(model, local_turns, turn_mask.device)
        for turn in range(turns):
            if turn >= local_turns:  # another process's batch has this turn
                placeholders.append(self.placeholder_turn(model, ids[0, :1], masks[0, :1], stm[:, :1].detach()))
                continue
            valid = turn_mask[turn]
            mask = masks[turn].clone()
            mask[~valid, 0] = 1  # finished episodes: keep one visible key; their rows are discarded below
            previous = stm.detach()
            with torch.no_grad():
                encoded = model(input_ids=ids[turn], attention_mask=mask, mode="encode").encoder_hidden_states
            noisy = encoded + self.args.input_noise * torch.randn_like(encoded) if self.args.input_noise else encoded
            new_stm = model(attention_mask=mask, stm=previous, encoder_hidden_states=noisy, mode="memory_update").stm
            w_acc, w_new = self.args.weights(turn)
            label = w_acc * previous + w_new * pseudo_label_ed(encoded, slots, self.args.ed_label_mode)
            if self.args.label_noise:
                label = label + self.args.label_noise * torch.randn_like(label)
            rows = valid.nonzero().flatten()
            losses.append(
                memory_attention_loss(new_stm[:, rows], previous[:, rows], label[:, rows], turn, self.args.stm_diff_factor)
            )
            norms.append(stm_update_norm(new_stm[:, rows], previous[:, rows]))
            stm = torch.where(valid[None, :, None, None], new_stm, previous)
        loss = torch.stack(losses).mean()
        self.record(memory_cosine=-loss, stm_update_norm=torch.stack(norms).mean(), turns=float(len(losses)))
        loss = loss + sum(placeholders)  # exactly 0 each
        return (loss, {"stm": stm}) if return_outputs else loss

    def placeholder_turn(self, model, ids, mask, stm) -> torch.Tensor:
        """A turn that another process's batch has and this one's has not (sharded training, `agreed_turns`): the
        encoding and the memory update of a real turn, on one interaction (`ids`, `mask [1, T]`) and `stm [L, 1, S,
        D]`, so every process runs the same collectives. → `0·new STM`: exactly zero loss and zero gradients."""
        with torch.no_grad():
            encoded = model(input_ids=ids, attention_mask=mask, mode="encode").encoder_hidden_states
        return 0.0 * model(attention_mask=mask, stm=stm, encoder_hidden_states=encoded, mode="memory_update").stm.sum()


def freeze_for_memory_attention_stage(model) -> None:
    """Stage 3 trains the memory-attention network only (each episode starts from the detached initial STM)."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("model.memory_attention."))
