"""Stage 5: Memory Reinforcement Learning with IMPO (docs/spec.md#stage-5-memory-reinforcement-learning,
docs/spec.md#trl-and-the-mrl-trainer): the trainer.

Its configuration is `trainers.mrl_config.MRLConfig`, the critic `trainers.mrl_critic.RxTCritic`, the replay buffer
`trainers.mrl_replay.MrlReplayBuffer`.

`MRLTrainer` is a `transformers.Trainer` with GRPO's buffering structure and a stateful rollout: TRL 1.16 has no
PPOTrainer and GRPO's internals never see an STM, so only TRL helpers are reused (`trainers/_trl_compat.py`).

Rollout (no grad, eval mode, one `RxTCache` per turn): the first interaction of each episode is only written into
memory; each follow-up query is answered by sampling with stock `generate`, rewarded (`trainers.mrl_reward`), and
unless it is the last step the memory is updated with the *generated* answer (`teacher_forcing`: the reference).
Stored per episode (episode-major tensors, so TRL's `shuffle_sequence_dict` / `split_tensor_dict` slice them):
the starting STM, per step the interaction written before the step (`saved_ids`), the prompt + action (`qa_ids`,
`action_mask`), old log-probs, reward, advantage, critic input.

Update (`compute_loss`, one optimizer step per minibatch of episodes, turn-major as SMAT): per step the STM is
replayed with the current parameters from the detached previous state (`stm_source="replay"`; with `bptt_steps` k
the STM is detached every k steps only, so the loss also reaches earlier writes), the decoder reads it on
prompt + action, and the IMPO loss (docs/spec.md#impo-loss) is

    L = policy_clip − c_H·H + c_ref·KL_ref + c_kl·KL(π_t ‖ π_{t−1}) + sqrt(t+1)·c_mem·MSE(STM_t, STM_{t−1})
        (− c_cos·cos(STM_t, STM_{t−1})) (+ MoE aux) (+ critic MSE)

averaged over steps. Advantages: `R − V` (critic: value head on a copy of the memory encoder, docs/spec.md#mrl-critic)
or GAE, or group-normalised rewards over `num_generations` rollouts of the same episode; then normalised per
`advantage_mode`. The curriculum (steps per episode, strategy, freeze stage, STM resets, replay buffer) switches by
epoch.

Replay buffer (docs/spec.md#mrl-curriculum-freezing-resets-replay, `MrlReplayBuffer`, off unless
`replay_buffer_size > 0`): the best episodes of earlier rollouts join every new generation batch (recomputed critic
values; old log-probs recomputed with `log_probs_source="update"`, the sampler's stored ones with `"collect"`), one
buffer per curriculum stage and per process.

Resume: a checkpoint holds, beside the policy folder, `critic/`, the optimizer (critic groups included), scheduler and
RNG states, one `mrl_state_<process>.pt` per process (step counter, the rest of the current generation batch, carried
STM, reset RNG, replay buffer), and the train sampler's order depends only on `(seed, epoch)`; so a resumed run
repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
from transformers import TrainerCallback

from modeling_rxt import RxTCache
from modeling_rxt.tokenization_rxt import check_rxt_tokenizer

from ._trl_compat import (
    RepeatSampler,
    disable_dropout_in_model,
    entropy_from_logits,
    selective_log_softmax,
    shuffle_sequence_dict,
    split_tensor_dict,
    unwrap_model_for_generation,
)
from .common import RxTTrainer, component_of, is_no_decay, turn_widths
from .data import episode_turns, tokenize_texts
from .mrl_config import MRLConfig, freeze_stage
from .mrl_critic import RxTCritic, write_critic_folder
from .mrl_replay import MrlReplayBuffer, concat_padded
from .mrl_reward import MRLReward, episode_idf, retention_context


class MRLModel(nn.Module):
    """The Trainer's model: the policy (`RxTForCausalLM`) and, with the critic estimator, the critic.

    `forward(mode="critic", input_ids, attention_mask)` → values `[B]`; any other mode → the policy's forward, so every
    forward goes through the (DDP-wrapped) module."""

    def __init__(self, policy, critic: RxTCritic | None = None):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.config = policy.config

    # TRL's unwrap_model_for_generation switches activation checkpointing off for rollouts with these names.
    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.policy.is_activation_checkpointing

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.policy.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self):
        self.policy.activation_checkpointing_disable()

    def run(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)`. Under FSDP2 the trainer registers it as a forward method
        (`register_fsdp_forward_method`), so the root's own parameters (embedding, norms, LM head, initial STM) stay
        gathered while `fn` calls the policy directly: `generate`, and reads outside any forward in rollouts."""
        return fn(*args, **kwargs)

    def forward(self, *args, mode: str = "decode", **kwargs):
        if mode == "critic":
            if self.critic is None:
                raise ValueError("mode='critic' needs a critic (advantage_estimator='critic').")
            return self.critic(kwargs["input_ids"], kwargs["attention_mask"])
        return self.policy(*args, mode=mode, **kwargs)


def trains_in_stage(name: str, stage: str, freeze_embeddings: bool) -> bool:
    """Whether parameter `name` (of `MRLModel`) trains in freeze stage `stage`
    (docs/spec.md#mrl-curriculum-freezing-resets-replay)."""
    if name.startswith("critic.") or ".critic." in name:
        return True
    component = component_of(name.replace("policy.", "", 1))
    if component == "embedding" and freeze_embeddings:
        return False
    if stage == "all":
        return True
    if component == "memory_attention":
        return True
    if stage in ("fetch", "update") and any(k in name for k in (".memory_cross_attention.", ".norm2.", ".stm_norm.")):
        return component == "decoder"
    return stage == "update" and component in ("encoder", "embedding")


# --------------------------------------------------------------------------------------------------------------------
# Data


class MRLCollator:
    """Episode rows `{"query", "answer", "interactions"}` → token-id bodies per turn (the rollout builds tensors).

    Returns `{"episodes": [[(query_ids, answer_ids), ...], ...]}` (turn 0 = the interaction to remember)."""

    def __init__(self, tokenizer, max_length: int = 256):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, rows: list[dict]) -> dict:
        turns = [episode_turns(row) for row in rows]
        flat = [turn for episode in turns for turn in episode]
        queries = tokenize_texts(self.tokenizer, [q for q, _ in flat])
        answers = tokenize_texts(self.tokenizer, [a for _, a in flat])
        budget = self.max_length - 4  # [BOS][Q] ... [A] ... [EOS]
        episodes, position = [], 0
        for row_index, episode in enumerate(turns):
            bodies = []
            for _ in episode:
                query, answer = queries[position], answers[position]
                if len(query) + len(answer) > budget:
                    raise ValueError(
                        f"episode {row_index}: turn of {len(query) + len(answer) + 4} tokens exceeds max_length="
                        f"{self.max_length}; raise max_length or filter the rows (validate_rows(on_error='skip'))."
                    )
                bodies.append((query, answer))
                position += 1
            episodes.append(bodies)
        return {"episodes": episodes}


def _pad(rows: list[list[int]], pad: int, left: bool = False, width: int | None = None):
    """List of id lists → `ids [B, T]`, `mask [B, T]` (right padding unless `left`)."""
    width = max(width or 1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
    return ids, mask


def _stack_steps(per_step: list[torch.Tensor], value) -> torch.Tensor:
    """`N` tensors `[B, T_i]` → `[B, N, max T]` padded with `value`."""
    width = max(t.shape[1] for t in per_step)
    return torch.stack([F.pad(t, (0, width - t.shape[1]), value=value) for t in per_step], dim=1)


def split_rows(batch: dict, chunks: int) -> list[dict]:
    """A generation batch → `chunks` minibatches of rows (TRL's equal split; sizes differ by at most one row when
    replayed episodes make the row count indivisible)."""
    rows = next(iter(batch.values())).shape[0]
    if rows % chunks == 0:
        return split_tensor_dict(batch, chunks)
    parts = {key: torch.tensor_split(value, chunks) for key, value in batch.items()}
    return [{key: parts[key][i] for key in batch} for i in range(chunks)]


class EpochRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler` whose shuffle depends only on `(seed, epoch)`. TRL's draws each epoch's permutation from
    one generator that runs on across epochs, which a resumed process cannot reproduce: resuming in epoch `e > 0` would
    replay epoch 0's order. The trainer calls `set_epoch` at every epoch start (the Trainer and accelerate call it too
    where their wrappers reach it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


# --------------------------------------------------------------------------------------------------------------------
# Replay buffer


class MRLCurriculumCallback(TrainerCallback):
    """Switches the curriculum stage (steps, strategy, freeze stage, resets) at each epoch."""

    def __init__(self, trainer: MRLTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer.set_epoch(int(state.epoch or 0))


class MRLTrainer(RxTTrainer):
    """IMPO on RxT (docs/spec.md#stage-5-memory-reinforcement-learning). `model` is an `RxTForCausalLM`; the trainer
    wraps it (with the critic) in `MRLModel`. `save_model` writes the policy as a trust_remote_code folder and the
    critic to `critic/`."""

    loss_is_scaled_for_ga = False

    def __init__(self, model=None, args: MRLConfig = None, ref_model=None, **kwargs):
        if args is None or not isinstance(args, MRLConfig):
            raise ValueError("MRLTrainer needs args=MRLConfig(...).")
        critic = None
        if args.advantage_estimator == "critic":
            critic = RxTCritic(model, args.critic_activation, args.critic_init_scale)
            if args.critic_name_or_path is not None:
                critic.load_weights(args.critic_name_or_path)
        if args.disable_dropout:
            disable_dropout_in_model(model)
        wrapper = MRLModel(model, critic)
        if kwargs.get("data_collator") is None and kwargs.get("processing_class") is not None:
            kwargs["data_collator"] = MRLCollator(kwargs["processing_class"], args.max_length)
        super().__init__(model=wrapper, args=args, **kwargs)
        tokenizer = self.processing_class
        if tokenizer is None:
            raise ValueError("MRLTrainer needs processing_class=<the RxT tokenizer>.")
        self.ids = check_rxt_tokenizer(tokenizer)
        idf, rows = None, self.train_dataset if self.train_dataset is not None else self.eval_dataset
        if args.retention_factor > 0 and rows is not None:  # IDF of the training (else evaluation) episodes
            idf = episode_idf(self.data_collator(list(rows))["episodes"], model.get_input_embeddings().num_embeddings,
                              [i for i in self.ids.values() if i is not None])  # fmt: skip
        self.reward_fn = MRLReward(args, model.get_input_embeddings(), self.ids["pad_token_id"], idf=idf)
        self.ref_model = None
        if args.beta > 0:
            ref_model = ref_model if ref_model is not None else copy.deepcopy(model)
            ref_model.requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model.eval(), evaluation_mode=True)
        self._step = 0  # micro-batches since the start of training (restored on resume)
        self._buffer: list[dict] = []  # the current generation batch, split into steps_per_generation minibatches
        self._carry_stm: torch.Tensor | None = None
        self._rng = torch.Generator().manual_seed(args.seed)
        self._train_sampler: EpochRepeatSampler | None = None
        self.replay_buffer: MrlReplayBuffer | None = None
        self._replay_stage: int | None = None  # the curriculum stage the replay buffer belongs to
        self.set_epoch(0)
        self.add_callback(MRLCurriculumCallback(self))

    # -- curriculum -----------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Apply the curriculum stage of `epoch`: steps, strategy, freeze stage, resets, teacher forcing, LRs, replay
        buffer; and tell the train sampler the epoch."""
        args = self.args
        stage, local_epoch = args.stage_at(epoch)
        index = next(i for i, s in enumerate(args.curriculum_stages) if s is stage)
        if index != self._replay_stage:  # one replay buffer per curriculum stage: a new stage starts empty
            self._replay_stage = index
            self.replay_buffer = MrlReplayBuffer(*stage.replay_buffer) if stage.replay_buffer else None
        if self._train_sampler is not None:
            self._train_sampler.set_epoch(epoch)
        self.stage = stage
        self.steps = stage.steps
        self.strategy = "multi_step" if stage.strategy == "single_step" else (stage.strategy or args.strategy)
        unfreeze = stage.unfreeze_epoch if stage.unfreeze_epoch is not None else args.unfreeze
        self.freeze_stage = freeze_stage(unfreeze, local_epoch)
        self.teacher_forcing = args.teacher_forcing if stage.teacher_forcing is None else stage.teacher_forcing
        ratio = args.random_resets_ratio if stage.random_resets_ratio is None else stage.random_resets_ratio
        start = args.random_resets_from if stage.random_resets_from is None else stage.random_resets_from
        self.reset_ratio = ratio if args.random_resets and local_epoch >= start else 1.0
        self.trainable = {name for name, _ in self.model.named_parameters()
                          if trains_in_stage(name, self.freeze_stage, args.freeze_embeddings)}  # fmt: skip
        if isinstance(unfreeze, list) and self.lr_scheduler is not None:
            self._apply_unfreeze_lrs(unfreeze, local_epoch)

    def _apply_unfreeze_lrs(self, unfreeze, local_epoch: int) -> None:
        """`[epoch, lr]` elements: from that epoch on, the newly unfrozen components use `lr` (scheduler base LR)."""
        newly = {"fetch": ("decoder", "memory_attention"), "update": ("encoder", "embedding"), "all": ("decoder",)}
        for name, (start, lr) in zip(("fetch", "update", "all"), unfreeze):
            if lr is None or local_epoch < start:
                continue
            for index, group in enumerate(self.optimizer.param_groups):
                if group.get("name", "").split(".")[0] in newly[name]:
                    self.lr_scheduler.base_lrs[index] = lr

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # frozen by the curriculum: no update (DDP-safe, docs/spec.md#freezing-and-unfreezing)
        for name, param in self.model.named_parameters():
            if name not in self.trainable:
                param.grad = None
        return loss

    def _clip_grad_norm(self, model):
        """Clip each component (embedding, encoder, decoder, memory attention, critic) to `max_grad_norm` separately
        (docs/spec.md#impo-loss), so the critic's large early gradients do not shrink the policy's. Returns the total
        norm."""
        if not self.args.per_component_grad_clip:
            return super()._clip_grad_norm(model)
        components: dict[str, list[torch.Tensor]] = defaultdict(list)
        for group in self.optimizer.param_groups:
            components[group["name"].split(".")[0]].extend(p for p in group["params"] if p.grad is not None)
        norms = [torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm) for params in components.values()
                 if params]  # fmt: skip
        return torch.stack(norms).norm() if norms else torch.tensor(0.0)

    # -- optimizer: per-component LR and weight decay, critic included ----------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        groups: dict[tuple[str, bool], list[nn.Parameter]] = defaultdict(list)
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("critic."):
                component = "critic_encoder" if name.startswith("critic.encoder.") else "critic"
            else:
                component = component_of(name.replace("policy.", "", 1))
            groups[(component, is_no_decay(name, param))].append(param)
        param_groups = [
            {"params": params, "lr": self.args.component_lr(component), "name": f"{component}{'.no_decay' * no_decay}",
             "weight_decay": 0.0 if no_decay else self.args.component_weight_decay(component)}
            for (component, no_decay), params in sorted(groups.items())
        ]  # fmt: skip
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    # -- data: GRPO's generation batches (a rollout serves steps_per_generation x num_iterations steps) -------------
    def get_train_dataloader(self):
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        dataset = self.train_dataset if dataset is None else dataset
        self._train_sampler = EpochRepeatSampler(
            data_source=dataset,
            mini_repeat_count=1,
            batch_size=self.args.generation_batch_size,
            repeat_count=self.args.num_iterations * self.args.steps_per_generation,
            shuffle=True,
            seed=self.args.seed,
        )
        return self._train_sampler

    def _prepare_inputs(self, inputs):
        if not self.model.training:
            return inputs
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        if self._step % generate_every == 0 or not self._buffer:
            rollout = self.rollout(inputs["episodes"], repeats=self.args.num_generations)
            self._log_rollout(rollout)
            rollout = {k: v for k, v in rollout.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
            if self.replay_buffer is not None:
                rollout = self._with_replay(rollout)
            self._buffer = split_rows(shuffle_sequence_dict(rollout), self.args.steps_per_generation)
        batch = self._buffer[self._step % self.args.steps_per_generation]
        self._step += 1
        return batch

    # -- replay buffer (docs/spec.md#mrl-curriculum-freezing-resets-replay) -------------------------------------------
    def _with_replay(self, rollout: dict) -> dict:
        """The generation batch = this rollout + every episode in the replay buffer (all collected at earlier
        rollouts); then the buffer is updated with this rollout's episodes (`MrlReplayBuffer.add`). Replayed episodes
        get fresh critic values and, with `log_probs_source="update"`, old log-probs recomputed by the current policy;
        advantages are computed over the whole batch. Rows carry `replayed` (bool)."""
        buffer, generations = self.replay_buffer, self.args.num_generations
        replayed = buffer.episodes()  # before the update: entries evicted now are replayed one last time
        stored = {k: v for k, v in rollout.items() if k not in ("values", "advantages")}
        scores = MrlReplayBuffer.score(rollout["rewards"], rollout["turn_mask"], generations)
        buffer.add([{k: v[i * generations : (i + 1) * generations] for k, v in stored.items()}
                    for i in range(scores.shape[0])], scores)  # fmt: skip
        self.record(replay_buffer_episodes=float(len(buffer)), replayed_episodes=float(len(replayed)),
                    replay_buffer_score=torch.tensor([e["score"] for e in buffer.entries]).mean())  # fmt: skip
        fresh = rollout["rewards"].shape[0]
        device = rollout["rewards"].device
        if not replayed:
            return {**rollout, "replayed": torch.zeros(fresh, dtype=torch.bool, device=device)}
        old = {k: v.to(device) for k, v in concat_padded(replayed, self.ids["pad_token_id"]).items()}
        old = self._refresh_replayed(old)
        fresh_part = {k: v for k, v in rollout.items() if k != "advantages"}
        combined = concat_padded([fresh_part, old], self.ids["pad_token_id"])
        combined["advantages"] = self.compute_advantages(combined["rewards"], combined.get("values"),
                                                         combined["turn_mask"], generations)  # fmt: skip
        replayed_rows = torch.arange(combined["rewards"].shape[0], device=device) >= fresh
        return {**combined, "replayed": replayed_rows}

    @staticmethod
    def _gathered(unwrapped: MRLModel):
        """`unwrapped.run`, registered once as an FSDP2 forward method when the model is sharded (`MRLModel.run`)."""
        if isinstance(unwrapped, FSDPModule) and "run" not in vars(unwrapped):
            register_fsdp_forward_method(unwrapped, "run")
        return unwrapped.run

    @torch.no_grad()
    def _refresh_replayed(self, batch: dict) -> dict:
        """Critic values of replayed episodes with the current critic; with `log_probs_source="update"` their old
        log-probs from the current policy (one no-grad forward at temperature 1 on the STM replayed from the stored
        start, or the stored snapshot), as a fresh rollout computes them. With `"collect"` the stored log-probs of the
        sampler that produced the actions are kept, so the ratio is w.r.t. that behaviour policy."""
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as unwrapped:
            return self._gathered(unwrapped)(self._refresh, unwrapped, batch)

    def _refresh(self, unwrapped, batch: dict) -> dict:
        """`_refresh_replayed` on the unwrapped `MRLModel`."""
        args = self.args
        if args.log_probs_source == "update":
            policy = unwrapped.policy
            was_training = policy.training
            policy.eval()
            stm = batch["start_stm"].transpose(0, 1)
            if args.stm_source == "replay":
                stm = self._warmup(policy, stm, batch["first_ids"], batch["first_mask"])
            logps = []
            for step in range(batch["turn_mask"].shape[1]):
                if args.stm_source == "replay":
                    stm = policy(input_ids=batch["saved_ids"][:, step], attention_mask=batch["saved_mask"][:, step],
                                 stm=stm, mode="memory_update").stm  # fmt: skip
                else:
                    stm = batch["stm_after"][:, step].transpose(0, 1)
                qa_ids = batch["qa_ids"][:, step]
                logits = policy(input_ids=qa_ids, attention_mask=batch["qa_mask"][:, step], stm=stm).logits
                logps.append(selective_log_softmax(logits[:, :-1].float(), qa_ids[:, 1:]))
            policy.train(was_training)
            batch["old_logps"] = torch.stack(logps, dim=1)
        if unwrapped.critic is not None:
            batch["values"] = self._critic_values(unwrapped, batch).float()
        return batch

    @staticmethod
    def _critic_values(unwrapped, batch: dict) -> torch.Tensor:
        """Critic values `[B, N]` of the episode batch's critic inputs (`critic_ids` / `critic_mask` `[B, N, T]`)."""
        rows, steps = batch["turn_mask"].shape
        values = unwrapped(mode="critic", input_ids=batch["critic_ids"].flatten(0, 1),
                           attention_mask=batch["critic_mask"].flatten(0, 1))  # fmt: skip
        return values.view(rows, steps)

    # -- rollout ----------------------------------------------------------------------------------------------------
    def _interaction(self, query: list[int], answer: list[int], eos: bool = True) -> list[int]:
        ids = self.ids
        return [ids["bos_token_id"], ids["query_token_id"], *query, ids["answer_token_id"], *answer] + (
            [ids["eos_token_id"]] if eos else []
        )

    def _initial_stm(self, policy, batch: int) -> torch.Tensor:
        """Initial STM, or (with random resets) the previous episode batch's final STM for rows not reset."""
        stm = policy.initial_stm(batch).detach().clone()
        if self._carry_stm is not None and self.reset_ratio < 1.0 and self._carry_stm.shape[1] == batch:
            keep = torch.rand(batch, generator=self._rng) >= self.reset_ratio
            stm[:, keep.to(stm.device)] = self._carry_stm[:, keep.to(stm.device)]
        return stm

    def _warmup(self, model, stm, ids, mask):
        """Memory warm-up with the first interaction: soft = one extra update; hard = (ED + STM) / 2 (T == S)."""
        if not self.args.use_memory_warmup:
            return stm
        if self.args.hard_warmup:
            encoded = model(input_ids=ids, attention_mask=mask, mode="encode").encoder_hidden_states
            if encoded.shape[2] != stm.shape[2]:
                raise ValueError(
                    f"hard_warmup needs the first interaction's length ({encoded.shape[2]}) to equal the STM slots "
                    f"({stm.shape[2]}); pad the data to {stm.shape[2]} tokens or use the soft warm-up."
                )
            return (encoded + stm) / 2
        return model(input_ids=ids, attention_mask=mask, stm=stm, mode="memory_update").stm

    @torch.no_grad()
    def rollout(
        self, episodes: list[list[tuple[list[int], list[int]]]], repeats: int = 1, greedy: bool = False, answers=None
    ) -> dict:
        """Collect one episode batch (docs/spec.md#mrl-episode-and-rollout): sampled answers (`greedy=True`: greedy,
        for evaluation; `answers(episode) -> [answer ids per follow-up]`: these fixed answers are scored instead of
        generated ones, e.g. the references, for the reward's ceiling). Returns episode-major tensors (see the module
        docstring)."""
        episodes = [episode for episode in episodes for _ in range(repeats)]
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as unwrapped:
            return self._gathered(unwrapped)(self._collect, unwrapped, episodes, repeats, greedy, answers)

    def _collect(self, unwrapped, episodes, repeats: int, greedy: bool, answers) -> dict:
        """The rollout on the unwrapped `MRLModel` (`episodes` already repeated)."""
        args, ids = self.args, self.ids
        pad = ids["pad_token_id"]
        batch, steps = len(episodes), self.steps
        device = self.accelerator.device
        policy = unwrapped.policy
        was_training = policy.training
        policy.eval()
        stm = self._initial_stm(policy, batch)
        start_stm = stm.clone()
        saved_rows = [self._interaction(*e[0]) for e in episodes]  # the first interaction, written before step 0
        first_ids, first_mask = _pad(saved_rows, pad)
        first_ids, first_mask = first_ids.to(device), first_mask.to(device)
        stm = self._warmup(policy, stm, first_ids, first_mask)
        records = defaultdict(list)
        fixed_answers = None if answers is None else [answers(episode) for episode in episodes]
        running_mean = None
        first_body = _pad([e[0][0] + e[0][1] for e in episodes], pad)[0].to(device)
        # [PAD]/[BOS]/[Q]/[A] are never sampled (docs/spec.md#reference-training-behaviours)
        suppressed = [ids[k] for k in ("pad_token_id", "bos_token_id", "query_token_id", "answer_token_id")]
        sampling = {"do_sample": False} if greedy else {
            "do_sample": True, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "min_p": args.min_p, "repetition_penalty": args.repetition_penalty}  # fmt: skip
        for step in range(steps):
            valid = torch.tensor([len(e) > step + 1 for e in episodes], device=device)
            saved_ids, saved_mask = _pad(saved_rows, pad)
            saved_ids, saved_mask = saved_ids.to(device), saved_mask.to(device)
            stm_before = stm
            stm = policy(input_ids=saved_ids, attention_mask=saved_mask, stm=stm, mode="memory_update").stm
            turns = [e[step + 1] if len(e) > step + 1 else ([], []) for e in episodes]
            prompt_rows = [self._interaction(q, [], eos=False) for q, _ in turns]
            prompt_ids, prompt_mask = _pad(prompt_rows, pad, left=True)
            prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
            if answers is None:
                output = policy.generate(
                    input_ids=prompt_ids, attention_mask=prompt_mask, cache=RxTCache(stm=stm),
                    max_new_tokens=args.max_completion_length, eos_token_id=ids["eos_token_id"],
                    pad_token_id=pad, suppress_tokens=suppressed,
                    output_scores=args.log_probs_source == "collect", return_dict_in_generate=True, **sampling,
                )  # fmt: skip
                generated = output.sequences[:, prompt_ids.shape[1] :]
                ended = (generated == ids["eos_token_id"]).cumsum(1)
                keep = (ended == 0) | ((ended == 1) & (generated == ids["eos_token_id"]))  # up to and with [EOS]
                generated = generated.masked_fill(~keep, pad)
                actions = [row[:n] for row, n in zip(generated.tolist(), keep.sum(1).tolist())]
            else:
                actions = [list(fixed[step]) + [ids["eos_token_id"]] if len(e) > step + 1 else []
                           for e, fixed in zip(episodes, fixed_answers)]  # fmt: skip
            qa_ids, qa_mask = _pad([p + a for p, a in zip(prompt_rows, actions)], pad)
            qa_ids, qa_mask = qa_ids.to(device), qa_mask.to(device)
            prompt_len = torch.tensor([len(p) for p in prompt_rows], device=device)
            positions = torch.arange(qa_ids.shape[1], device=device)
            action_mask = (positions >= prompt_len[:, None]) & qa_mask.bool() & valid[:, None]
            logits = policy(input_ids=qa_ids, attention_mask=qa_mask, stm=stm).logits[:, :-1].float()
            old_logps = selective_log_softmax(logits, qa_ids[:, 1:])  # [B, T-1]
            if args.log_probs_source == "collect" and answers is None:  # the sampler's distribution (parity)
                scores = torch.stack(output.scores, dim=1).float().log_softmax(-1)  # [B, G, V]
                sampled = scores.gather(-1, output.sequences[:, prompt_ids.shape[1] :, None]).squeeze(-1)
                index = (prompt_len[:, None] - 1 + torch.arange(sampled.shape[1], device=device)).clamp(
                    max=old_logps.shape[1] - 1
                )
                within = torch.arange(sampled.shape[1], device=device)[None] < keep.sum(1, keepdim=True)
                old_logps = old_logps.scatter(1, index, torch.where(within, sampled, old_logps.gather(1, index)))
            # reward
            answer_body = [a[:-1] if a and a[-1] == ids["eos_token_id"] else a for a in actions]
            gen_ids = _pad(answer_body, pad)[0].to(device)
            ref_ids = _pad([a for _, a in turns], pad)[0].to(device)
            last = step == steps - 1
            if self.strategy == "long_range":
                mode = "long_range" if last else ("negative" if step == 0 else "standard")
            else:
                mode = "standard"
            if mode == "long_range" or step == 0:
                saved_body = first_body
            else:
                saved_body = _pad([e[step][0] + e[step][1] if len(e) > step else [] for e in episodes], pad)[0]
                saved_body = saved_body.to(device)
            context = _pad(retention_context(episodes, step, pad), pad)[0].to(device) if args.retention_factor else None
            reward = self.reward_fn(gen_ids, ref_ids, saved_body, mode=mode, running_mean=running_mean,
                                    first_step=step == 0, context=context, query=prompt_ids)  # fmt: skip
            if last and self.args.delayed_final_reward and self.strategy != "long_range":
                reward = reward + self.reward_fn(gen_ids, ref_ids, first_body, mode="long_range",
                                                 running_mean=running_mean, context=context,
                                                 query=prompt_ids)  # fmt: skip
            running_mean = self.reward_fn.update_running_mean(running_mean, saved_body)
            # critic input: saved interaction + next query (last critic_max_len tokens)
            critic_rows = [(s + self._interaction(q, [], eos=False)[1:])[-args.critic_max_len :]
                           for s, (q, _) in zip(saved_rows, turns)]  # fmt: skip
            critic_ids, critic_mask = _pad(critic_rows, pad)
            records["saved_ids"].append(saved_ids)
            records["saved_mask"].append(saved_mask)
            records["qa_ids"].append(qa_ids)
            records["qa_mask"].append(qa_mask)
            records["action_mask"].append(action_mask.long())
            records["old_logps"].append(old_logps)
            records["prompt_len"].append(prompt_len)
            records["rewards"].append(reward.float())
            records["turn_mask"].append(valid)
            records["critic_ids"].append(critic_ids.to(device))
            records["critic_mask"].append(critic_mask.to(device))
            if args.sft_coef > 0:  # the reference answer on the same prompt (+ [EOS]; [BOS][Q][A][EOS] without a step)
                sft_ids, sft_mask = _pad([self._interaction(q, a) for q, a in turns], pad)
                records["sft_ids"].append(sft_ids.to(device))
                records["sft_mask"].append(sft_mask.to(device))
            if args.stm_source == "snapshot":
                records["stm_before"].append(stm_before.transpose(0, 1))
                records["stm_after"].append(stm.transpose(0, 1))
            if not last:  # write this turn (generated answer, or the reference with teacher forcing)
                written = [self._interaction(q, a) for q, a in turns] if self.teacher_forcing else [
                    p + a for p, a in zip(prompt_rows, actions)]  # fmt: skip
                saved_rows = [w if len(w) > 3 else self._interaction([], []) for w in written]
        policy.train(was_training)
        self._carry_stm = stm.detach()
        out = {
            "start_stm": start_stm.transpose(0, 1).contiguous(),  # [B, L, S, D]
            "first_ids": first_ids,
            "first_mask": first_mask,
        }
        for key in ("saved_ids", "saved_mask", "qa_ids", "qa_mask", "action_mask", "critic_ids", "critic_mask",
                    "sft_ids", "sft_mask"):
            if key in records:
                out[key] = _stack_steps(records[key], pad if key.endswith("_ids") else 0)
        out["old_logps"] = _stack_steps(records["old_logps"], 0.0)
        for key in ("prompt_len", "rewards", "turn_mask"):
            out[key] = torch.stack(records[key], dim=1)  # [B, N]
        if args.stm_source == "snapshot":
            out["stm_before"] = torch.stack(records["stm_before"], dim=1)
            out["stm_after"] = torch.stack(records["stm_after"], dim=1)
        values = None
        if unwrapped.critic is not None:
            values = self._critic_values(unwrapped, out)
            out["values"] = values.float()
        out["advantages"] = self.compute_advantages(out["rewards"], values, out["turn_mask"], repeats)
        return out

    def compute_advantages(self, rewards, values, turn_mask, repeats: int) -> torch.Tensor:
        """`[B, N]` advantages (docs/spec.md#mrl-advantages): `R − V`, GAE, or group-normalised, then
        `advantage_mode`."""
        args, mask = self.args, turn_mask.bool()
        if args.advantage_estimator == "group":
            grouped = rewards.view(-1, repeats, rewards.shape[1])
            valid = mask.view(-1, repeats, rewards.shape[1]).float()
            count = valid.sum(1, keepdim=True).clamp(min=1.0)
            mean = (grouped * valid).sum(1, keepdim=True) / count
            std = (((grouped - mean) ** 2 * valid).sum(1, keepdim=True) / (count - 1).clamp(min=1.0)).sqrt()
            advantages = ((grouped - mean) / (std + 1e-4)).view_as(rewards)
        elif args.use_gae:
            values = values * mask
            advantages = torch.zeros_like(rewards)
            running = torch.zeros_like(rewards[:, 0])
            for step in reversed(range(rewards.shape[1])):  # over curriculum steps (<= 16), vectorised over episodes
                following = values[:, step + 1] if step + 1 < rewards.shape[1] else torch.zeros_like(running)
                not_done = mask[:, step + 1].float() if step + 1 < rewards.shape[1] else torch.zeros_like(running)
                delta = rewards[:, step] + args.gae_gamma * following * not_done - values[:, step]
                running = delta + args.gae_gamma * args.gae_lambda * not_done * running
                advantages[:, step] = running
        else:
            advantages = rewards - values
        advantages = advantages.masked_fill(~mask, 0.0)
        if args.advantage_mode == "none":
            return advantages
        if args.advantage_mode == "all":
            everything = self.accelerator.gather(advantages.contiguous())  # global statistics across ranks
            valid = self.accelerator.gather(mask.contiguous())
            selected = everything[valid]
            mean = selected.mean()
            std = selected.std() if selected.numel() > 1 else torch.ones_like(mean)
            return ((advantages - mean) / (std + 1e-8)).masked_fill(~mask, 0.0)
        dims = None if args.advantage_mode == "batch" else 0
        count = mask.sum(dim=dims, keepdim=dims is not None).clamp(min=1)
        mean = (advantages * mask).sum(dim=dims, keepdim=dims is not None) / count
        var = ((advantages - mean) ** 2 * mask).sum(dim=dims, keepdim=dims is not None) / (count - 1).clamp(min=1)
        return ((advantages - mean) / (var.sqrt() + 1e-8)).clamp(-10, 10).masked_fill(~mask, 0.0)

    def _log_rollout(self, rollout: dict) -> None:
        mask = rollout["turn_mask"].bool()
        # the same keys on every rank (DDP gathers them): NaN where a rank has no episode with that step
        steps = {f"reward_step_{i}": rollout["rewards"][:, i][mask[:, i]].mean() for i in range(mask.shape[1])}
        generations = self.args.num_generations
        if generations > 1:  # TRL GRPO's metric: (episode, step) groups whose rollouts all got the same reward
            grouped = rollout["rewards"].view(-1, generations, mask.shape[1])
            same = grouped.amax(1) == grouped.amin(1)  # [E, N]; no spread = zero group-normalised advantage
            steps["frac_reward_zero_std"] = same[mask.view(-1, generations, mask.shape[1]).all(1)].float().mean()
        self.record(reward=rollout["rewards"][mask].mean(), episode_steps=float(self.steps),
                    answer_length=rollout["action_mask"].sum(-1).float()[mask].mean(), **steps)  # fmt: skip

    # -- loss -------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """IMPO loss (docs/spec.md#impo-loss) averaged over the steps that have episodes. Every step runs the same
        forwards on every rank (absent episodes are weighted 0, never skipped), so DDP sees one graph."""
        args = self.args
        stm = inputs["start_stm"].transpose(0, 1)  # [L, B, S, D]
        turn_mask = inputs["turn_mask"].bool()
        stm = self._warmup(model, stm, inputs["first_ids"], inputs["first_mask"])
        # each step runs on its own width (trailing pads of the step-major stacking cut, as in SMAT)
        saved_widths = turn_widths(inputs["saved_mask"].transpose(0, 1))
        qa_widths = turn_widths(inputs["qa_mask"].transpose(0, 1))
        critic_widths = turn_widths(inputs["critic_mask"].transpose(0, 1))
        sft_widths = turn_widths(inputs["sft_mask"].transpose(0, 1)) if args.sft_coef > 0 else None
        losses, terms = [], defaultdict(list)
        previous_answer_logits, previous_answer_mask = None, None
        for step in range(turn_mask.shape[1]):
            valid = turn_mask[:, step]
            rows = valid.float()

            def row_mean(
                values: torch.Tensor, rows: torch.Tensor = rows
            ) -> torch.Tensor:  # over the episodes with this step
                return (values * rows).sum() / rows.sum().clamp(min=1.0)

            if args.stm_source == "replay":  # detach every `bptt_steps` steps (0: never), before this step's write
                previous = stm.detach() if args.bptt_steps and step % args.bptt_steps == 0 else stm
            else:
                previous = inputs["stm_before"][:, step].transpose(0, 1)
            width = saved_widths[step]
            new_stm = model(input_ids=inputs["saved_ids"][:, step, :width],
                            attention_mask=inputs["saved_mask"][:, step, :width], stm=previous,
                            mode="memory_update").stm  # fmt: skip
            read_stm = new_stm if args.stm_source == "replay" else inputs["stm_after"][:, step].transpose(0, 1)
            width = qa_widths[step]
            qa_ids, qa_mask = inputs["qa_ids"][:, step, :width], inputs["qa_mask"][:, step, :width]
            out = model(input_ids=qa_ids, attention_mask=qa_mask, stm=read_stm)
            logits = out.logits[:, :-1].float()  # [B, T-1, V]
            mask = inputs["action_mask"][:, step, 1:width].bool() & valid[:, None]
            tokens = mask.sum(-1).clamp(min=1)
            logps = selective_log_softmax(logits, qa_ids[:, 1:])
            advantages = inputs["advantages"][:, step, None]
            ratio = torch.exp(logps - inputs["old_logps"][:, step, : width - 1])
            clipped = torch.clamp(ratio, 1 - args.epsilon, 1 + args.epsilon)
            per_token = -torch.min(ratio * advantages, clipped * advantages)
            policy_loss = row_mean((per_token * mask).sum(-1) / tokens)
            loss = policy_loss
            entropy = entropy_from_logits(logits)  # [B, T-1]
            if args.entropy_normalisation == "mean":
                entropy_term = masked_mean(entropy, mask)
            else:  # reference: per-sample mean over answer tokens, then divided by the padded length
                # (docs/spec.md#impo-loss, docs/spec.md#reference-training-behaviours)
                entropy_term = row_mean((entropy * mask).sum(-1) / tokens / mask.shape[1])
            loss = loss - args.entropy_coef * entropy_term
            if self.ref_model is not None:
                with torch.no_grad():
                    ref_logits = self.ref_model(input_ids=qa_ids, attention_mask=qa_mask, stm=read_stm.detach()).logits
                    ref_logps = selective_log_softmax(ref_logits[:, :-1].float(), qa_ids[:, 1:])
                delta = ref_logps - logps
                if args.ref_kl_estimator == "reference":
                    per_token_kl = torch.exp(ref_logps) * delta
                else:  # k3 (TRL)
                    per_token_kl = torch.exp(delta) - delta - 1
                ref_kl = row_mean((per_token_kl * mask).sum(-1) / tokens)
                loss = loss + args.beta * ref_kl
                terms["ref_kl"].append((ref_kl.detach(), valid.any()))
            # policy stabilisation: KL(pi_t || pi_t-1) at the same answer positions of consecutive steps
            answer_logits, answer_mask = self._answer_aligned(logits, mask, inputs["prompt_len"][:, step])
            if previous_answer_logits is not None and args.interstep_kl_coef > 0:
                width = min(answer_logits.shape[1], previous_answer_logits.shape[1])
                both = answer_mask[:, :width] & previous_answer_mask[:, :width]
                log_p = answer_logits[:, :width].log_softmax(-1)
                log_q = previous_answer_logits[:, :width].log_softmax(-1)
                kl = (log_p.exp() * (log_p - log_q)).sum(-1)
                interstep = (kl * both).sum() / answer_mask.sum().clamp(min=1)
                loss = loss + args.interstep_kl_coef * interstep
                terms["interstep_kl"].append((interstep.detach(), valid.any()))
            previous_answer_logits, previous_answer_mask = answer_logits.detach(), answer_mask
            if args.sft_coef > 0:  # supervised anchor: the reference answer's NLL on the same STM
                width = sft_widths[step]
                sft_ids = inputs["sft_ids"][:, step, :width]
                sft_logits = model(input_ids=sft_ids, attention_mask=inputs["sft_mask"][:, step, :width],
                                   stm=read_stm).logits[:, :-1].float()  # fmt: skip
                after_prompt = torch.arange(1, width, device=sft_ids.device) >= inputs["prompt_len"][:, step, None]
                sft_targets = after_prompt & inputs["sft_mask"][:, step, 1:width].bool() & valid[:, None]
                sft_nll = -selective_log_softmax(sft_logits, sft_ids[:, 1:])
                sft_loss = row_mean((sft_nll * sft_targets).sum(-1) / sft_targets.sum(-1).clamp(min=1))
                loss = loss + args.sft_coef * sft_loss
                terms["sft_loss"].append((sft_loss.detach(), valid.any()))
            # memory regularisation: MSE over the episodes that have this step
            diff = row_mean((new_stm - previous.detach()).pow(2).mean(dim=(0, 2, 3)))
            if args.stm_diff_metric == "rmse":
                diff = diff.clamp(min=1e-12).sqrt()
            loss = loss + math.sqrt(step + 1) * args.stm_diff_coef * diff
            if args.use_stm_cosine_sim:
                cosine = F.cosine_similarity(new_stm.flatten(2), previous.detach().flatten(2), dim=-1)  # [L, B]
                loss = loss - args.cosine_sim_coef * row_mean(cosine.mean(0))
            loss = loss + self.moe_aux(out)
            if self.rxt_critic() is not None:
                width = critic_widths[step]
                values = model(mode="critic", input_ids=inputs["critic_ids"][:, step, :width],
                               attention_mask=inputs["critic_mask"][:, step, :width])  # fmt: skip
                clip = args.critic_value_clip
                target = inputs["rewards"][:, step].clamp(-clip, clip)
                critic_loss = row_mean((values.clamp(-clip, clip) - target).pow(2))
                loss = loss + critic_loss
                terms["critic_loss"].append((critic_loss.detach(), valid.any()))
            terms["policy_loss"].append((policy_loss.detach(), valid.any()))
            terms["entropy"].append((entropy_term.detach(), valid.any()))
            terms["stm_diff"].append((diff.detach(), valid.any()))
            clip_ratio = masked_mean(((ratio - clipped).abs() > 0).float(), mask).detach()
            terms["clip_ratio"].append((clip_ratio, valid.any()))
            losses.append(loss * valid.any())
            stm = torch.where(valid[None, :, None, None], new_stm, previous)
        steps_present = turn_mask.any(0).sum().clamp(min=1)
        total = torch.stack(losses).sum() / steps_present
        metrics = {}
        for name, entries in terms.items():  # mean over the steps that have episodes (NaN if none on this rank)
            values, present = torch.stack([v for v, _ in entries]), torch.stack([p for _, p in entries])
            metrics[name] = values[present].mean() if present.any() else values.new_tensor(float("nan"))
        if "replayed" in inputs:  # rows of replay-buffer episodes in this minibatch
            metrics["replayed_rows"] = inputs["replayed"].float().sum()
        self.record(**metrics)
        return (total, {"stm": stm}) if return_outputs else total

    def rxt_critic(self):
        return self.accelerator.unwrap_model(self.model).critic

    @staticmethod
    def _answer_aligned(logits, mask, prompt_len):
        """Logits of the action tokens aligned from the first answer position: `[B, A, V]`, mask `[B, A]`."""
        width = int(mask.sum(-1).max().item()) if mask.any() else 1
        offsets = torch.arange(max(width, 1), device=logits.device)
        index = (prompt_len[:, None] - 1 + offsets).clamp(max=logits.shape[1] - 1)  # shifted: token p ← logits p-1
        aligned = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
        return aligned, offsets[None] < mask.sum(-1, keepdim=True)

    # -- evaluation: rollouts without updates ------------------------------------------------------------------------
    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", answers=None
    ) -> dict[str, float]:
        """Mean reward (overall and per step) of greedy rollouts on `eval_dataset` with the current curriculum step
        count (deterministic, so before/after comparisons do not depend on sampling). Every evaluation episode starts
        from the initial STM; the training rollouts' carried STM and reset RNG are left as they were. `answers`: score
        fixed answers instead of the greedy ones (`rollout`)."""
        dataloader = self.get_eval_dataloader(eval_dataset)
        sums, counts = defaultdict(float), defaultdict(int)
        carried, rng_state = self._carry_stm, self._rng.get_state()
        self._carry_stm = None
        try:
            for batch in dataloader:
                rollout = self.rollout(batch["episodes"], greedy=True, answers=answers)
                mask = rollout["turn_mask"].bool()
                rewards = self.accelerator.gather_for_metrics(rollout["rewards"].masked_fill(~mask, float("nan")))
                for step in range(rewards.shape[1]):
                    column = rewards[:, step]
                    column = column[~column.isnan()]
                    sums[step] += column.sum().item()
                    counts[step] += column.numel()
        finally:
            self._carry_stm = carried
            self._rng.set_state(rng_state)
        total = sum(counts.values())
        metrics = {f"{metric_key_prefix}_reward": sum(sums.values()) / max(total, 1)}
        metrics.update({f"{metric_key_prefix}_reward_step_{s}": sums[s] / counts[s] for s in sums if counts[s]})
        self.log(metrics)
        return metrics

    # -- saving: the policy as a trust_remote_code folder, the critic beside it -----------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None):
        """The policy folder and `critic/`. `state_dict`: the `MRLModel`'s gathered full state dict, which the Trainer
        passes to every process under FSDP (the module's own parameters are shards there)."""
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        wrapper = self.accelerator.unwrap_model(self.model)
        states = {"policy": None, "critic": None}
        if state_dict is not None:
            states = {part: {k[len(part) + 1 :]: v for k, v in state_dict.items() if k.startswith(part + ".")}
                      for part in states}  # fmt: skip
        wrapper.policy.save_pretrained(output_dir, state_dict=states["policy"])
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        if wrapper.critic is not None:
            critic = wrapper.critic
            critic_state = critic.state_dict() if states["critic"] is None else states["critic"]
            write_critic_folder(critic_state, critic.activation, self.args.critic_init_scale, output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_weights(self, folder: str, model=None) -> None:
        """Policy and critic weights from a folder written by `_save`."""
        from safetensors.torch import load_file

        wrapper = self.accelerator.unwrap_model(self.model if model is None else model)
        wrapper.policy.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
        if wrapper.critic is not None:
            wrapper.critic.load_weights(folder)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self._load_weights(resume_from_checkpoint, model)
        self._load_mrl_state(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """`load_best_model_at_end`: the best checkpoint's policy and critic (the Trainer's loader expects the
        wrapper's state dict in one file, our checkpoints hold the policy folder and `critic/`)."""
        self._load_weights(self.state.best_model_checkpoint)

    # -- resume: the trainer's own state, per process, beside the Trainer's RNG states -------------------------------
    # The optimizer (critic groups included), scheduler and RNG states are the Trainer's. What the Trainer does not know
    # is MRL's: the micro-step counter (generation-batch boundaries), the rest of the current generation batch when the
    # checkpoint falls inside one (it was collected by an older policy and cannot be re-collected), the STM carried
    # across episode batches and its reset RNG, and the replay buffer. With them a resumed run repeats the
    # uninterrupted one exactly (tests/test_mrl.py).
    def _mrl_state_path(self, folder: str) -> str:
        return os.path.join(folder, f"mrl_state_{self.args.process_index}.pt")

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        state = {
            "step": self._step,
            "generation_batch": self._buffer if self._step % generate_every else [],  # empty at a boundary
            "carry_stm": self._carry_stm,
            "reset_rng": self._rng.get_state(),
            "replay_stage": self._replay_stage,
            "replay_buffer": None if self.replay_buffer is None else self.replay_buffer.state_dict(),
        }
        torch.save(state, self._mrl_state_path(output_dir))

    def _load_mrl_state(self, checkpoint: str) -> None:
        path = self._mrl_state_path(checkpoint)
        if not os.path.isfile(path):
            warnings.warn(
                f"{path} not found: the resumed run starts a new rollout and an empty replay buffer.", stacklevel=2
            )
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        device = self.accelerator.device
        self._step = state["step"]
        self._buffer = [{k: v.to(device) for k, v in batch.items()} for batch in state["generation_batch"]]
        self._carry_stm = None if state["carry_stm"] is None else state["carry_stm"].to(device)
        self._rng.set_state(state["reset_rng"])
        self._replay_stage = state["replay_stage"]
        replay = state["replay_buffer"]
        self.replay_buffer = None if replay is None else MrlReplayBuffer.from_state_dict(replay)
