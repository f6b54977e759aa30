#!/usr/bin/env bash
# Train the default pair on one GPU in under 10 minutes: a 25.7 M-parameter Llama verifier on
# the CPython 3.11.7 standard library, then the diffusion drafter and the benchmarks' causal
# assistant distilled from its greedy continuations (one set of continuations for both).
#
#   scripts/train_default_pair_gpu.sh RUNS_DIR [LIB_DIR]
#
# LIB_DIR is the Lib folder of the interpreter the corpus comes from (default: this Python's);
# the shipped pair used CPython 3.11.7's, whose train-file hash is 4bac01cde94341fa. Every
# phase has a time budget (seconds of optimisation; the step count shrinks to fit, the
# schedule decays fully), so the run ends on time on a slower card. Sizes and budgets come
# from the variables below; SMOKE=1 shrinks everything to check the script on a CPU in a
# minute. FEATURES=2,5,8 trains a drafter that also reads the verifier's hidden states at
# those layers (FEATURE_WINDOW positions of them, default 16). The dflash phase trains a
# DFlash-format drafter (verifier hidden states at its default layers, block 16) on its own
# continuations, into RUNS_DIR/dflash; DFLASH_SECONDS is its budget. After each
# phase the result is packed into $PACKED (default RUNS_DIR/packed/, 16 MB
# parts, small enough for most transfer limits), so a run stopped early keeps what it finished.
set -euo pipefail
RUNS="${1:?usage: train_default_pair_gpu.sh RUNS_DIR [LIB_DIR]}"
LIB=("${2:+--stdlib}" "${2:-}")
[[ -n "${2:-}" ]] || LIB=()
PYTHON="${PYTHON:-python3}"
PACKED="${PACKED:-$RUNS/packed}"
# The shipped tokenizer (trained by `dg-stream train tokenizer`, deterministic) is reused.
TOKENIZER="$(dirname "$0")/../src/dg_stream/default_model/verifier"

if [[ "${SMOKE:-0}" == 1 ]]; then
    V=(--hidden-size 64 --layers 2 --heads 4 --kv-heads 2 --intermediate-size 128
       --steps 30 --batch-size 2 --seq-len 64 --time-budget 20)
    D=(--hidden-size 32 --layers 1 --heads 2 --window 56 --steps 30 --sequences 64 --generation-batch 32
       --batch-size 16 --time-budget 10)
    A=(--hidden-size 32 --layers 1 --heads 2 --steps 30 --time-budget 10)
    DF=(--layers 1 --block-size 6 --context-tokens 8 --continuation-tokens 16 --sequences 32
        --generation-batch 32 --batch-size 4 --blocks-per-row 2 --steps 10 --time-budget 10)
else
    V=(--hidden-size 512 --layers 8 --heads 8 --kv-heads 4 --intermediate-size 1408
       --steps 2000 --batch-size 16 --seq-len 1024 --lr 1.5e-3 --time-budget 130)
    D=(--hidden-size 192 --layers 3 --heads 4 --window 64 --steps 30000 --sequences 65536
       --generation-batch 2048 --batch-size 2048 --lr 3e-3 --time-budget "${DRAFTER_SECONDS:-200}")
    A=(--hidden-size 192 --layers 3 --heads 4 --steps 8000 --batch-size 1024 --lr 2e-3
       --time-budget 45)
    DF=(--layers 2 --block-size 16 --context-tokens 32 --continuation-tokens 96 --sequences 32768
        --generation-batch 2048 --batch-size 128 --blocks-per-row 16 --steps 100000 --lr 8e-4
        --time-budget "${DFLASH_SECONDS:-300}")
fi

train() { "$PYTHON" -m dg_stream.cli train "$@"; }
pack() {  # pack RUNS/$1 (weights, configs, tokenizer, metrics) into 16 MB parts
    mkdir -p "$PACKED"
    rm -f "$PACKED/$1.tar.part-"*  # parts of an earlier, longer archive would corrupt this one
    tar -C "$RUNS" --exclude checkpoint.pt --exclude distillation.pt -cf - "$1" |
        split -b 16000000 - "$PACKED/$1.tar.part-"
    echo "packed $1 after ${SECONDS}s"
}

# PHASES picks what to (re)train, e.g. "dflash" against an existing VERIFIER.
PHASES="${PHASES:-verifier drafter assistant dflash}"
VERIFIER="${VERIFIER:-$RUNS/verifier}"
has() { [[ " $PHASES " == *" $1 "* ]]; }

# Continuations kept from an earlier run belong to the verifier that wrote them.
has verifier && rm -f "$RUNS"/{drafter,assistant,dflash}/distillation.pt
has verifier && train verifier "${LIB[@]}" --tokenizer "$TOKENIZER" --out "$RUNS/verifier" "${V[@]}"
has verifier && pack verifier
F=()
if [[ -n "${FEATURES:-}" ]]; then
    F=(--feature-layers "$FEATURES" --feature-window "${FEATURE_WINDOW:-16}")
fi
if has drafter; then
    train drafter "${LIB[@]}" --verifier "$VERIFIER" --out "$RUNS/drafter" \
        --eval-prompts 0 --keep-data "${D[@]}" "${F[@]}"
    pack drafter
fi
if has assistant; then
    mkdir -p "$RUNS/assistant"
    [[ -f "$RUNS/drafter/distillation.pt" ]] && mv "$RUNS/drafter/distillation.pt" "$RUNS/assistant/"
    train drafter "${LIB[@]}" --verifier "$VERIFIER" --out "$RUNS/assistant" \
        --architecture causal --eval-prompts 0 "${A[@]}"
    pack assistant
fi
if has dflash; then
    train drafter "${LIB[@]}" --verifier "$VERIFIER" --out "$RUNS/dflash" \
        --architecture dflash --eval-prompts 0 "${DF[@]}"
    pack dflash
fi
echo "done in ${SECONDS}s"
