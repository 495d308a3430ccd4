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
# Every requirement of setup.py (install_requires + the dev extra) installed at a version it allows, and the package.
import ast, importlib.metadata as md, sys
from packaging.requirements import Requirement
call = next(node for node in ast.walk(ast.parse(open("setup.py").read()))
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
spec = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg in ("install_requires", "extras_require")}
md.version("reactive-transformer")
for requirement in map(Requirement, spec["install_requires"] + spec["extras_require"]["dev"]):
    if not requirement.specifier.contains(md.version(requirement.name), prereleases=True):
        sys.exit(1)
PYCHECK
  "$PY" -m pip install --quiet -e ".[dev]"
fi
