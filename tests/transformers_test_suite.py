"""transformers' own common test mixins, fetched from the installed version's source distribution and cached.

The mixins (`tests/test_modeling_common.py`, `tests/test_configuration_common.py`, ...) ship only in transformers'
sdist on the package index. `load()` downloads `transformers==<installed version>` there once
(`pip download --no-binary :all: --no-deps`), unpacks it under `$RXT_TRANSFORMERS_TESTS_CACHE`
(default `~/.cache/rxt-tests`) and imports the mixins as the `tests` package of that copy. Nothing is copied into
this repository.

The sdist holds the top-level common test files but not the sub-packages they import
(`tests/generation/`, `tests/exporters/`, `tests/utils/`). Those imports get stand-ins in the cached copy:
- `GenerationTesterMixin`: a marker class (its generate behaviours are covered by tests/test_generation.py);
- `ExportTesterMixin`: an empty mixin (no `torch.export` tests run from it);
- `config_common_kwargs`: `{}` (only read by `ConfigTester.check_config_arguments_init`, which returns early for
  configs with sub-configs, as RxT's are).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import transformers

VERSION = transformers.__version__
CACHE = Path(os.environ.get("RXT_TRANSFORMERS_TESTS_CACHE", Path.home() / ".cache" / "rxt-tests"))
ROOT = CACHE / f"transformers-{VERSION}"

STAND_INS = {
    "tests/__init__.py": "",
    "tests/generation/__init__.py": "",
    "tests/generation/test_utils.py": (
        '"""Stand-in (absent from the sdist): generate behaviours are covered by the project\'s own tests."""\n\n\n'
        "class GenerationTesterMixin:\n    pass\n"
    ),
    "tests/exporters/__init__.py": "",
    "tests/exporters/test_export.py": (
        '"""Stand-in (absent from the sdist)."""\n\n\nclass ExportTesterMixin:\n    pass\n'
    ),
    "tests/utils/__init__.py": "",
    "tests/utils/test_configuration_utils.py": (
        '"""Stand-in (absent from the sdist): read only for configs without sub-configs."""\n\n'
        "config_common_kwargs = {}\n"
    ),
}


class Unavailable(RuntimeError):
    """The sdist is not cached and the package index cannot be reached."""


def fetch() -> Path:
    """The unpacked sdist of the installed transformers (downloaded and unpacked on first use)."""
    if not (ROOT / "tests" / "test_modeling_common.py").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        archive = CACHE / f"transformers-{VERSION}.tar.gz"
        if not archive.is_file():
            command = [sys.executable, "-m", "pip", "download", f"transformers=={VERSION}", "--no-binary", ":all:",
                       "--no-deps", "--no-build-isolation", "-d", str(CACHE)]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
            if result.returncode != 0 or not archive.is_file():
                raise Unavailable(
                    f"could not download transformers=={VERSION} (sdist) into {CACHE}: "
                    + (result.stderr or result.stdout)[-500:]
                )
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"transformers-{VERSION}/tests/")]
            tar.extractall(CACHE, members=members, filter="data")
    for relative, text in STAND_INS.items():
        path = ROOT / relative
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return ROOT


def load(*names: str):
    """Import `tests.<name>` for each name from the cached sdist; returns the modules."""
    root = str(fetch())
    if root not in sys.path:
        sys.path.insert(0, root)
    loaded = sys.modules.get("tests")
    if loaded is not None and not str(getattr(loaded, "__file__", "") or "").startswith(root):
        raise RuntimeError(f"another package named 'tests' is already imported ({loaded}); cannot load {root}/tests")
    return [importlib.import_module(f"tests.{name}") for name in names]
