"""Reading the reference folders: one safetensors file and config.json per folder, and views of a component's keys.

Every stored tensor is recorded in the folder's ledger as consumed (mapped to a project parameter) or ignored (with
the reason), so the strict check can list what nothing claimed (docs/conversion.md#reading-the-reference-folders,
docs/conversion.md#strictness-and-the-report).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open


class ConversionError(ValueError):
    """A reference checkpoint cannot be converted (the message says why and what to do)."""


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every stored tensor and the header `__metadata__` (alias map and other entries) of a safetensors file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types (header, truncation, I/O)
        size = path.stat().st_size if path.is_file() else None
        raise ConversionError(
            f"'{path}' ({size} bytes) is not a readable safetensors file: {error}. Expected a complete safetensors "
            "file (a truncated download, a pickle `.bin` renamed, or another format?)."
        ) from None
    return tensors, metadata


class Folder:
    """One input folder: its config and stored tensors, with a ledger of what happened to every stored tensor."""

    def __init__(self, role: str, path):
        self.role = role
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(f"{role} folder '{self.path}' does not exist or is not a folder.")
        missing = [name for name in ("config.json", "model.safetensors") if not (self.path / name).is_file()]
        if missing:
            raise ConversionError(
                f"{role} folder '{self.path}' has no {' and no '.join(missing)}; every input folder must contain "
                "config.json and model.safetensors."
            )
        raw = (self.path / "config.json").read_bytes()
        self.config_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            self.config = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConversionError(f"{role} folder '{self.path}': config.json is not valid JSON ({error}).") from None
        if not isinstance(self.config, dict):
            raise ConversionError(f"{role} folder '{self.path}': config.json must hold a JSON object.")
        self.tensors, self.metadata = read_safetensors(self.path / "model.safetensors")
        # An entry is an alias only if its value names a stored tensor
        # (docs/conversion.md#reading-the-reference-folders).
        self.aliases = {
            name: kept
            for name, kept in self.metadata.items()
            if isinstance(kept, str) and kept in self.tensors and name != kept and name not in self.tensors
        }
        self.status: dict[str, tuple[str, str]] = {}  # stored name -> ("consumed" | "ignored", detail)

    def describe(self) -> dict:
        return {
            "path": str(self.path.resolve()),
            "config_sha256": self.config_sha256,
            "stored_tensors": len(self.tensors),
            "aliases": len(self.aliases),
        }


class View:
    """The keys of one component inside a folder (prefix stripped), with alias resolution."""

    def __init__(self, folder: Folder, prefix: str, name: str):
        self.folder, self.prefix, self.name = folder, prefix, name
        cut = len(prefix)
        self.stored = {k[cut:]: k for k in folder.tensors if k.startswith(prefix)}
        self.alias = {k[cut:]: v for k, v in folder.aliases.items() if k.startswith(prefix)}

    def keys(self) -> list[str]:
        return sorted(self.stored)

    def has(self, key: str) -> bool:
        return key in self.stored

    def has_any(self, key: str) -> bool:
        return key in self.stored or key in self.alias

    def full(self, key: str) -> str:
        return self.stored.get(key) or self.alias[key]

    def get(self, key: str) -> torch.Tensor:
        return self.folder.tensors[self.full(key)]

    def shape(self, key: str):
        return tuple(self.get(key).shape) if self.has_any(key) else None

    def src(self, key: str) -> str:
        return f"{self.folder.role}:{self.full(key)}"

    def consume(self, key: str, target: str) -> None:
        self.folder.status[self.full(key)] = ("consumed", target)

    def ignore(self, key: str, reason: str) -> None:
        self.folder.status[self.full(key)] = ("ignored", reason)


def key_indices(keys, prefix: str) -> list[int]:
    """Sorted indices `i` of keys `prefix{i}.…`."""
    found = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def count_indexed(keys, prefix: str) -> int:
    found = key_indices(keys, prefix)
    return found[-1] + 1 if found else 0


def count_layers(view: View, prefix: str, core: str, component: str) -> int:
    """The number of layers `prefix{i}.…` of a component: indices must run 0..L-1 and every layer must hold its `core`
    key (`prefix{i}.{core}`, e.g. the attention's q_proj). Otherwise the keys of the stray or incomplete layers are
    named (rather than counted as layers); a component without any is refused."""
    indices = key_indices(view.stored, prefix)
    if not indices:
        raise ConversionError(
            f"{component}: no '{view.prefix}{prefix}{{i}}.*' keys; this is not an RxT {component} checkpoint."
        )
    complete = [i for i in indices if view.has(f"{prefix}{i}.{core}")]
    count = next((n for n, i in enumerate(complete) if i != n), len(complete))  # the run 0..L-1 of complete layers
    stray = [i for i in indices if i >= count]
    if stray:
        listed = [
            f"{view.folder.role}:{view.full(key)} {fmt_shape(view.shape(key))}"
            for key in view.keys()
            if any(key.startswith(f"{prefix}{i}.") for i in stray)
        ]
        shown = listed[:8] + ([f"… ({len(listed)} keys)"] if len(listed) > 8 else [])
        where = view.prefix + prefix
        complete_text = f"layers {where}0..{count - 1} are complete" if count else f"no layer {where}{{i}} is complete"
        raise ConversionError(
            f"{component}: {complete_text}, but there are keys of layer(s) {stray} "
            f"(each layer needs '{prefix}{{i}}.{core}', and indices must run 0..L-1); stray or incomplete layer "
            "keys:\n    " + "\n    ".join(shown)
        )
    return count


def is_rope(key: str) -> bool:
    return key.endswith("rope.inv_freq") or key.endswith("rope.cache")


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"
