"""Legacy per-expert MoE storage (`ff.experts.{e}.*`, `ff.shared_experts.{s}.*`) → the stacked storage of the
project (`w1 [E, D, F']`, `w2 [E, F, D]`, biases, shared experts), docs/conversion.md#legacy-moe-storage."""

from __future__ import annotations

import re

import torch

from .builder import Builder
from .folders import View, key_indices

LEGACY_EXPERT_KEY = re.compile(r"^(.*\.ff\.)(experts|shared_experts)\.(\d+)\.(.+)$")


def convert_legacy_ff(view: View, prefix: str, target_prefix: str, b: Builder) -> None:
    """Legacy per-expert MoE → stacked (docs/conversion.md#legacy-moe-storage) for the FF at `prefix` (e.g.
    'layers.0.ff.'): the routed experts `experts.{e}.*` become `w1`, `w2` (`b1`, `b2`); one legacy shared expert
    `shared_experts.0.*` becomes `shared_expert.*`, several become `shared_w1`, `shared_w2` (`shared_b1`,
    `shared_b2`)."""
    keys = [k for k in view.stored if k.startswith(prefix)]
    experts = key_indices(keys, prefix + "experts.")
    if experts:
        _stack_experts(view, b, prefix, "experts", experts, target_prefix, ("w1", "w2", "b1", "b2"))
    shared = key_indices(keys, prefix + "shared_experts.")
    if len(shared) == 1:
        p = prefix + "shared_experts.0."
        fc1 = "fc1.linear." if view.has(p + "fc1.linear.weight") else "fc1."
        for src, dst in (
            (fc1 + "weight", "fc1.weight"),
            (fc1 + "bias", "fc1.bias"),
            ("fc2.weight", "fc2.weight"),
            ("fc2.bias", "fc2.bias"),
        ):
            if view.has(p + src):
                b.map(view, p + src, f"{target_prefix}shared_expert.{dst}")
    elif shared:
        names = ("shared_w1", "shared_w2", "shared_b1", "shared_b2")
        _stack_experts(view, b, prefix, "shared_experts", shared, target_prefix, names)


def _stack_experts(view: View, b: Builder, prefix: str, family: str, indices: list[int], target_prefix, names) -> None:
    """Stack the experts `{prefix}{family}.{i}.*`: the fc1 / fc2 weights transposed into `names[0]` `[n, D, F']` /
    `names[1]` `[n, F, D]` (under `target_prefix`), their biases into `names[2]` / `names[3]` (every expert's or
    none). Problems go to `b.errors` (listed with the strict check's)."""
    where = f"{view.folder.role}:{view.prefix}{prefix}"
    if indices != list(range(len(indices))):
        b.errors.append(f"{where}{family}: expert indices {indices} are not 0..{len(indices) - 1}.")
        return
    fc1 = "fc1.linear." if view.has(f"{prefix}{family}.0.fc1.linear.weight") else "fc1."
    sources = (fc1 + "weight", "fc2.weight", fc1 + "bias", "fc2.bias")
    stacks: list[list[torch.Tensor]] = [[], [], [], []]
    for i in indices:
        p = f"{prefix}{family}.{i}."
        absent = [view.prefix + p + source for source in sources[:2] if not view.has(p + source)]
        if absent:
            b.errors.append(f"legacy MoE {family} incomplete: missing " + ", ".join(absent))
            return
        for k, (source, bucket, name) in enumerate(zip(sources, stacks, names, strict=True)):
            if view.has(p + source):
                tensor = b.tensor(view, p + source)
                bucket.append(tensor.t() if k < 2 else tensor)  # weights [out, in] -> [in, out]
                view.consume(p + source, f"{target_prefix}{name}[{i}]" + (" (transposed)" if k < 2 else ""))
    for k, (source, bucket, name) in enumerate(zip(sources, stacks, names, strict=True)):
        if not bucket:
            continue
        if len(bucket) != len(indices):
            b.errors.append(
                f"legacy MoE at {view.prefix}{prefix}: only {len(bucket)} of {len(indices)} {family} have the "
                f"{source} that becomes {name}."
            )
            continue
        try:
            stacked = torch.stack(bucket).contiguous()
        except RuntimeError as error:
            b.errors.append(f"legacy MoE {family} at {view.prefix}{prefix} have inconsistent shapes ({error}).")
            return
        b.put(target_prefix + name, stacked, f"{where}{family}.*.{source}" + (" (transposed)" if k < 2 else ""))
