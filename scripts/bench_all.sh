#!/usr/bin/env bash
# Run every benchmark; each writes <name>.json + <name>.png. Results and how to read them: docs/benchmarks.md.
#   bash scripts/bench_all.sh            # full runs into runs/bench/ (~25 min on one core)
#   bash scripts/bench_all.sh --quick    # smoke test (about a minute) into runs/bench/quick/
# Other arguments (e.g. --threads 2) are passed to every script; BENCH_DIR overrides the output folder.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out_dir=runs/bench
for arg in "$@"; do
    if [ "$arg" = "--quick" ]; then out_dir=runs/bench/quick; fi
done
out_dir=${BENCH_DIR:-$out_dir}
for name in conversation sqa decode memory_update batch tensorbleu serve train_step; do
    echo "=== bench_${name}.py $* -> ${out_dir}/${name}.json"
    start=$(date +%s)
    "${PYTHON:-python}" "scripts/bench_${name}.py" "$@" --output "${out_dir}/${name}.json"
    echo "=== bench_${name}.py done in $(( $(date +%s) - start )) s"
done
