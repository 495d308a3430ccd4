"""Serve an RxT checkpoint with an OpenAI-compatible API (same arguments as `python -m serving`; docs/serving.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.__main__ import main

if __name__ == "__main__":
    main()
