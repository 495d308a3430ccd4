"""Shared pieces of the RxT stage trainers: per-component learning rates, metric logging, STM helpers."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

# (parameter-name prefix, component) — first match wins.
COMPONENT_PREFIXES = (
    ("model.embed_tokens.", "embedding"),
    ("model.encoder.", "encoder"),
    ("model.memory_attention.", "memory_attention"),
    ("model.stm_init.", "memory_attention"),
    ("model.decoder.", "decoder"),
    ("lm_head.", "decoder"),
    ("mlm_head.", "mlm_head"),
)
COMPONENTS = ("embedding", "encoder", "decoder", "memory_attention", "mlm_head")


def component_of(name: str) -> str:
    """Component owning parameter `name` (PEFT/DDP prefixes such as `module.` are ignored)."""
    for marker in ("base_model.model.", "module."):
        if name.startswith(marker):
            name = name[len(marker) :]
    for prefix, component in COMPONENT_PREFIXES:
        if name.startswith(prefix):
            return component
    raise ValueError(f"parameter {name!r} belongs to no RxT component; expected one of the prefixes {COMPONENT_PREFIXES}")


def is_gate(name: str) -> bool:
    """Memory-attention residual gate parameter (main, self, interlayer and mean gates)."""
    return "memory_attention." in name and "gate_layers." in name


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """No weight decay on norms, biases, residual gates (a static per-slot gate is `[S, 1]`) and the STM init."""
    return param.ndim < 2 or "norm" in name or is_gate(name) or name.endswith("stm_init.stm")


@dataclass
class RxTTrainingArguments(TrainingArguments):
    """`TrainingArguments` + per-component learning rates (None → `learning_rate`) and the MoE aux-loss scale."""

    embedding_lr: float | None = field(default=None, metadata={"help": "LR of the shared token embedding."})
    encoder_lr: float | None = field(default=None, metadata={"help": "LR of the memory encoder."})
    decoder_lr: float | None = field(default=None, metadata={"help": "LR of the decoder and LM head."})
    memory_attention_lr: float | None = field(default=None, metadata={"help": "LR of memory attention + STM init."})
    mlm_head_lr: float | None = field(default=None, metadata={"help": "LR of the MLM head."})
    residual_gate_lr: float | None = field(
        default=None,
        metadata={"help": "LR of the memory-attention residual gates (None → memory_attention_lr). Static per-slot "
                  "gates barely move at the shared LR (docs/training.md)."},
    )  # fmt: skip
    moe_aux_loss_scale: float = field(default=0.01, metadata={"help": "Weight of the MoE router loss."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all columns for the RxT collators."})

    def component_lr(self, component: str) -> float:
        if component == "residual_gate":
            if self.residual_gate_lr is not None:
                return self.residual_gate_lr
            component = "memory_attention"
        value = getattr(self, f"{component}_lr")
        return self.learning_rate if value is None else value


class RxTTrainer(Trainer):
    """Base of the stage trainers: optimizer param groups per component (no weight decay on norms, biases, gates and
    the STM init), metrics appended in `compute_loss` and averaged into the Trainer's logs."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean: the Trainer divides by GA steps

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    # -- optimizer ------------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        groups: dict[tuple[str, bool], list[nn.Parameter]] = defaultdict(list)
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            component = "residual_gate" if is_gate(name) else component_of(name)
            groups[(component, is_no_decay(name, param))].append(param)
        param_groups = [
            {
                "params": params,
                "lr": self.args.component_lr(component),
                "weight_decay": 0.0 if no_decay else self.args.weight_decay,
                "name": f"{component}{'.no_decay' if no_decay else ''}",
            }
            for (component, no_decay), params in sorted(groups.items())
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    # -- metrics --------------------------------------------------------------------------------------------------
    def record(self, **values: torch.Tensor | float) -> None:
        """Append metrics of this step (averaged over processes) for the next log."""
        mode = "train" if self.model.training else "eval"
        for name, value in values.items():
            if value is None:
                continue
            value = torch.as_tensor(value, dtype=torch.float32, device=self.args.device).detach()
            gathered = self.accelerator.gather_for_metrics(value.reshape(1))
            if not gathered.isnan().all():  # NaN = no data on a rank this step
                self._metrics[mode][name].append(gathered.nanmean().item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs or not any(k.startswith("eval_") for k in logs) else "eval"
        averaged = {name: sum(vals) / len(vals) for name, vals in self._metrics[mode].items() if vals}
        if mode == "eval":
            averaged = {f"eval_{name}": value for name, value in averaged.items()}
        logs = {**logs, **averaged}
        self._metrics[mode].clear()
        super().log(logs, start_time)

    # -- helpers --------------------------------------------------------------------------------------------------
    def rxt_model(self, model=None):
        """The unwrapped RxT model (for attributes only; every forward goes through the wrapped model)."""
        return self.accelerator.unwrap_model(self.model if model is None else model)

    def moe_aux(self, output) -> torch.Tensor | float:
        aux = getattr(output, "aux_loss", None)
        return 0.0 if aux is None else self.args.moe_aux_loss_scale * aux


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """Accuracy of argmax predictions on positions whose label is not -100 (labels shifted for causal LM)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    if not mask.any():
        return torch.tensor(0.0, device=logits.device)
    return (logits.argmax(-1)[mask] == labels[mask]).float().mean()


def turn_widths(masks: torch.Tensor) -> list[int]:
    """`masks [N, B, T]` → per turn, the last real position + 1 over the batch (at least 1). Cutting turn `k` to
    `[:, :width_k]` drops only trailing pads, so a right-padded turn computes the same values on fewer tokens and a
    left-padded one is not cut."""
    positions = torch.arange(1, masks.shape[-1] + 1, device=masks.device)
    return (masks * positions).amax(dim=(1, 2)).clamp(min=1).tolist()


def stm_update_norm(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """`‖STM_t − STM_{t−1}‖ / ‖STM_{t−1}‖` (training.md §0.1)."""
    old = old.expand_as(new)
    return (new - old).detach().norm() / old.detach().norm().clamp(min=1e-12)
