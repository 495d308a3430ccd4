#!/usr/bin/env bash
# The main job: install what is missing (CPU-only), then train a small RxT end to end and evaluate its memory.
# Extra arguments go to scripts/quickstart.py (e.g. --preset long).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
exec python scripts/quickstart.py "$@"
