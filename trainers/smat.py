"""Stage 4: supervised memory-aware training (SMAT, docs/spec.md#supervised-memory-aware-training,
docs/experiments/memory-in-15-cpu-minutes.md).

One Trainer step is one batch of episodes (`trainers.data.EpisodeCollator`: `input_ids [N, B, T]`, `labels`,
`attention_mask`, `turn_mask [N, B]`). The STM starts from the model's initial STM; before turn `k > 0` the previous
interaction is encoded and written into memory; the decoder is teacher-forced on turn `k` reading the STM, with
answer-only targets. `bptt_turns` sets where the STM is detached: `1` every turn (the reference's truncation),
`k` every `k` turns, `0` never (backprop through the whole episode, the paper). The loss is the mean of the per-turn
answer losses. Each turn runs only the episodes still going at it (`turn_mask[k]`): the write before turn `k` and the
decoder on turn `k` take those rows of the batch, cut to their own last real position (`[B_k, width_k]`), and the
new STM rows are scattered back, so a finished episode costs nothing and keeps its STM. Loss, gradients and metrics
are those of running every row with the finished ones masked; an MoE router loss is over the rows that run. When the
model is sharded (FSDP), where every forward and backward is a collective, all processes run the turns of the
longest episode in any process's batch (`RxTTrainer.agreed_turns`); a turn none of this process's episodes has runs
as a placeholder (`placeholder_turn`: the write and the decoder on one interaction) adding exactly zero to the loss,
the gradients, the STM and the logged metrics.

Schedules (callbacks, DDP-safe: nothing flips `requires_grad`; frozen components run under `no_grad`):
- gradual unfreezing of memory attention / encoder by epoch (`memory_attention_unfreeze_epoch`,
  `encoder_unfreeze_epoch`; `None` = never, `0` = from the start; `train_only_decoder` = never both);
- episode-length schedule: `episode_length_start` turns until `episode_ramp_start` (fraction of training), then a
  linear ramp to `episode_max_turns` at `episode_ramp_end` (the schedule that makes memory learnable,
  docs/experiments/memory-in-15-cpu-minutes.md).
The episode length and the `"probe"` window RNG live in the collator; checkpoints hold them (`RxTTrainer`), so a
resumed run builds the episodes of the uninterrupted one. Dataloader workers would hold copies the schedule never
reaches, so they are refused while either is in use.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

from .common import RxTTrainer, RxTTrainingArguments, stm_update_norm, token_accuracy, turn_widths


@dataclass
class SMATConfig(RxTTrainingArguments):
    bptt_turns: int = field(default=1, metadata={"help": "Detach the STM every k turns; 0 = whole-episode backprop."})
    train_only_decoder: bool = field(default=False, metadata={"help": "Memory attention and encoder never train."})
    memory_attention_unfreeze_epoch: int | None = field(default=0, metadata={"help": "Epoch memory attention trains."})
    encoder_unfreeze_epoch: int | None = field(default=0, metadata={"help": "Epoch the encoder starts training."})
    freeze_embeddings: bool = field(default=False, metadata={"help": "Keep the shared embedding fixed."})
    episode_length_start: int | None = field(default=None, metadata={"help": "Turns per episode at the start."})
    episode_ramp_start: float = field(default=0.25, metadata={"help": "Fraction of training when lengthening starts."})
    episode_ramp_end: float = field(default=0.6, metadata={"help": "Fraction of training when the maximum is reached."})
    episode_max_turns: int | None = field(default=None, metadata={"help": "Maximum turns (None: all of the episode)."})
    episode_window: str = field(
        default="probe",
        metadata={"help": "Shortened episodes: 'probe' (end at a question whose fact is inside) or 'head'."},
    )
    episode_max_probe_distance: int | None = field(
        default=None,
        metadata={"help": "'probe' windows end only at questions at most this many turns after their fact."},
    )
    max_length: int = field(default=256, metadata={"help": "Maximum tokens of one interaction."})
    ddp_find_unused_parameters: bool | None = field(default=True, metadata={"help": "Frozen components are unused."})

    def __post_init__(self):
        super().__post_init__()
        if self.bptt_turns < 0:
            raise ValueError(f"bptt_turns={self.bptt_turns}: expected 0 (whole episode) or a positive window.")
        if not 0.0 <= self.episode_ramp_start <= self.episode_ramp_end <= 1.0:
            raise ValueError(
                f"episode schedule: expected 0 <= episode_ramp_start ({self.episode_ramp_start}) <= episode_ramp_end "
                f"({self.episode_ramp_end}) <= 1."
            )
        if self.episode_length_start is not None and self.episode_length_start < 1:
            raise ValueError(f"episode_length_start={self.episode_length_start}: expected >= 1 turns.")

    def episode_turns(self, progress: float) -> int | None:
        """Turns per episode at `progress` ∈ [0, 1] of training (None: no limit)."""
        if self.episode_length_start is None:
            return self.episode_max_turns
        top = self.episode_max_turns or self.episode_length_start
        if progress <= self.episode_ramp_start or top <= self.episode_length_start:
            return self.episode_length_start
        if progress >= self.episode_ramp_end:
            return top
        fraction = (progress - self.episode_ramp_start) / max(self.episode_ramp_end - self.episode_ramp_start, 1e-9)
        return self.episode_length_start + math.floor(fraction * (top - self.episode_length_start) + 1e-9)


class SMATScheduleCallback(TrainerCallback):
    """Applies the episode-length schedule (to the collator) and the unfreeze epochs (to the trainer)."""

    def __init__(self, trainer: SupervisedMemoryAwareTrainer):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        turns = args.episode_turns(state.global_step / max(state.max_steps, 1))
        collator = self.trainer.data_collator
        if hasattr(collator, "set_max_turns"):
            collator.set_max_turns(turns)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer.update_frozen(int(state.epoch or 0))


class SupervisedMemoryAwareTrainer(RxTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.freeze_embeddings:
            self.rxt_model().get_input_embeddings().weight.requires_grad_(False)
        self.memory_attention_trains = self.encoder_trains = True
        self.update_frozen(0)
        self.add_callback(SMATScheduleCallback(self))
        self.data_collator_schedule_ready = hasattr(self.data_collator, "set_max_turns")
        if self.args.episode_turns(0.0) is not None and not self.data_collator_schedule_ready:
            raise ValueError("The episode-length schedule needs a collator with set_max_turns (EpisodeCollator).")
        if self.args.episode_turns(0.0) is not None and self.args.dataloader_num_workers > 0:
            raise ValueError(
                f"dataloader_num_workers={self.args.dataloader_num_workers} with episode_length_start / "
                "episode_max_turns: the episode length and the 'probe' window RNG live in the collator of the main "
                "process; workers would build every batch with copies of their starting values. Expected "
                "dataloader_num_workers=0."
            )
        if self.data_collator_schedule_ready:
            self.data_collator.set_max_turns(self.args.episode_turns(0.0))

    def update_frozen(self, epoch: int) -> None:
        """Memory attention / encoder train from their unfreeze epoch on (never with `train_only_decoder`)."""

        def trains(start: int | None) -> bool:
            return not self.args.train_only_decoder and start is not None and epoch >= start

        self.memory_attention_trains = trains(self.args.memory_attention_unfreeze_epoch)
        self.encoder_trains = trains(self.args.encoder_unfreeze_epoch)

    def write_memory(self, model, ids, mask, stm):
        """Encode the previous interaction and update the STM, with frozen components under `no_grad`."""
        if self.encoder_trains and self.memory_attention_trains:
            return model(input_ids=ids, attention_mask=mask, stm=stm, mode="memory_update").stm
        with contextlib.nullcontext() if self.encoder_trains else torch.no_grad():
            encoded = model(input_ids=ids, attention_mask=mask, mode="encode").encoder_hidden_states
        with contextlib.nullcontext() if self.memory_attention_trains else torch.no_grad():
            return model(attention_mask=mask, stm=stm, encoder_hidden_states=encoded, mode="memory_update").stm

    def write_rows(self, model, turn: int, ids, mask, rows, stm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Before turn `turn > 0`: write the previous interaction of the episodes still running (`ids`, `mask
        [B_k, T]`; `rows [B_k]` their batch rows, None = all) into `stm [L, B, S, D]`, detaching first every
        `bptt_turns` turns. The other rows (finished episodes) keep their STM and are not computed. → (STM
        `[L, B, S, D]`, the running rows' STM `[L, B_k, S, D]`, update norm over them)."""
        if self.args.bptt_turns and turn % self.args.bptt_turns == 0:
            stm = stm.detach()  # truncate before the write, so the update feeding this turn keeps its gradient
        previous = stm if rows is None else stm.index_select(1, rows)
        new_stm = self.write_memory(model, ids, mask, previous)
        norm = stm_update_norm(new_stm, previous)
        return (new_stm if rows is None else stm.index_copy(1, rows, new_stm)), new_stm, norm

    def write_turn(self, model, turn: int, ids, mask, valid, stm) -> tuple[torch.Tensor, torch.Tensor]:
        """`write_rows` for the whole batch's previous interaction (`ids`, `mask [B, T]`) and the rows whose episode
        goes on (`valid [B]` bool); the others are skipped and keep their STM. → (STM `[L, B, S, D]`, update norm)."""
        rows = None if valid.all() else valid.nonzero().squeeze(1)
        if rows is not None:
            ids, mask = ids[rows], mask[rows]
        stm, _, norm = self.write_rows(model, turn, ids, mask, rows, stm)
        return stm, norm

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, masks, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        turn_mask = check_turn_mask(inputs["turn_mask"])  # [N, B] bool: episode b has turns 0 .. n_b - 1
        batch = turn_mask.shape[1]
        active_rows = turn_mask.sum(1).tolist()  # [N]: episodes still running at each turn
        # Turn k runs on its active rows only, each call cut to the widest of them (only trailing pads are cut): the
        # decoder on turn k, the write before it on turn k - 1 of the same rows.
        widths = turn_widths(masks * turn_mask[..., None])
        write_widths = turn_widths(masks[:-1] * turn_mask[1:, :, None])
        stm = None  # turn 0 reads the initial STM inside forward (where FSDP gathers a learned one) and returns it
        losses, accuracies, norms, placeholders = [], [], [], []
        local_turns = sum(count > 0 for count in active_rows)  # up to the first turn no episode has
        turns = self.agreed_turns(model, local_turns, turn_mask.device)
        for turn in range(turns):
            if turn >= local_turns:  # another process's batch has this turn
                placeholder_ids, placeholder_mask = (x[0, :1, : widths[0]] for x in (ids, masks))  # [1, T]: real
                placeholders.append(self.placeholder_turn(model, turn, placeholder_ids, placeholder_mask, stm))
                continue
            count = active_rows[turn]
            rows = None if count == batch else turn_mask[turn].nonzero().squeeze(1)  # [B_k] batch rows
            read = None  # [L, B_k, S, D]: the STM the active rows read
            if turn > 0:
                width = write_widths[turn - 1]
                previous_ids, previous_mask = (take_rows(x[turn - 1], rows, width) for x in (ids, masks))
                stm, read, norm = self.write_rows(model, turn, previous_ids, previous_mask, rows, stm)
                norms.append(norm)
            turn_ids, mask, turn_labels = (take_rows(x[turn], rows, widths[turn]) for x in (ids, masks, labels))
            out = model(input_ids=turn_ids, attention_mask=mask, labels=turn_labels, stm=read)
            if turn == 0:
                stm = out.stm  # [L, B, S, D]: the initial STM this turn read
            losses.append(out.loss + self.moe_aux(out))
            accuracies.append(token_accuracy(out.logits, turn_labels))
        loss = torch.stack(losses).mean()
        self.record(  # NaN = no data on this rank (record gathers across ranks: every rank must call it alike)
            answer_loss=loss,
            answer_accuracy=torch.stack(accuracies).mean(),
            stm_update_norm=torch.stack(norms).mean() if norms else float("nan"),
            episode_turns=float(len(losses)),
        )
        loss = loss + sum(placeholders)  # exactly 0 each
        return (loss, {"stm": stm}) if return_outputs else loss

    def placeholder_turn(self, model, turn: int, ids, mask, stm) -> torch.Tensor:
        """A turn `turn > 0` that another process's batch has and this one's has not (sharded training,
        `agreed_turns`): the write and the decoder forward of a real turn, on one interaction (`ids`, `mask [1, T]`)
        and the STM of batch row 0, so every process runs the same collectives. `stm` keeps its rows. → `0·(logits +
        new STM)`: exactly zero loss and zero gradients, in the graph so the backward runs through the same modules."""
        first = torch.zeros(1, dtype=torch.long, device=ids.device)
        _, new_stm, _ = self.write_rows(model, turn, ids, mask, first, stm)
        out = self.placeholder_decode(model, ids, mask, new_stm)
        return 0.0 * (out.logits.sum() + new_stm.sum())

    def placeholder_decode(self, model, ids, mask, stm):
        """The decoder forward of a placeholder turn (`placeholder_turn`) → the model output."""
        return model(input_ids=ids, attention_mask=mask, stm=stm)


def take_rows(x: torch.Tensor, rows: torch.Tensor | None, width: int) -> torch.Tensor:
    """`x [B, T]` → the batch rows `rows [B_k]` (None: all) cut to `width` → `[B_k, width]`."""
    return x[:, :width] if rows is None else x[rows, :width]


def check_turn_mask(turn_mask: torch.Tensor) -> torch.Tensor:
    """`turn_mask [N, B]` → bool, after checking that every episode `b` has the turns `0 .. n_b - 1`, `n_b >= 1`."""
    turn_mask = turn_mask.bool()
    if turn_mask.dim() != 2 or turn_mask.shape[0] == 0:
        raise ValueError(f"turn_mask has shape {tuple(turn_mask.shape)}, expected [turns N >= 1, batch B].")
    expected = torch.arange(turn_mask.shape[0], device=turn_mask.device)[:, None] < turn_mask.sum(0).clamp(min=1)
    bad = (turn_mask != expected).any(0).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"turn_mask of episode {bad[0]} is {turn_mask[:, bad[0]].long().tolist()}; expected ones for its turns "
            "0 .. n - 1 (n >= 1), then zeros, as EpisodeCollator builds it."
        )
    return turn_mask
