#!/usr/bin/env bash
# The whole GPU comparison in one command, in under 10 minutes on one GPU:
# every method (dg_stream plain/hybrid grid/adaptive/ngram, transformers generate/assisted/
# prompt lookup) on the embedded default pair, bf16 on CUDA (float32 on a CPU), greedy and
# sampling, then the profile.
#
#   benchmarks/gpu.sh                 # cuda, bf16 -> benchmarks/results/gpu-cuda.{json,png}
#   benchmarks/gpu.sh --device cpu    # the same run on the CPU (how CI keeps it working)
#
# Extra arguments are passed to `python -m benchmarks.run` and override the defaults below
# (argparse keeps the last value given). The timed phases stop starting new repeats after
# --max-seconds, so model loading + warm-up + timing + memory pass + profile fit the budget.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

"$PYTHON" - <<'PY' || echo "warning: no CUDA device visible; pass --device cpu to run on the CPU" >&2
import sys, torch
sys.exit(0 if torch.cuda.is_available() else 1)
PY

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
