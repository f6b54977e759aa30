#!/usr/bin/env bash
# Train the default pair on one GPU in under 10 minutes: a 25.7 M-parameter Llama verifier on
# the CPython 3.11.7 standard library, then the diffusion drafter and the benchmarks' causal
# assistant distilled from its greedy continuations (one set of continuations for both), and
# last a drafter for the 5.5 M verifier shipped before, for comparison.
#
#   scripts/train_default_pair_gpu.sh RUNS_DIR [LIB_DIR]
#
# LIB_DIR is the Lib folder of the interpreter the corpus comes from (default: this Python's);
# the shipped pair used CPython 3.11.7's, whose train-file hash is 4bac01cde94341fa. Every
# phase has a time budget (seconds of optimisation; the step count shrinks to fit, the
# schedule decays fully), so the run ends on time on a slower card. Sizes and budgets come
# from the variables below; SMOKE=1 shrinks everything to check the script on a CPU in a
# minute. After each phase the result is packed into $PACKED (default RUNS_DIR/packed/, 16 MB
# parts, small enough for most transfer limits), so a run stopped early keeps what it finished.
set -euo pipefail
RUNS="${1:?usage: train_default_pair_gpu.sh RUNS_DIR [LIB_DIR]}"
LIB=("${2:+--stdlib}" "${2:-}")
[[ -n "${2:-}" ]] || LIB=()
PYTHON="${PYTHON:-python3}"
PACKED="${PACKED:-$RUNS/packed}"
TOKENIZER="$(dirname "$0")/../src/dg_stream/default_model/verifier"

if [[ "${SMOKE:-0}" == 1 ]]; then
    V=(--hidden-size 64 --layers 2 --heads 4 --kv-heads 2 --intermediate-size 128
       --steps 30 --batch-size 2 --seq-len 64 --time-budget 20)
    D=(--hidden-size 32 --layers 1 --heads 2 --steps 30 --sequences 64 --generation-batch 32
       --batch-size 16 --time-budget 10)
    A=(--hidden-size 32 --layers 1 --heads 2 --steps 30 --time-budget 10)
    H=("${D[@]}")
else
    V=(--hidden-size 512 --layers 8 --heads 8 --kv-heads 4 --intermediate-size 1408
       --steps 2000 --batch-size 16 --seq-len 1024 --lr 1.5e-3 --time-budget 130)
    D=(--hidden-size 192 --layers 3 --heads 4 --steps 15000 --sequences 131072
       --generation-batch 2048 --batch-size 1024 --lr 2e-3 --time-budget 120)
    A=(--hidden-size 192 --layers 3 --heads 4 --steps 8000 --batch-size 1024 --lr 2e-3
       --time-budget 50)
    H=(--hidden-size 192 --layers 3 --heads 4 --steps 15000 --sequences 65536
       --generation-batch 2048 --batch-size 1024 --lr 2e-3 --time-budget 75)
fi

train() { "$PYTHON" -m dg_stream.cli train "$@"; }
pack() {  # pack RUNS/$1 (weights, configs, tokenizer, metrics) into 16 MB parts
    mkdir -p "$PACKED"
    tar -C "$RUNS" --exclude checkpoint.pt --exclude distillation.pt -cf - "$1" |
        split -b 16000000 - "$PACKED/$1.tar.part-"
    echo "packed $1 after ${SECONDS}s"
}

train verifier "${LIB[@]}" --tokenizer "$TOKENIZER" --out "$RUNS/verifier" "${V[@]}"
pack verifier
train drafter "${LIB[@]}" --verifier "$RUNS/verifier" --out "$RUNS/drafter" \
    --eval-prompts 0 --keep-data "${D[@]}"
pack drafter
mkdir -p "$RUNS/assistant"
mv "$RUNS/drafter/distillation.pt" "$RUNS/assistant/"
train drafter "${LIB[@]}" --verifier "$RUNS/verifier" --out "$RUNS/assistant" \
    --architecture causal --eval-prompts 0 "${A[@]}"
pack assistant
# Last and optional: a drafter of the same size for the previous 5.5 M verifier, to compare.
train drafter "${LIB[@]}" --verifier "$TOKENIZER" --out "$RUNS/drafter5m" --eval-prompts 0 "${H[@]}"
pack drafter5m
echo "done in ${SECONDS}s"
