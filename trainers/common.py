"""Shared pieces of the RxT stage trainers: per-component learning rates, metric logging, STM helpers, and exact
resume (the collator's state in every checkpoint; `resume_from_checkpoint=True` takes the latest complete checkpoint)."""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
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

logger = logging.getLogger(__name__)


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
        stateful = all(callable(getattr(self.data_collator, name, None)) for name in ("state_dict", "load_state_dict"))
        self._collation = ResumableCollation(self.data_collator) if stateful else None
        self._rng_restored = False

    # -- exact resume ---------------------------------------------------------------------------------------------
    # The Trainer restores weights, optimizer, scheduler and the global RNGs, and skips the batches already trained.
    # What it does not know is the collator's state (the SMAT "probe" window RNG, the episode length the schedule set,
    # the RNG of the MLM masks), nor that batches are built ahead of the step that trains them (accelerate builds one
    # batch ahead, the Trainer fetches a step's batches before `on_step_begin`). `ResumableCollation` keeps, for every
    # batch built but not yet trained, the collator state it was built from; a checkpoint stores those states and the
    # collator's current one, and a resumed run rebuilds the pending batches from theirs before going on from the
    # current one, so it trains on the batches of the uninterrupted run.
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, where `resume_from_checkpoint=True` (or the string "true", as a CLI flag gives it) is the
        latest *complete* checkpoint of `output_dir` (`resolve_checkpoint`), and the collator resumes exactly."""
        checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        self._rng_restored = False
        if self._collation is not None:
            self._collation.replay.clear()
            self._collation.on_replayed = None
            if checkpoint is not None:
                self._restore_collation(checkpoint)
        return super().train(resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                             **kwargs)  # fmt: skip

    def _collation_path(self, folder: str) -> str:
        name = "collation_state.pth" if self.args.world_size <= 1 else f"collation_state_{self.args.process_index}.pth"
        return os.path.join(folder, name)

    def _restore_collation(self, checkpoint: str) -> None:
        path = self._collation_path(checkpoint)
        if not os.path.isfile(path):
            logger.warning("%s not found: the resumed run builds its batches from the collator's initial state, so its "
                           "episode windows, episode lengths or MLM masks can differ from the uninterrupted run's.", path)  # fmt: skip
            return
        if self.args.dataloader_num_workers > 0:
            logger.warning("dataloader_num_workers=%d: the workers build the batches with their own copies of the "
                           "collator, whose state no checkpoint holds; %s is not restored.", self.args.dataloader_num_workers,
                           path)  # fmt: skip
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        collator = self._collation.collator
        if not state["pending"] or self.args.ignore_data_skip:
            collator.load_state_dict(state["current"])
            return

        def replayed():  # the pending batches are rebuilt: now the RNGs and the collator as they were at the save
            self._load_rng_state(checkpoint)
            collator.load_state_dict(state["current"])

        self._collation.replay.extend(state["pending"])
        self._collation.on_replayed = replayed

    def get_train_dataloader(self):
        if self._collation is None:
            return super().get_train_dataloader()
        self._collation.pending.clear()  # batches built for an earlier dataloader are never trained
        collator, self.data_collator = self.data_collator, self._collation  # training batches go through the wrapper
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collator

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._collation is not None:
            self._collation.consumed()
        return super().training_step(model, inputs, num_items_in_batch)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self._collation is not None:
            torch.save(self._collation.state_dict(), self._collation_path(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if self._rng_restored:  # already restored after rebuilding the pending batches (see `_restore_collation`)
            return
        super()._load_rng_state(checkpoint)
        self._rng_restored = checkpoint is not None

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

    def agreed_turns(self, model, turns: int, device: torch.device) -> int:
        """The turns this step runs: `turns` (those of this process's batch), or the most of any process when the model
        is sharded (FSDP): there every forward and backward of a sharded module is a collective, so every process
        runs the same turns, a process whose batch has fewer filling them with placeholder turns."""
        if not (self.is_fsdp_enabled or isinstance(model, FSDPModule)) or not dist.is_initialized():
            return turns
        count = torch.tensor(turns, device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return int(count)

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
    """`‖STM_t − STM_{t−1}‖ / ‖STM_{t−1}‖` (docs/spec.md#shared-mechanics)."""
    old = old.expand_as(new)
    return (new - old).detach().norm() / old.detach().norm().clamp(min=1e-12)


class ResumableCollation:
    """The training batches' collator, wrapped so a checkpoint can hold what a resumed run needs to build the same
    batches: the state each built-but-untrained batch was built from (`pending`) and the collator's current state.

    `collator` has `state_dict()` / `load_state_dict(state)`. `RxTTrainer` calls `consumed()` once per trained batch;
    on resume it fills `replay` with the checkpoint's pending states (each rebuilds one batch) and `on_replayed`
    (called once they are rebuilt: restores the RNGs and the collator's state at the save)."""

    def __init__(self, collator):
        self.collator = collator
        self.pending: deque[dict] = deque()
        self.replay: deque[dict] = deque()
        self.on_replayed = None

    def __call__(self, rows):
        if self.replay:
            self.collator.load_state_dict(self.replay.popleft())
        self.pending.append(self.collator.state_dict())
        batch = self.collator(rows)
        if self.on_replayed is not None and not self.replay:
            self.on_replayed()
            self.on_replayed = None
        return batch

    def consumed(self) -> None:
        if self.pending:  # empty with dataloader workers, which collate in their own processes
            self.pending.popleft()

    def state_dict(self) -> dict:
        return {"pending": list(self.pending), "current": self.collator.state_dict()}


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints: complete or cut short


CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                "adapter_model.safetensors", "adapter_model.bin")  # fmt: skip


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or length > size - 8:
            return f"{path.name} is cut short ({size} bytes, no complete header)"
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{path.name} has a broken header"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if size != 8 + length + end:
        return f"{path.name} is cut short ({size} bytes, its header needs {8 + length + end})"
    return None


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete Trainer checkpoint, or None. Complete: `trainer_state.json` (written last),
    model weights and the optimizer state are present (or the FSDP / DeepSpeed folders that hold them), every
    `.safetensors` file is as long as its header says, every torch file (`.pt`, `.pth`, `.bin`) is a whole zip
    archive, every `.json` file parses and every shard an index names exists. A kill while saving leaves one of these
    wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    names = {path.name for path in folder.iterdir()}
    sharded = any(name.startswith(("pytorch_model_fsdp", "global_step")) for name in names)
    if "trainer_state.json" not in names:
        return "trainer_state.json is missing"
    if not sharded and not names & set(WEIGHT_FILES):
        return f"no model weights (expected one of {', '.join(WEIGHT_FILES[:3])}, ...)"
    if not sharded and "optimizer.pt" not in names and not any(name.startswith("optimizer_") for name in names):
        return "optimizer.pt is missing"
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(folder)
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
            if problem:
                return f"{relative.parent / problem}" if relative.parent != Path(".") else problem
        elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
            return f"{relative} is not a complete torch file ({path.stat().st_size} bytes)"
        elif path.suffix == ".json":
            try:
                content = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                return f"{relative} is not valid JSON (cut short)"
            if path.name.endswith(".index.json") and isinstance(content, dict):
                missing = sorted(set(content.get("weight_map", {}).values()) - {p.name for p in path.parent.iterdir()})
                if missing:
                    return f"{relative} names missing shards {missing}"
    return None


def _latest_complete(folder: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the complete `checkpoint-N` of `folder` with the largest N or None, the newer incomplete ones with why)."""
    found = [(int(match.group(1)), path) for path in folder.iterdir()
             if path.is_dir() and (match := CHECKPOINT_PATTERN.match(path.name))]  # fmt: skip
    skipped = []
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str:
    """The `checkpoint-N` folder of `output_dir` with the largest N that is complete (`checkpoint_problem`); newer
    incomplete ones are named in a warning. No complete checkpoint raises `ValueError` naming what was found."""
    folder = Path(output_dir)
    if not folder.is_dir():
        raise ValueError(f"resume_from_checkpoint=True: output_dir {str(output_dir)!r} does not exist; expected the "
                         "output_dir of the interrupted run.")  # fmt: skip
    latest, skipped = _latest_complete(folder)
    if latest is None:
        detail = "; ".join(f"{p.name}: {why}" for p, why in skipped) or "no checkpoint-N folder"
        raise ValueError(f"resume_from_checkpoint=True: no complete checkpoint in {output_dir} ({detail}); expected "
                         "checkpoint-N folders saved with --save_strategy steps or epoch.")  # fmt: skip
    if skipped:
        logger.warning("resume_from_checkpoint=True: %s; resuming from %s, the latest complete checkpoint.",
                       "; ".join(f"{p} is incomplete ({why}: cut short while saving?)" for p, why in skipped), latest)  # fmt: skip
    return str(latest)


def resolve_checkpoint(value: str | bool | os.PathLike | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder to resume from: None / False / "false" → None; True / "true" (any case) → the latest
    complete checkpoint of `output_dir`; a path → itself when complete, else a `ValueError` naming what is wrong and
    the latest complete checkpoint beside it."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false", ""):
        value = value.strip().lower() == "true"
    if value is None or value is False:
        return None
    if value is True:
        return latest_complete_checkpoint(output_dir)
    problem = checkpoint_problem(value)
    if problem is None:
        return str(value)
    parent = Path(value).parent
    latest = _latest_complete(parent)[0] if parent.is_dir() else None
    hint = f"; the latest complete checkpoint beside it is {latest}" if latest is not None else ""
    raise ValueError(f"resume_from_checkpoint={str(value)!r}: {problem}; expected a complete checkpoint folder "
                     f"(trainer_state.json, model weights, optimizer.pt){hint}.")  # fmt: skip
