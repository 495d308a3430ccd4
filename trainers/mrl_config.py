"""Configuration of stage 5, Memory Reinforcement Learning with IMPO (docs/spec.md#mrlconfig): `MRLConfig` and its
curriculum stages."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field, fields
from typing import NamedTuple

from transformers import TrainingArguments
from trl import GRPOConfig

from .mrl_reward import MRLRewardArguments

STRATEGIES = ("multi_step", "single_step", "long_range")
FREEZE_STAGES = ("warmup", "fetch", "update", "all")


class ReplayBufferSettings(NamedTuple):
    """Resolved replay-buffer settings of a curriculum stage (`MrlReplayBuffer(size, update_size, max_age)`)."""

    size: int
    update_size: int
    max_age: int


@dataclass
class MRLStage:
    """One curriculum stage: `steps` follow-ups per episode for `epochs` epochs (None fields: the config's value)."""

    steps: int
    epochs: int = 1
    strategy: str | None = None
    unfreeze_epoch: int | list | None = None
    random_resets_ratio: float | None = None
    random_resets_from: int | None = None
    teacher_forcing: bool | None = None
    replay_buffer: bool | int | dict | ReplayBufferSettings | None = None  # resolved by MRLConfig (see there)

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"curriculum stage steps={self.steps!r}: expected a positive integer.")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"curriculum stage epochs={self.epochs!r}: expected a positive integer.")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"curriculum stage strategy={self.strategy!r}: expected one of {STRATEGIES}.")
        if self.random_resets_ratio is not None and not 0.0 <= self.random_resets_ratio <= 1.0:
            raise ValueError(f"curriculum stage random_resets_ratio={self.random_resets_ratio}: expected in [0, 1].")
        replay_types = (bool, int, dict, ReplayBufferSettings)
        if self.replay_buffer is not None and not isinstance(self.replay_buffer, replay_types):
            raise ValueError(
                f"curriculum stage replay_buffer={self.replay_buffer!r}: expected true/false, a size, or an object "
                "{size, update_size, max_age}."
            )


def parse_unfreeze_epoch(value) -> list[tuple[int, float | None]] | int | None:
    """`0`/int → that int; `[fetch, update, all]` (elements `e` or `[e, lr]`) → list of (epoch, lr or None)."""
    if value is None or isinstance(value, int):
        if isinstance(value, int) and value < 0:
            raise ValueError(f"unfreeze_epoch={value}: expected >= 0.")
        return value
    if isinstance(value, str):
        value = json.loads(value)
        return parse_unfreeze_epoch(value)
    if isinstance(value, (list, tuple)) and len(value) == 3:
        parsed = []
        for item in value:
            epoch, lr = (item, None) if isinstance(item, int) else tuple(item)
            if not isinstance(epoch, int) or epoch < 0 or (lr is not None and lr <= 0):
                raise ValueError(f"unfreeze_epoch element {item!r}: expected an epoch >= 0 or [epoch, lr > 0].")
            parsed.append((epoch, lr))
        if [e for e, _ in parsed] != sorted(e for e, _ in parsed):
            raise ValueError(f"unfreeze_epoch={value!r}: the fetch, update and all epochs must not decrease.")
        return parsed
    raise ValueError(f"unfreeze_epoch={value!r}: expected an int or a list of three epochs [fetch, update, all].")


def freeze_stage(unfreeze, epoch: int) -> str:
    """The freeze stage (`warmup`/`fetch`/`update`/`all`) at `epoch` of a curriculum stage
    (docs/spec.md#mrl-curriculum-freezing-resets-replay)."""
    if unfreeze is None:
        return "fetch"
    if isinstance(unfreeze, int):
        return "all" if epoch >= unfreeze else "fetch"
    stage = "warmup"
    for name, (start, _) in zip(("fetch", "update", "all"), unfreeze):
        if epoch >= start:
            stage = name
    return stage


@dataclass
class MRLConfig(GRPOConfig, MRLRewardArguments):
    """`GRPOConfig` fields with the reference defaults (docs/spec.md#mrlconfig) + the MRL fields.

    Reused GRPO fields: `epsilon` (clip), `beta` (reference-KL coefficient), `num_iterations` (update epochs over one
    rollout), `entropy_coef`, `num_generations` (rollouts per episode; 1 with the critic, >= 2 for `"group"`),
    `steps_per_generation` (minibatches per rollout), `temperature`, `top_k`, `top_p`, `max_completion_length`.

    Replay buffer: `replay_buffer_size` (0 = off), `replay_buffer_update_size` (None = `max(1, size // 2)`),
    `replay_buffer_max_age` (3); a curriculum stage's `replay_buffer` overrides them (`resolve_replay_buffer`).
    After construction `self.replay_buffer` and each stage's `replay_buffer` hold the resolved `ReplayBufferSettings`
    or None (off).

    Only the fields MRL adds or whose default it changes are listed; for the others see
    [`~transformers.TrainingArguments`] and TRL's [`GRPOConfig`], and for the reward fields
    [`trainers.mrl_reward.MRLRewardArguments`].

    Parameters:
        > GRPO fields, reference defaults

        learning_rate (`float`, *optional*, defaults to `0.0003`):
            Policy learning rate.
        weight_decay (`float`, *optional*, defaults to `0.01`):
            AdamW weight decay.
        beta (`float`, *optional*, defaults to `0.05`):
            Reference-KL coefficient (0: no reference model).
        epsilon (`float`, *optional*, defaults to `0.2`):
            PPO clip epsilon.
        num_iterations (`int`, *optional*, defaults to `10`):
            Update epochs over each rollout.
        entropy_coef (`float`, *optional*, defaults to `0.01`):
            Entropy bonus coefficient.
        num_generations (`int`, *optional*, defaults to `1`):
            Rollouts per episode (>= 2 for 'group').
        max_completion_length (`int`, *optional*, defaults to `64`):
            Most generated tokens per answer.
        gradient_checkpointing (`bool | None`, *optional*, defaults to `None`):
            Deprecated alias (transformers).
        activation_checkpointing (`bool | None`, *optional*, defaults to `False`):
            Activation checkpointing.
        bf16 (`bool | None`, *optional*, defaults to `False`):
            bf16 mixed precision.
        logging_steps (`float`, *optional*, defaults to `10`):
            Log every N steps.
        ddp_find_unused_parameters (`bool | None`, *optional*, defaults to `True`):
            Frozen parts are unused.
        ddp_static_graph (`bool | None`, *optional*, defaults to `True`):
            DDP: several forwards (replay, decoder, critic) feed one backward per step.

        > Curriculum

        curriculum (`str`, *optional*, defaults to `"1,2,4,8,16"`):
            Steps per episode per stage: '1,2,4' (one epoch each) or a JSON list of stage objects {steps, epochs,
            strategy, unfreeze_epoch, random_resets_ratio, random_resets_from, teacher_forcing, replay_buffer}.
        strategy (`str`, *optional*, defaults to `"multi_step"`):
            multi_step | single_step | long_range.
        delayed_final_reward (`bool`, *optional*, defaults to `False`):
            Add a long-range reward at the last step.
        unfreeze_epoch (`str`, *optional*, defaults to `"0"`):
            0: all train; e: fetch until epoch e; [fetch, update, all] from warmup.
        freeze_embeddings (`bool`, *optional*, defaults to `False`):
            Never train the shared embedding.
        random_resets (`bool`, *optional*, defaults to `False`):
            Carry the STM across episodes unless reset.
        random_resets_from (`int`, *optional*, defaults to `0`):
            Epoch from which random resets apply.
        random_resets_ratio (`float`, *optional*, defaults to `1.0`):
            Probability of resetting the STM.
        teacher_forcing (`bool`, *optional*, defaults to `False`):
            Write the reference answer into memory.
        use_memory_warmup (`bool`, *optional*, defaults to `False`):
            Warm the STM up before the first write.
        hard_warmup (`bool`, *optional*, defaults to `False`):
            Warm-up STM = (ED + STM) / 2 (needs T == S).
        max_length (`int`, *optional*, defaults to `256`):
            Most tokens of one interaction.

        > Loss

        interstep_kl_coef (`float`, *optional*, defaults to `0.01`):
            KL(pi_t || pi_t-1) coefficient.
        stm_diff_coef (`float`, *optional*, defaults to `0.0001`):
            Memory regularisation coefficient.
        sft_coef (`float`, *optional*, defaults to `0.0`):
            Weight of the supervised anchor: the teacher-forced negative log-likelihood of each step's reference
            answer, read from the same STM as the policy's answer, added to the IMPO loss (the pre-training mix of
            PPO-ptx, on the episodes' own references). It keeps what SMAT taught, e.g. recall of the last turn, while
            the policy loss trains retention. One extra decoder forward and backward per step; 0 disables it.
        stm_diff_metric (`str`, *optional*, defaults to `"mse"`):
            mse | rmse.
        use_stm_cosine_sim (`bool`, *optional*, defaults to `False`):
            Add -c_cos * cos(STM_t, STM_t-1).
        cosine_sim_coef (`float`, *optional*, defaults to `0.01`):
            STM cosine coefficient.
        entropy_normalisation (`str`, *optional*, defaults to `"mean"`):
            mean (masked token mean) | reference.
        ref_kl_estimator (`str`, *optional*, defaults to `"reference"`):
            reference | k3.
        stm_source (`str`, *optional*, defaults to `"replay"`):
            replay (recompute the STM) | snapshot.
        bptt_steps (`int`, *optional*, defaults to `1`):
            [project] replay: detach the STM every k steps (before that step's write), so a step's loss reaches the
            writes since the last detach; 1 = its own write only (reference), 0 = every write.
        log_probs_source (`str`, *optional*, defaults to `"update"`):
            update (policy at T=1) | collect (sampler).
        moe_aux_loss_scale (`float`, *optional*, defaults to `0.01`):
            MoE router loss weight.
        per_component_grad_clip (`bool`, *optional*, defaults to `True`):
            Clip each component to max_grad_norm separately (reference).

        > Advantages and critic

        advantage_estimator (`str`, *optional*, defaults to `"critic"`):
            critic (R - V) | group.
        advantage_mode (`str`, *optional*, defaults to `"all"`):
            all | batch | step | none.
        use_gae (`bool`, *optional*, defaults to `False`):
            GAE over the steps (critic only).
        gae_gamma (`float`, *optional*, defaults to `0.99`):
            GAE discount.
        gae_lambda (`float`, *optional*, defaults to `0.95`):
            GAE lambda.
        critic_lr (`float`, *optional*, defaults to `0.0001`):
            Critic head learning rate.
        critic_encoder_lr (`float | None`, *optional*, defaults to `None`):
            Critic encoder LR (None: critic_lr).
        critic_weight_decay (`float`, *optional*, defaults to `0.01`):
            Critic weight decay.
        critic_max_len (`int`, *optional*, defaults to `512`):
            Most critic input tokens (the last ones kept).
        critic_value_clip (`float`, *optional*, defaults to `20.0`):
            Values and targets clamped to +-clip.
        critic_init_scale (`float`, *optional*, defaults to `10.0`):
            Initial value scale.
        critic_activation (`str`, *optional*, defaults to `"sigmoid"`):
            sigmoid | tanh | linear.
        critic_name_or_path (`str | None`, *optional*, defaults to `None`):
            Start the critic from a folder holding critic/model.safetensors (a converted reference critic or an earlier
            MRL output) or the model.safetensors file's folder itself (None: fresh).

        > Per-component learning rates

        separate_memory_lr (`bool`, *optional*, defaults to `False`):
            Use memory_lr for memory components.
        memory_lr (`float`, *optional*, defaults to `0.0005`):
            LR of encoder + memory attention (separate).
        memory_attention_lr (`float | None`, *optional*, defaults to `None`):
            None: memory_lr.
        encoder_lr (`float | None`, *optional*, defaults to `None`):
            None: memory_lr.
        embedding_lr (`float | None`, *optional*, defaults to `None`):
            None: learning_rate.

        > Replay buffer (docs/spec.md#mrl-curriculum-freezing-resets-replay; `MrlReplayBuffer`)

        replay_buffer_size (`int`, *optional*, defaults to `0`):
            Best episodes kept and replayed with each new rollout (0: no replay buffer).
        replay_buffer_update_size (`int | None`, *optional*, defaults to `None`):
            Entries replaced per rollout, <= replay_buffer_size (None: max(1, size//2)).
        replay_buffer_max_age (`int`, *optional*, defaults to `3`):
            Entries this many rollouts old are evicted first (>= 1).
    """

    # GRPO fields, reference defaults
    learning_rate: float = field(default=3e-4, metadata={"help": "Policy learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    beta: float = field(default=0.05, metadata={"help": "Reference-KL coefficient (0: no reference model)."})
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip epsilon."})
    num_iterations: int = field(default=10, metadata={"help": "Update epochs over each rollout."})
    entropy_coef: float = field(default=0.01, metadata={"help": "Entropy bonus coefficient."})
    num_generations: int = field(default=1, metadata={"help": "Rollouts per episode (>= 2 for 'group')."})
    max_completion_length: int = field(default=64, metadata={"help": "Most generated tokens per answer."})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Deprecated alias (transformers)."})
    activation_checkpointing: bool | None = field(default=False, metadata={"help": "Activation checkpointing."})
    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    ddp_find_unused_parameters: bool | None = field(default=True, metadata={"help": "Frozen parts are unused."})
    ddp_static_graph: bool | None = field(
        default=True, metadata={"help": "DDP: several forwards (replay, decoder, critic) feed one backward per step."}
    )
    # curriculum
    curriculum: str = field(
        default="1,2,4,8,16",
        metadata={"help": "Steps per episode per stage: '1,2,4' (one epoch each) or a JSON list of stage objects "
                  "{steps, epochs, strategy, unfreeze_epoch, random_resets_ratio, random_resets_from, "
                  "teacher_forcing, replay_buffer}."},
    )  # fmt: skip
    strategy: str = field(default="multi_step", metadata={"help": "multi_step | single_step | long_range."})
    delayed_final_reward: bool = field(default=False, metadata={"help": "Add a long-range reward at the last step."})
    unfreeze_epoch: str = field(
        default="0", metadata={"help": "0: all train; e: fetch until epoch e; [fetch, update, all] from warmup."}
    )
    freeze_embeddings: bool = field(default=False, metadata={"help": "Never train the shared embedding."})
    random_resets: bool = field(default=False, metadata={"help": "Carry the STM across episodes unless reset."})
    random_resets_from: int = field(default=0, metadata={"help": "Epoch from which random resets apply."})
    random_resets_ratio: float = field(default=1.0, metadata={"help": "Probability of resetting the STM."})
    teacher_forcing: bool = field(default=False, metadata={"help": "Write the reference answer into memory."})
    use_memory_warmup: bool = field(default=False, metadata={"help": "Warm the STM up before the first write."})
    hard_warmup: bool = field(default=False, metadata={"help": "Warm-up STM = (ED + STM) / 2 (needs T == S)."})
    max_length: int = field(default=256, metadata={"help": "Most tokens of one interaction."})
    # loss
    interstep_kl_coef: float = field(default=0.01, metadata={"help": "KL(pi_t || pi_t-1) coefficient."})
    stm_diff_coef: float = field(default=1e-4, metadata={"help": "Memory regularisation coefficient."})
    sft_coef: float = field(default=0.0, metadata={"help": "Supervised anchor: weight of the reference answers' "
                                                           "teacher-forced NLL on the policy's STM (0: off)."})
    stm_diff_metric: str = field(default="mse", metadata={"help": "mse | rmse."})
    use_stm_cosine_sim: bool = field(default=False, metadata={"help": "Add -c_cos * cos(STM_t, STM_t-1)."})
    cosine_sim_coef: float = field(default=0.01, metadata={"help": "STM cosine coefficient."})
    entropy_normalisation: str = field(default="mean", metadata={"help": "mean (masked token mean) | reference."})
    ref_kl_estimator: str = field(default="reference", metadata={"help": "reference | k3."})
    stm_source: str = field(default="replay", metadata={"help": "replay (recompute the STM) | snapshot."})
    bptt_steps: int = field(
        default=1,
        metadata={
            "help": "[project] replay: detach the STM every k steps (before that step's write), so a step's loss "
            "reaches the writes since the last detach; 1 = its own write only (reference), 0 = every write."
        },
    )
    log_probs_source: str = field(default="update", metadata={"help": "update (policy at T=1) | collect (sampler)."})
    moe_aux_loss_scale: float = field(default=0.01, metadata={"help": "MoE router loss weight."})
    per_component_grad_clip: bool = field(
        default=True, metadata={"help": "Clip each component to max_grad_norm separately (reference)."}
    )
    # advantages and critic
    advantage_estimator: str = field(default="critic", metadata={"help": "critic (R - V) | group."})
    advantage_mode: str = field(default="all", metadata={"help": "all | batch | step | none."})
    use_gae: bool = field(default=False, metadata={"help": "GAE over the steps (critic only)."})
    gae_gamma: float = field(default=0.99, metadata={"help": "GAE discount."})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda."})
    critic_lr: float = field(default=1e-4, metadata={"help": "Critic head learning rate."})
    critic_encoder_lr: float | None = field(default=None, metadata={"help": "Critic encoder LR (None: critic_lr)."})
    critic_weight_decay: float = field(default=0.01, metadata={"help": "Critic weight decay."})
    critic_max_len: int = field(default=512, metadata={"help": "Most critic input tokens (the last ones kept)."})
    critic_value_clip: float = field(default=20.0, metadata={"help": "Values and targets clamped to +-clip."})
    critic_init_scale: float = field(default=10.0, metadata={"help": "Initial value scale."})
    critic_activation: str = field(default="sigmoid", metadata={"help": "sigmoid | tanh | linear."})
    critic_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Start the critic from a folder holding critic/model.safetensors (a converted reference "
                  "critic or an earlier MRL output) or the model.safetensors file's folder itself (None: fresh)."},
    )  # fmt: skip
    # per-component learning rates
    separate_memory_lr: bool = field(default=False, metadata={"help": "Use memory_lr for memory components."})
    memory_lr: float = field(default=5e-4, metadata={"help": "LR of encoder + memory attention (separate)."})
    memory_attention_lr: float | None = field(default=None, metadata={"help": "None: memory_lr."})
    encoder_lr: float | None = field(default=None, metadata={"help": "None: memory_lr."})
    embedding_lr: float | None = field(default=None, metadata={"help": "None: learning_rate."})
    # replay buffer (docs/spec.md#mrl-curriculum-freezing-resets-replay; `MrlReplayBuffer`)
    replay_buffer_size: int = field(
        default=0, metadata={"help": "Best episodes kept and replayed with each new rollout (0: no replay buffer)."}
    )
    replay_buffer_update_size: int | None = field(
        default=None, metadata={"help": "Entries replaced per rollout, <= replay_buffer_size (None: max(1, size//2))."}
    )
    replay_buffer_max_age: int = field(
        default=3, metadata={"help": "Entries this many rollouts old are evicted first (>= 1)."}
    )

    def __post_init__(self):
        # GRPOConfig.__post_init__ requires >= 2 generations and sets vLLM/GRPO-only state: MRL sizes its own
        # generation batch (docs/spec.md#mrlconfig), so only the TrainingArguments part runs.
        TrainingArguments.__post_init__(self)
        self.validate_reward_arguments()
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        if self.steps_per_generation < 1:
            raise ValueError(f"steps_per_generation={self.steps_per_generation}: expected >= 1.")
        if isinstance(self.bptt_steps, bool) or not isinstance(self.bptt_steps, int) or self.bptt_steps < 0:
            raise ValueError(f"bptt_steps={self.bptt_steps!r}: expected 0 (whole episode) or a positive window.")
        if self.bptt_steps != 1 and self.stm_source != "replay":
            raise ValueError(f"bptt_steps={self.bptt_steps} needs stm_source='replay' (snapshots carry no gradient).")
        self.generation_batch_size = self.per_device_train_batch_size * self.world_size * self.steps_per_generation
        checks = {
            "strategy": (self.strategy, STRATEGIES),
            "stm_diff_metric": (self.stm_diff_metric, ("mse", "rmse")),
            "entropy_normalisation": (self.entropy_normalisation, ("mean", "reference")),
            "ref_kl_estimator": (self.ref_kl_estimator, ("reference", "k3")),
            "stm_source": (self.stm_source, ("replay", "snapshot")),
            "log_probs_source": (self.log_probs_source, ("update", "collect")),
            "advantage_estimator": (self.advantage_estimator, ("critic", "group")),
            "advantage_mode": (self.advantage_mode, ("all", "batch", "step", "none")),
            "critic_activation": (self.critic_activation, ("sigmoid", "tanh", "linear")),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: expected one of {allowed}.")
        if self.num_generations < 1:
            raise ValueError(f"num_generations={self.num_generations}: expected >= 1.")
        if self.advantage_estimator == "group" and self.num_generations < 2:
            raise ValueError("advantage_estimator='group' needs num_generations >= 2 (answers per episode).")
        if self.use_gae and self.advantage_estimator != "critic":
            raise ValueError("use_gae=True needs advantage_estimator='critic'.")
        if self.critic_name_or_path is not None and self.advantage_estimator != "critic":
            raise ValueError(
                f"critic_name_or_path={self.critic_name_or_path!r} needs advantage_estimator='critic' "
                f"(got {self.advantage_estimator!r})."
            )
        for name in ("epsilon", "beta", "entropy_coef", "interstep_kl_coef", "stm_diff_coef", "sft_coef",
                     "cosine_sim_coef", "critic_value_clip", "critic_init_scale"):  # fmt: skip
            if not getattr(self, name) >= 0 or math.isinf(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)}: expected a finite value >= 0.")
        if self.max_completion_length < 1 or self.max_length < 4 or self.critic_max_len < 2:
            raise ValueError(
                f"max_completion_length={self.max_completion_length} (>= 1), max_length={self.max_length} (>= 4), "
                f"critic_max_len={self.critic_max_len} (>= 2): expected the bounds in brackets."
            )
        if not 0.0 <= self.random_resets_ratio <= 1.0:
            raise ValueError(f"random_resets_ratio={self.random_resets_ratio}: expected in [0, 1].")
        if self.strategy == "single_step":
            warnings.warn(
                "strategy='single_step' is identical to 'multi_step' (docs/spec.md#mrl-strategies); using multi_step.",
                stacklevel=2,
            )
            self.strategy = "multi_step"
        self.unfreeze = parse_unfreeze_epoch(int(self.unfreeze_epoch) if self.unfreeze_epoch.isdigit()
                                             else self.unfreeze_epoch)  # fmt: skip
        self.curriculum_stages = self._parse_curriculum(self.curriculum)
        self.replay_buffer = self.resolve_replay_buffer(None, "replay_buffer_")
        for index, stage in enumerate(self.curriculum_stages):
            prefix = f"curriculum stage {index} replay_buffer."
            stage.replay_buffer = self.resolve_replay_buffer(stage.replay_buffer, prefix)
        if self.max_steps <= 0:
            self.num_train_epochs = sum(stage.epochs for stage in self.curriculum_stages)

    @staticmethod
    def _parse_curriculum(text: str) -> list[MRLStage]:
        text = text.strip()
        if text.startswith("["):
            items = json.loads(text)
            if not items or not all(isinstance(item, dict) for item in items):
                raise ValueError(f"curriculum={text!r}: expected a non-empty JSON list of stage objects.")
            known = {f.name for f in fields(MRLStage)}
            for item in items:
                unknown = set(item) - known
                if unknown:
                    raise ValueError(
                        f"curriculum stage {item}: unknown keys {sorted(unknown)}; expected {sorted(known)}."
                    )
            stages = [MRLStage(**item) for item in items]
        else:
            try:
                stages = [MRLStage(steps=int(part)) for part in text.split(",")]
            except ValueError as error:
                raise ValueError(
                    f"curriculum={text!r}: expected '1,2,4' or a JSON list of stages ({error})."
                ) from None
        for stage in stages:
            if stage.unfreeze_epoch is not None:
                stage.unfreeze_epoch = parse_unfreeze_epoch(stage.unfreeze_epoch)
        return stages

    def resolve_replay_buffer(self, value, prefix: str) -> ReplayBufferSettings | None:
        """A stage's `replay_buffer` → settings, or None (off). `None`: the config's `replay_buffer_*` fields;
        `false`/`0`: off; `true`: the config's fields (needs `replay_buffer_size > 0`); an int: that size (update size
        and max age from the config); an object `{size, update_size, max_age}` (missing keys from the config).
        Errors name the field (`prefix` + key) and the expected value."""
        spec = {"size": self.replay_buffer_size, "update_size": self.replay_buffer_update_size,
                "max_age": self.replay_buffer_max_age}  # fmt: skip
        if isinstance(value, ReplayBufferSettings) or value is False or (type(value) is int and value == 0):
            return value or None  # already resolved (a config re-validated), or off
        if value is True and self.replay_buffer_size <= 0:
            raise ValueError(f"{prefix[:-1]}=true needs replay_buffer_size > 0 (or give {prefix[:-1]}={{'size': n}}).")
        if type(value) is int:
            spec["size"] = value
        elif isinstance(value, dict):
            unknown = set(value) - set(spec)
            if unknown:
                raise ValueError(f"{prefix[:-1]}: unknown keys {sorted(unknown)}; expected {sorted(spec)}.")
            spec.update(value)
        size, update_size, max_age = spec["size"], spec["update_size"], spec["max_age"]
        if type(size) is not int or size < 0:
            raise ValueError(f"{prefix}size={size!r}: expected an integer >= 0 (0: no replay buffer).")
        if update_size is not None and (type(update_size) is not int or update_size < 1):
            raise ValueError(f"{prefix}update_size={update_size!r}: expected an integer >= 1 (or None).")
        if type(max_age) is not int or max_age < 1:
            raise ValueError(f"{prefix}max_age={max_age!r}: expected an integer >= 1.")
        if size == 0:
            return None
        update_size = max(1, size // 2) if update_size is None else update_size
        if update_size > size:
            raise ValueError(f"{prefix}update_size={update_size}: expected <= {prefix}size ({size}).")
        return ReplayBufferSettings(size, update_size, max_age)

    def component_lr(self, component: str) -> float:
        if component in ("critic", "critic_encoder"):
            return (
                self.critic_encoder_lr if component == "critic_encoder" and self.critic_encoder_lr else self.critic_lr
            )
        if component == "embedding" and self.embedding_lr is not None:
            return self.embedding_lr
        if self.separate_memory_lr and component in ("encoder", "memory_attention"):
            value = getattr(self, f"{component}_lr")
            return self.memory_lr if value is None else value
        return self.learning_rate

    def component_weight_decay(self, component: str) -> float:
        return self.critic_weight_decay if component.startswith("critic") else self.weight_decay

    def stage_at(self, epoch: int) -> tuple[MRLStage, int]:
        """The curriculum stage at (0-based) `epoch` and the epoch within it (the last stage continues)."""
        start = 0
        for stage in self.curriculum_stages:
            if epoch < start + stage.epochs:
                return stage, epoch - start
            start += stage.epochs
        last = self.curriculum_stages[-1]
        return last, epoch - (start - last.epochs)
