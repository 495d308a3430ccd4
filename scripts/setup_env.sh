#!/usr/bin/env bash
# Install what is missing for this project, CPU-only: torch 2.13.0 first (a CPU wheel), then the package with its
# dev extras. Safe to run repeatedly; it skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
if ! "$PY" - <<'PYCHECK' 2>/dev/null; then
import importlib.metadata as md, sys
need = {"transformers": "5.23", "trl": "1.16", "peft": "0.21", "accelerate": "1.15", "datasets": "", "tokenizers": "",
        "safetensors": "", "nltk": "", "pytest": "", "matplotlib": "", "pyyaml": "", "tensorboard": "",
        "reactive-transformer": ""}
for name, prefix in need.items():
    if not md.version(name).startswith(prefix):
        sys.exit(1)
PYCHECK
  "$PY" -m pip install --quiet -e ".[dev]"
fi
