"""Legacy per-expert MoE storage (`ff.experts.{e}.*`, `ff.shared_experts.{s}.*`) → the stacked storage of the
project (`w1 [E, D, F']`, `w2 [E, F, D]`, biases, shared experts), checkpoints.md §6.7."""

from __future__ import annotations

import re

import torch

from .builder import Builder
from .folders import View, key_indices

LEGACY_EXPERT_KEY = re.compile(r"^(.*\.ff\.)(experts|shared_experts)\.(\d+)\.(.+)$")


def convert_legacy_ff(view: View, prefix: str, target_prefix: str, b: Builder) -> None:
    """Legacy per-expert MoE → stacked (checkpoints.md §6.7) for the FF at `prefix` (e.g. 'layers.0.ff.')."""
    keys = [k for k in view.stored if k.startswith(prefix)]
    where = f"{view.folder.role}:{view.prefix}{prefix}"
    experts = key_indices(keys, prefix + "experts.")
    if experts:
        if experts != list(range(len(experts))):
            b.errors.append(f"{where}experts: expert indices {experts} are not 0..E-1.")
            return
        gated = view.has(prefix + "experts.0.fc1.linear.weight")
        fc1 = "fc1.linear." if gated else "fc1."
        w1, w2, b1, b2 = [], [], [], []
        for e in experts:
            p = f"{prefix}experts.{e}."
            need = [p + fc1 + "weight", p + "fc2.weight"]
            absent = [n for n in need if not view.has(n)]
            if absent:
                b.errors.append("legacy MoE expert incomplete: missing " + ", ".join(view.prefix + n for n in absent))
                return
            w1.append(b.tensor(view, p + fc1 + "weight").t())
            w2.append(b.tensor(view, p + "fc2.weight").t())
            view.consume(p + fc1 + "weight", f"{target_prefix}w1[{e}] (transposed)")
            view.consume(p + "fc2.weight", f"{target_prefix}w2[{e}] (transposed)")
            for name, bucket in ((fc1 + "bias", b1), ("fc2.bias", b2)):
                if view.has(p + name):
                    bucket.append(b.tensor(view, p + name))
                    view.consume(p + name, f"{target_prefix}{'b1' if bucket is b1 else 'b2'}[{e}]")
        try:
            b.put(target_prefix + "w1", torch.stack(w1).contiguous(), f"{where}experts.*.{fc1}weight (transposed)")
            b.put(target_prefix + "w2", torch.stack(w2).contiguous(), f"{where}experts.*.fc2.weight (transposed)")
        except (RuntimeError, KeyError) as error:
            b.errors.append(f"legacy MoE experts at {view.prefix}{prefix} have inconsistent shapes ({error}).")
            return
        for name, bucket in (("b1", b1), ("b2", b2)):
            if bucket and len(bucket) != len(experts):
                b.errors.append(
                    f"legacy MoE at {view.prefix}{prefix}: only {len(bucket)} of {len(experts)} experts "
                    f"have the bias that becomes {name}."
                )
            elif bucket:
                src_name = f"{fc1}bias" if name == "b1" else "fc2.bias"
                b.put(target_prefix + name, torch.stack(bucket).contiguous(), f"{where}experts.*.{src_name}")
    shared = key_indices(keys, prefix + "shared_experts.")
    if shared:
        gated = view.has(prefix + "shared_experts.0.fc1.linear.weight")
        fc1 = "fc1.linear." if gated else "fc1."
        if len(shared) == 1:
            p = prefix + "shared_experts.0."
            for src, dst in (
                (fc1 + "weight", "fc1.weight"),
                (fc1 + "bias", "fc1.bias"),
                ("fc2.weight", "fc2.weight"),
                ("fc2.bias", "fc2.bias"),
            ):
                if view.has(p + src):
                    b.map(view, p + src, f"{target_prefix}shared_expert.{dst}")
        else:
            sw1, sw2, sb1, sb2 = [], [], [], []
            for s in shared:
                p = f"{prefix}shared_experts.{s}."
                if not (view.has(p + fc1 + "weight") and view.has(p + "fc2.weight")):
                    b.errors.append(f"legacy shared expert {view.prefix}{p} incomplete.")
                    return
                sw1.append(b.tensor(view, p + fc1 + "weight").t())
                sw2.append(b.tensor(view, p + "fc2.weight").t())
                view.consume(p + fc1 + "weight", f"{target_prefix}shared_w1[{s}] (transposed)")
                view.consume(p + "fc2.weight", f"{target_prefix}shared_w2[{s}] (transposed)")
                for name, bucket, dst in ((fc1 + "bias", sb1, "shared_b1"), ("fc2.bias", sb2, "shared_b2")):
                    if view.has(p + name):
                        bucket.append(b.tensor(view, p + name))
                        view.consume(p + name, f"{target_prefix}{dst}[{s}]")
            try:
                b.put(target_prefix + "shared_w1", torch.stack(sw1).contiguous(), f"{where}shared_experts.*")
                b.put(target_prefix + "shared_w2", torch.stack(sw2).contiguous(), f"{where}shared_experts.*")
                if sb1:
                    b.put(target_prefix + "shared_b1", torch.stack(sb1).contiguous(), f"{where}shared_experts.*")  # noqa: E501
                if sb2:
                    b.put(target_prefix + "shared_b2", torch.stack(sb2).contiguous(), f"{where}shared_experts.*")  # noqa: E501
            except RuntimeError as error:
                b.errors.append(f"legacy shared experts at {view.prefix}{prefix} have inconsistent shapes ({error}).")
