"""The repository is ruff-clean under pyproject.toml's rules (line length 119 as transformers; E, F, I, W, UP, B)."""

import subprocess
import sys

from conftest import REPO_ROOT


def test_ruff_check_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO_ROOT)],
                            capture_output=True, text=True, cwd=REPO_ROOT)  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
