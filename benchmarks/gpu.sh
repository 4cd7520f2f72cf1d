#!/usr/bin/env bash
# The CUDA step benchmark, bounded to fit one ~9-minute GPU command.
#
#   bash benchmarks/gpu.sh                      # on a machine with one CUDA GPU, from the repository root
#
# One process per shape, each under `timeout`, each running `python -m benchmarks.step --per-method`:
#   1. BERT-base (12 layers, hidden 768), vocabulary 30,522, every BERT method;
#   2. a Qwen2-0.5B-shaped causal LM (24 layers, hidden 896, vocabulary 151,936, random weights) with
#      LoRA rank 16 on q/k/v/o: NEFTune, CAT, LAT, and FGM, PGD, FreeLB on target="embeds".
# Both at batch 32 x 128, bf16 autocast; plain / classic (where one runs on CUDA) / advfunc eager /
# advfunc compiled, interleaved rounds per method, first call (compilation) timed apart, peak CUDA
# memory, tokens per second. The outputs are rewritten after every method, so a shape stopped by its
# time limit keeps the methods it finished and lists the others as not reached.
#
# Results: benchmarks/results/<gpu>-step/{bert-base,qwen2-0.5b}/step.{md,json} and gpu.log (<gpu>: h100,
# h200, ...), copied as they are to $OUT/<gpu>-step/ when $OUT is set (the device tool's return folder).
#
# Environment (defaults in brackets): BERT_SECONDS [240] and DECODER_SECONDS [270], each shape's limit;
# BERT_METHODS and DECODER_METHODS (comma lists, default all; e.g. to finish a cut run later);
# BERT_MODEL [base], BERT_VOCAB [30522], DECODER_MODEL [qwen2-0.5b], DECODER_VOCAB [151936];
# STEP_OUT (the results folder); PYTHON [python3]. Arguments are passed on to both processes, after the
# defaults, e.g. the CPU smoke test:
#   STEP_OUT=/tmp/gpu-smoke BERT_MODEL=tiny BERT_VOCAB=128 DECODER_MODEL=tiny-decoder DECODER_VOCAB=120 \
#     bash benchmarks/gpu.sh --device cpu --batch-length 2x8 --repeats 1 --min-run-time 0 --warmup 1 \
#     --no-compile --no-memory --threads 1
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

gpu=$("$PYTHON" - <<'EOF'
import re

import torch

if torch.cuda.is_available():
    name = torch.cuda.get_device_name().replace("NVIDIA", "")
    found = re.search(r"\b([A-Za-z]+\d+[A-Za-z]*)\b", name)
    print((found.group(1) if found else name.strip()).lower().replace(" ", "-"))
else:
    print("cpu")
EOF
) || exit
out=${STEP_OUT:-benchmarks/results/$gpu-step}
mkdir -p "$out"
log=$out/gpu.log
: >"$log"
echo "gpu.sh: $gpu, results in $out, $(date -u +%FT%TZ)" | tee -a "$log"
if [ "$gpu" != cpu ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$log"
fi

common=(--batch-length 32x128 --precision bf16 --repeats 3 --min-run-time 0.5 --warmup 2 --memory-calls 1 --per-method)

# shape seconds model vocab methods [extra arguments...]
run_shape() {
    local shape=$1 seconds=$2 model=$3 vocab=$4 methods=$5
    shift 5
    local selection=()
    [ -n "$methods" ] && selection=(--methods "$methods")
    echo "== $shape: $model, vocab $vocab, limit ${seconds}s, $(date -u +%T)" | tee -a "$log"
    timeout -k 15 "$seconds" "$PYTHON" -m benchmarks.step --model "$model" --vocab "$vocab" "${common[@]}" \
        "${selection[@]}" --out "$out/$shape" "$@" 2>&1 | tee -a "$log"
    local status=${PIPESTATUS[0]}
    if [ "$status" = 124 ] || [ "$status" = 137 ]; then
        echo "== $shape: stopped at its ${seconds}s limit; $out/$shape holds the methods it finished" | tee -a "$log"
    elif [ "$status" != 0 ]; then
        echo "== $shape: failed with status $status" | tee -a "$log"
    fi
    echo "== $shape: done $(date -u +%T)" | tee -a "$log"
}

run_shape bert-base "${BERT_SECONDS:-240}" "${BERT_MODEL:-base}" "${BERT_VOCAB:-30522}" "${BERT_METHODS:-}" "$@"
run_shape qwen2-0.5b "${DECODER_SECONDS:-270}" "${DECODER_MODEL:-qwen2-0.5b}" "${DECODER_VOCAB:-151936}" \
    "${DECODER_METHODS:-}" "$@"

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/$gpu-step"
    cp -r "$out/." "$OUT/$gpu-step/"
fi
