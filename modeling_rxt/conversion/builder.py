"""The project state dict under construction: every entry with its provenance, every dtype conversion reported."""

from __future__ import annotations

import torch

from .folders import ConversionError, View, fmt_shape
from .report import Report


class Builder:
    """Collects the project state dict and the provenance of every entry."""

    def __init__(self, report: Report):
        self.sd: dict[str, torch.Tensor] = {}
        self.src: dict[str, str] = {}
        self.report = report
        self.errors: list[str] = []
        self._checked: set[str] = set()

    def tensor(self, view: View, key: str) -> torch.Tensor:
        """The stored tensor as float32; a non-finite value is an error (listed with the others by the strict
        check)."""
        src = view.src(key)
        tensor = self._fp32(view.get(key), src)
        if src not in self._checked:
            self._checked.add(src)
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                self.errors.append(
                    f"{src} {fmt_shape(tensor.shape)}: {bad} of {tensor.numel()} values are NaN or infinite; "
                    "expected finite weights (a diverged or corrupted checkpoint)."
                )
        return tensor

    def _fp32(self, t: torch.Tensor, src: str) -> torch.Tensor:
        if t.dtype == torch.float32:
            return t
        if t.dtype in (torch.bfloat16, torch.float16):
            self.report.data["dtype_conversions"].append(
                {"key": src, "from": str(t.dtype).replace("torch.", ""), "to": "float32"}
            )
            return t.to(torch.float32)
        if t.dtype == torch.float64:
            out = t.to(torch.float32)
            if not torch.equal(out.to(torch.float64), t):
                raise ConversionError(f"{src} is float64 and does not fit float32 exactly; refusing to truncate.")
            self.report.data["dtype_conversions"].append({"key": src, "from": "float64", "to": "float32 (exact)"})
            return out
        raise ConversionError(f"{src} has dtype {t.dtype}; expected a floating-point tensor.")

    def put(self, target: str, value: torch.Tensor, src: str) -> None:
        if target in self.sd:
            if self.sd[target].shape == value.shape and torch.equal(self.sd[target], value):
                self.src[target] += " == " + src
                return
            self.errors.append(
                f"{target}: filled from both {self.src[target]} and {src} with different values (legacy and stacked "
                "MoE storage disagree, or two inputs map to one parameter)."
            )
            return
        self.sd[target] = value
        self.src[target] = src

    def map(self, view: View, key: str, target: str) -> None:
        self.put(target, self.tensor(view, key), view.src(key))
        view.consume(key, target)
