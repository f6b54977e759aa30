#!/usr/bin/env bash
# The GPU run in one command.
#
#   benchmarks/gpu.sh                  # the prepared run: <= 8 minutes, <= 8 files in $OUT
#                                      # (else benchmarks/results/gpu-run): GPU tests, the
#                                      # embedded pair, engine efficiency at real sizes
#                                      # (python -m benchmarks.gpu_run; see its docstring)
#   benchmarks/gpu.sh --smoke          # the same phases on the CPU at toy sizes, < 60 s (CI)
#   benchmarks/gpu.sh compare [ARGS]   # every method on the embedded pair, bf16 on CUDA
#                                      # (python -m benchmarks.run), under 10 minutes
#   benchmarks/gpu.sh compare --device cpu ...   # the comparison on a CPU
#
# Runs from a checkout without installing it (src/ goes on PYTHONPATH); the packages it needs
# are torch, transformers, safetensors, tokenizers, anyio>=4.16, httpx, msgspec, pytest, scipy
# and matplotlib (pip install -e '.[dev]' has them all). Extra arguments go to the Python entry
# point (the last value of an option wins).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "compare" ]; then
    shift
    "$PYTHON" - <<'PY' || echo "warning: no CUDA device visible; pass --device cpu to run on the CPU" >&2
import sys, torch
sys.exit(0 if torch.cuda.is_available() else 1)
PY
    # The timed phases stop starting new repeats after --max-seconds, so model loading +
    # warm-up + timing + memory pass + profile fit the budget.
    exec timeout --signal=INT 590 "$PYTHON" -m benchmarks.run \
        --device cuda \
        --name gpu \
        --num-prompts 32 \
        --max-new-tokens 128 \
        --repeats 3 \
        --block-sizes 2,4,8,12,16 \
        --steps 1,2 \
        --max-seconds 360 \
        --out benchmarks/results \
        "$@"
fi

# Each phase runs under its own limit inside the script; this is the backstop.
exec timeout --signal=INT 500 "$PYTHON" -m benchmarks.gpu_run "$@"
