"""DMPO: Direct Memory and Preference Optimisation (docs/spec.md#dmpo), DPO inside the SMAT loop.

Rows: `{"interactions": [{"query", "accepted": {"answer"}, "rejected": {"answer"}, "neutral"?: {"answer"}}, ...]}`.
Every answer is encoded with the interaction template `[BOS][Q]{query}` + `[A]{answer}[EOS]`; targets follow the
project rule (the tokens after `[A]` up to and including `[EOS]`, docs/spec.md#interaction-sft). The agentic /
reasoning fields (`internal`, `tool_use`, `think`, `tool_call`, and a `system` prompt) have no template in
`trainers/data.py` yet: rows that use them raise a `ValueError` naming the field instead of being trained on a silently
shortened interaction.

Loop per batch of episodes (`DMPOTrainer.compute_loss`), STM `[L, B, S, D]` reset to the model's initial STM; for turn
`t`:
1. the policy and the frozen reference (a deep copy of the model at trainer start) both read `STM_{t-1}`, built from
   the *accepted* interactions of the turns before `t` only (the reference reads the policy's STM, detached: the STM
   is the prompt both models are compared on);
2. `lp` = mean log-prob of the answer targets (length-normalised, not the sum) of the accepted, rejected and neutral
   answers, for both models;
3. `x = β·[(lp_acc − lp_rej) − (lp_ref_acc − lp_ref_rej)]`, per episode
   `L = (1−s)·(−log σ(x)) + s·(−log σ(−x)) + anchor_weight·|lp_neu − lp_ref_neu|` (the anchor only where the turn
   has a neutral answer); the turn loss is the mean over the episodes that have turn `t`;
4. only then is the accepted interaction `t` written into memory (the reference's leak, writing it before scoring,
   is not reproduced: docs/spec.md#reference-training-behaviours). Gradient flows into memory attention / encoder when
   they train; the STM is detached every `bptt_turns` turns exactly as in SMAT.
The loss is the mean of the turn losses. Freezing, unfreeze epochs, `freeze_embeddings`, `bptt_turns` and the
episode-length schedule are SMAT's (`DMPOTrainer` subclasses `SupervisedMemoryAwareTrainer`).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ._trl_compat import disable_dropout_in_model, selective_log_softmax
from .common import turn_widths
from .data import (
    IGNORE_INDEX,
    EpisodeCollator,
    build_interaction,
    drop_or_raise,
    fill_row,
    pad_to_multiple,
    text_problem,
    tokenize_texts,
    validation_input,
)
from .smat import SMATConfig, SupervisedMemoryAwareTrainer

__all__ = ["DMPOCollator", "DMPOConfig", "DMPOTrainer", "answer_logps", "dmpo_row_problem", "validate_dmpo_rows"]

logger = logging.getLogger(__name__)

ANSWER_KINDS = ("accepted", "rejected", "neutral")
_UNSUPPORTED = (
    "is not supported by DMPO yet: trainers/data.py has only the [BOS][Q]query[A]answer[EOS] template (the "
    "reasoning / agentic templates of docs/spec.md#tokenizer are not implemented); remove the field or drop the row"
)


# --------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DMPOConfig(SMATConfig):
    """SMAT fields (freezing, `bptt_turns`, `max_length`, episode-length schedule) + the DMPO loss fields."""

    beta: float = field(default=0.1, metadata={"help": "DPO temperature β on the policy/reference log-ratio margin."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Share s of flipped preferences, in [0, 0.5)."})
    anchor_weight: float = field(default=0.1, metadata={"help": "Weight of |lp_neu − lp_ref_neu| (neutral answers)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in the policy (as TRL's DPO)."})
    episode_window: str = field(default="head", metadata={"help": "DMPO episodes are cut to their first turns."})

    def __post_init__(self):
        super().__post_init__()
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta={self.beta}: expected a finite value > 0 (default 0.1).")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={self.label_smoothing}: expected a value in [0, 0.5) (default 0).")
        if not (math.isfinite(self.anchor_weight) and self.anchor_weight >= 0):
            raise ValueError(f"anchor_weight={self.anchor_weight}: expected a finite value >= 0 (default 0.1).")
        if self.max_length < 5:
            raise ValueError(f"max_length={self.max_length}: expected >= 5 ([BOS][Q]q[A][EOS] needs 5 tokens).")
        if self.episode_window != "head" or self.episode_max_probe_distance is not None:
            raise ValueError(
                f"episode_window={self.episode_window!r}, episode_max_probe_distance={self.episode_max_probe_distance}"
                ": DMPO rows have no probes; expected episode_window='head' and episode_max_probe_distance=None."
            )


# --------------------------------------------------------------------------------------------------------------------
# Rows and collator


def dmpo_row_problem(row: dict) -> tuple[str, str] | None:
    """First structural problem of a DMPO row as `(field, reason)`, or None. A field whose value is None counts as
    absent (Arrow fills columns that only some rows have with None)."""
    if row.get("system") is not None:
        return "system", _UNSUPPORTED
    interactions = row.get("interactions")
    if interactions is None:
        return "interactions", "missing"
    if not isinstance(interactions, list):
        return "interactions", f"expected a list, got {type(interactions).__name__}"
    if not interactions:
        return "interactions", "empty (expected at least one turn)"
    for k, turn in enumerate(interactions):
        where = f"interactions[{k}]"
        if not isinstance(turn, dict):
            return where, f"expected an object with query/accepted/rejected, got {type(turn).__name__}"
        for name in ("internal", "tool_use"):
            if turn.get(name) is not None:
                return f"{where}.{name}", _UNSUPPORTED
        reason = text_problem(turn, "query")
        if reason:
            return f"{where}.query", reason
        for kind in ANSWER_KINDS:
            answer = turn.get(kind)
            if answer is None:
                if kind == "neutral":
                    continue
                return f"{where}.{kind}", "missing"
            if not isinstance(answer, dict):
                return f"{where}.{kind}", f"expected an object with 'answer', got {type(answer).__name__}"
            for name in ("think", "tool_call"):
                if answer.get(name) is not None:
                    return f"{where}.{kind}.{name}", _UNSUPPORTED
            reason = text_problem(answer, "answer")
            if reason:
                return f"{where}.{kind}.answer", reason
    return None


def _row_texts(row: dict, max_turns: int | None) -> list[dict[str, tuple[str, str]]]:
    """Per turn `{kind: (query, answer)}` for the answer kinds present (a valid row)."""
    turns = row["interactions"] if max_turns is None else row["interactions"][:max_turns]
    return [{kind: (turn["query"], turn[kind]["answer"]) for kind in ANSWER_KINDS if turn.get(kind) is not None}
            for turn in turns]  # fmt: skip


def _tokenized_rows(tokenizer, rows: list[dict], max_turns: int | None = None):
    """Per row, per turn `{kind: (query_ids, answer_ids, query_text)}` (one batched tokenizer call per side)."""
    texts = [_row_texts(row, max_turns) for row in rows]
    flat = [pair for turns in texts for turn in turns for pair in turn.values()]
    queries = iter(tokenize_texts(tokenizer, [q for q, _ in flat]))
    answers = iter(tokenize_texts(tokenizer, [a for _, a in flat]))
    return [[{kind: (next(queries), next(answers), q) for kind, (q, _) in turn.items()} for turn in turns]
            for turns in texts]  # fmt: skip


def _length_problem(tokenized_turns, max_length: int) -> tuple[str, str] | None:
    for k, turn in enumerate(tokenized_turns):
        for kind, (query, answer, _) in turn.items():
            length = len(query) + len(answer) + 4  # [BOS][Q] query [A] answer [EOS]
            if length > max_length:
                return f"interactions[{k}].{kind}", f"{length} tokens exceed max_length={max_length}"
    return None


class DMPOCollator(EpisodeCollator):
    """Collator of DMPO rows (module docstring) into turn-major tensors, one set per answer kind. Shares
    `EpisodeCollator`'s settings and `set_max_turns` (SMAT's episode-length schedule); the window is always the head.

    Args:
        tokenizer: RxT tokenizer (special ids from `check_rxt_tokenizer`).
        max_length: longest interaction (None: no limit); see `overflow`.
        max_turns: keep the first `max_turns` turns of each episode (None: all); `set_max_turns` changes it.
        overflow: `"error"` (ValueError naming the row and field; filter beforehand with `validate_dmpo_rows(...,
            on_error="skip")`) or `"truncate"` (cut the answer body, keep `[EOS]`).
        pad_to_multiple_of: round `T` up.

    Returns (from `__call__(rows)`), `B` rows, `N` = most turns in the batch, `T` = longest interaction of any kind:
        for `kind` in `accepted`, `rejected`, `neutral`: `{kind}_input_ids [N, B, T]` (right-padded),
        `{kind}_attention_mask [N, B, T]`, `{kind}_labels [N, B, T]` (answer + `[EOS]` targets, -100 elsewhere, aligned
        with the ids); a missing turn or a turn without a neutral answer is all pad, mask 0, labels -100;
        `turn_mask [N, B]` (1 where episode `b` has turn `k`), `neutral_mask [N, B]` (1 where that turn has a neutral
        answer), `num_turns [B]`. All `torch.long`.

    Raises:
        ValueError: a bad row (missing / empty / unsupported field, over-long interaction), naming the row index in the
        batch and the field.
    """

    def __init__(self, tokenizer, max_length: int | None = None, max_turns: int | None = None, overflow: str = "error",
                 pad_to_multiple_of: int | None = None):  # fmt: skip
        super().__init__(tokenizer, max_length=max_length, max_turns=max_turns, overflow=overflow,
                         pad_to_multiple_of=pad_to_multiple_of)  # fmt: skip

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        for index, row in enumerate(rows):
            problem = dmpo_row_problem(row)
            if problem:
                raise ValueError(f"DMPO row {index} of the batch: field {problem[0]!r}: {problem[1]}.")
        tokenized = _tokenized_rows(self.tokenizer, rows, self.max_turns)
        encoded = []  # per row, per turn {kind: (ids, labels)}
        for index, turns in enumerate(tokenized):
            if self.max_length is not None and self.overflow == "error":
                problem = _length_problem(turns, self.max_length)
                if problem:
                    raise ValueError(
                        f"DMPO row {index} of the batch: field {problem[0]!r}: {problem[1]}; drop such rows with "
                        "validate_dmpo_rows(..., on_error='skip') or pass overflow='truncate'."
                    )
            try:
                encoded.append([
                    {kind: build_interaction(self.ids, query, answer, self.max_length, self.overflow,
                                              train_answer_token=False, train_eos=True, query=text)
                     for kind, (query, answer, text) in turn.items()}
                    for turn in turns
                ])  # fmt: skip
            except ValueError as error:  # a query too long to keep even with the answer truncated
                raise ValueError(f"DMPO row {index} of the batch: {error}") from None

        n, b = max(len(turns) for turns in encoded), len(rows)
        length = pad_to_multiple(max(len(ids) for turns in encoded for turn in turns for ids, _ in turn.values()),
                         self.pad_to_multiple_of)  # fmt: skip
        batch = {}
        for kind in ANSWER_KINDS:
            batch[f"{kind}_input_ids"] = torch.full((n, b, length), self.ids["pad_token_id"], dtype=torch.long)
            batch[f"{kind}_attention_mask"] = torch.zeros((n, b, length), dtype=torch.long)
            batch[f"{kind}_labels"] = torch.full((n, b, length), IGNORE_INDEX, dtype=torch.long)
        turn_mask = torch.zeros((n, b), dtype=torch.long)
        neutral_mask = torch.zeros((n, b), dtype=torch.long)
        for j, turns in enumerate(encoded):
            for k, turn in enumerate(turns):
                turn_mask[k, j] = 1
                neutral_mask[k, j] = int("neutral" in turn)
                for kind, (ids, labels) in turn.items():
                    fill_row(batch[f"{kind}_input_ids"][k, j], ids)
                    batch[f"{kind}_attention_mask"][k, j, : len(ids)] = 1
                    fill_row(batch[f"{kind}_labels"][k, j], labels)
        batch.update(turn_mask=turn_mask, neutral_mask=neutral_mask,
                     num_turns=torch.tensor([len(turns) for turns in encoded], dtype=torch.long))  # fmt: skip
        return batch


def validate_dmpo_rows(dataset, tokenizer=None, max_length: int | None = None, on_error: str = "error"):
    """Check DMPO rows before training (structure as `dmpo_row_problem`; every interaction at most `max_length`).

    `on_error="error"` raises `ValueError("... row {i}: field {field!r}: {reason}")` for the first bad row; `"skip"`
    drops bad rows with a logged warning (an all-invalid dataset raises anyway). Returns a `datasets.Dataset` (the
    input itself when nothing was dropped); a list of dicts is converted."""
    dataset = validation_input(dataset, "validate_dmpo_rows", on_error, max_length, tokenizer)
    problems: dict[int, tuple[str, str]] = {}
    chunk: list[tuple[int, dict]] = []

    def check_lengths():
        for (index, _), turns in zip(chunk, _tokenized_rows(tokenizer, [row for _, row in chunk])):
            problem = _length_problem(turns, max_length)
            if problem:
                problems[index] = problem
        chunk.clear()

    for index, row in enumerate(dataset):
        problem = dmpo_row_problem(row)
        if problem:
            problems[index] = problem
        elif max_length is not None:
            chunk.append((index, row))
            if len(chunk) == 256:
                check_lengths()
    if chunk:
        check_lengths()
    return drop_or_raise(dataset, problems, "DMPO", "validate_dmpo_rows", on_error)


# --------------------------------------------------------------------------------------------------------------------
# Trainer


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean log-prob of the targets of each row: `logits [B, T, V]`, `labels [B, T]` aligned with the input ids (the
    shift is done here, -100 ignored) → `[B]` (0 for a row without targets)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logps = selective_log_softmax(logits[:, :-1].float(), targets.masked_fill(~mask, 0))
    return (logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)


class DMPOTrainer(SupervisedMemoryAwareTrainer):
    """DMPO (module docstring). `model` is an `RxTForCausalLM`, `args` a `DMPOConfig`; `ref_model` (optional) replaces
    the default reference, a frozen deep copy of `model` taken at construction. Without a `data_collator` a
    `DMPOCollator(processing_class, args.max_length)` is used. Logged: `dmpo_loss` (the loss), `anchor_loss` (mean
    `|lp_neu − lp_ref_neu|`, batches with neutral answers), `reward_margin` (mean `x`), `preference_accuracy` (share
    of `x > 0`), `reward_accepted` / `reward_rejected` (mean `β·(lp − lp_ref)`), `stm_update_norm`, `episode_turns`."""

    def __init__(self, model=None, args: DMPOConfig = None, ref_model=None, **kwargs):
        if args is None or not isinstance(args, DMPOConfig):
            raise ValueError("DMPOTrainer needs args=DMPOConfig(...).")
        if args.disable_dropout:
            disable_dropout_in_model(model)
        if kwargs.get("data_collator") is None and kwargs.get("processing_class") is not None:
            kwargs["data_collator"] = DMPOCollator(kwargs["processing_class"], max_length=args.max_length)
        super().__init__(model=model, args=args, **kwargs)
        ref_model = copy.deepcopy(self.rxt_model()) if ref_model is None else ref_model
        ref_model.requires_grad_(False)
        self.ref_model = self.accelerator.prepare_model(ref_model.eval(), evaluation_mode=True)

    def _answer_logps(self, model, ids, mask, labels, stm, batch: int) -> tuple[torch.Tensor, object]:
        """`P` answer kinds stacked on the batch (`ids [P·B, T]`), all reading `stm [L, B, S, D]` (None: the initial
        STM, read inside forward) → `[P, B]`."""
        parts = ids.shape[0] // batch
        out = model(input_ids=ids, attention_mask=mask, stm=None if stm is None else stm.repeat(1, parts, 1, 1))
        return answer_logps(out.logits, labels).view(parts, -1), out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean over turns of the per-turn DMPO loss (module docstring). With `return_outputs` also returns
        `{"stm": final STM, "turn_losses": [N'], "logps": {kind: [N', B]}, "ref_logps": {kind: [N', B]},
        "x": [N', B]}` for the `N'` turns that some episode has (rows without that turn / answer hold 0)."""
        args = self.args
        turn_mask, neutral_mask = inputs["turn_mask"].bool(), inputs["neutral_mask"].bool()
        stm = None  # turn 0 reads the initial STM inside forward (where FSDP gathers a learned one) and returns it
        write_widths = turn_widths(inputs["accepted_attention_mask"])  # each write runs on its own width
        batch = turn_mask.shape[1]
        losses, anchors, norms, xs, rewards = [], [], [], [], {"accepted": [], "rejected": []}
        trace = {"logps": [], "ref_logps": [], "x": []}
        placeholders = []
        local_turns = int(turn_mask.any(1).cumprod(0).sum())  # up to the first turn no episode has
        turns = self.agreed_turns(model, local_turns, turn_mask.device)
        for turn in range(turns):
            if turn >= local_turns:  # another process's batch has this turn
                width = write_widths[0]
                placeholder_ids = inputs["accepted_input_ids"][0, :1, :width]  # [1, T]: a real interaction
                placeholder_mask = inputs["accepted_attention_mask"][0, :1, :width]
                placeholders.append(self.placeholder_turn(model, turn, placeholder_ids, placeholder_mask, stm))
                continue
            valid = turn_mask[turn]
            if turn > 0:  # step 4 of the previous turn: write its accepted interaction, now that it has been scored
                width = write_widths[turn - 1]
                accepted_ids = inputs["accepted_input_ids"][turn - 1, :, :width]
                accepted_mask = inputs["accepted_attention_mask"][turn - 1, :, :width]
                stm, norm = self.write_turn(model, turn, accepted_ids, accepted_mask, valid, stm)
                norms.append(norm)
            has_neutral = neutral_mask[turn] & valid
            kinds = ANSWER_KINDS if has_neutral.any() else ANSWER_KINDS[:2]
            ids = torch.cat([inputs[f"{kind}_input_ids"][turn] for kind in kinds])  # [P·B, T]
            mask = torch.cat([inputs[f"{kind}_attention_mask"][turn] for kind in kinds])
            mask[mask.sum(-1) == 0, 0] = 1  # absent turns / neutral answers: one visible token, no targets
            labels = torch.cat([inputs[f"{kind}_labels"][turn] for kind in kinds])
            width = turn_widths(mask[None])[0]  # the answer kinds of this turn, cut to their own width
            ids, mask, labels = ids[:, :width], mask[:, :width], labels[:, :width]
            logps, out = self._answer_logps(model, ids, mask, labels, stm, batch)  # policy and reference: STM_{t-1}
            if stm is None:
                stm = out.stm[:, :batch]  # [L, B, S, D]: the initial STM the policy read
            with torch.no_grad():
                ref_logps, _ = self._answer_logps(self.ref_model, ids, mask, labels, stm.detach(), batch)
            x = args.beta * ((logps[0] - logps[1]) - (ref_logps[0] - ref_logps[1]))  # [B]
            # TRL 1.16 computes its DPO losses inline in DPOTrainer._compute_loss (no reusable function): the sigmoid
            # loss with label smoothing is written out here.
            per_row = -(1 - args.label_smoothing) * F.logsigmoid(x) - args.label_smoothing * F.logsigmoid(-x)
            if len(kinds) == 3:
                anchor = (logps[2] - ref_logps[2]).abs() * has_neutral
                per_row = per_row + args.anchor_weight * anchor
                anchors.append(anchor[has_neutral].detach())
            weights = valid.to(per_row.dtype)
            losses.append((per_row * weights).sum() / weights.sum() + self.moe_aux(out))
            xs.append(x[valid].detach())
            for i, kind in enumerate(("accepted", "rejected")):
                rewards[kind].append(args.beta * (logps[i] - ref_logps[i])[valid].detach())
            if return_outputs:
                absent = [torch.zeros_like(x)] * (len(ANSWER_KINDS) - len(kinds))  # no neutral answer this turn
                trace["logps"].append(torch.stack([*logps, *absent]))  # [3, B]
                trace["ref_logps"].append(torch.stack([*ref_logps, *absent]))
                trace["x"].append(x)
        loss = torch.stack(losses).mean()
        x_all = torch.cat(xs)
        self.record(  # NaN = no data on this rank (record gathers across ranks: every rank must call it alike)
            dmpo_loss=loss,
            anchor_loss=torch.cat(anchors).mean() if anchors else float("nan"),
            reward_margin=x_all.mean(),
            preference_accuracy=(x_all > 0).float().mean(),
            reward_accepted=torch.cat(rewards["accepted"]).mean(),
            reward_rejected=torch.cat(rewards["rejected"]).mean(),
            stm_update_norm=torch.stack(norms).mean() if norms else float("nan"),
            episode_turns=float(len(losses)),
        )
        loss = loss + sum(placeholders)  # exactly 0 each
        if not return_outputs:
            return loss
        outputs = {
            "stm": stm,
            "turn_losses": torch.stack(losses),
            "x": torch.stack(trace["x"]),
            **{name: dict(zip(ANSWER_KINDS, torch.stack(trace[name], dim=1))) for name in ("logps", "ref_logps")},
        }
        return loss, outputs

    def placeholder_decode(self, model, ids, mask, stm):
        """A placeholder turn's forwards (`SupervisedMemoryAwareTrainer.placeholder_turn`): the policy's, then the
        reference's, as a real turn runs them → the policy's output."""
        out = model(input_ids=ids, attention_mask=mask, stm=stm)
        with torch.no_grad():
            self.ref_model(input_ids=ids, attention_mask=mask, stm=stm.detach())
        return out

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the DMPO loss only (the batches have no `labels` key for the Trainer's default path)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
