#!/usr/bin/env bash
# One prepared GPU check (bench/gpu_check.py): install, versions, the Llama-2-7B-shape step,
# the CUDA tests, the rest, inside one time budget; JSON and markdown into OUT_DIR.
#
#   bash bench/gpu_check.sh OUT_DIR               # a CUDA machine, at most 8 minutes
#   bash bench/gpu_check.sh --dry-run OUT_DIR     # CPU, tiny shapes: checks the script itself
#   bash bench/gpu_check.sh --budget 600 --only llama7b-bf16,tests OUT_DIR
#
# PYTHON picks the interpreter (default: python, else python3); the flags are those of
# `python bench/gpu_check.py --help`.
set -u
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-$(command -v python || command -v python3)}"
if [ -z "$PY" ]; then
    echo "gpu_check: no python on PATH (set PYTHON)" >&2
    exit 2
fi
exec "$PY" bench/gpu_check.py "$@"
