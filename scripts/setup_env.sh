#!/usr/bin/env bash
# Install what is missing for this project, CPU-only: torch 2.13.0 first (a CPU wheel), then the package with its
# dev and serve extras, then the PostgreSQL server binaries the serving tests start (Debian 'postgresql' package).
# Safe to run repeatedly; it skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
if ! "$PY" - <<'PYCHECK' 2>/dev/null; then
# Every requirement of setup.py (install_requires + the dev and serve extras) installed at a version it allows, and
# the package.
import ast, importlib.metadata as md, sys
from packaging.requirements import Requirement
call = next(node for node in ast.walk(ast.parse(open("setup.py").read()))
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
spec = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg in ("install_requires", "extras_require")}
md.version("reactive-transformer")
extras = spec["extras_require"]
for requirement in map(Requirement, spec["install_requires"] + extras["dev"] + extras["serve"]):
    if not requirement.specifier.contains(md.version(requirement.name), prereleases=True):
        sys.exit(1)
PYCHECK
  "$PY" -m pip install --quiet -e ".[dev,serve]"
fi
# PostgreSQL server binaries (initdb, pg_ctl) for tests/test_serving_restart.py, which starts its own cluster.
has_postgres() {
  command -v initdb >/dev/null 2>&1 && return 0
  command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ] && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
if ! has_postgres; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
  else
    echo "setup_env.sh: no PostgreSQL server binaries and no apt-get: install PostgreSQL (initdb, pg_ctl) to run the" \
         "PostgreSQL serving tests." >&2
  fi
fi
