#!/usr/bin/env bash
# All GPU checks in one script, for a lent H100/H200 (see README "Benchmarks"). Each line prints `RESULT {json}`;
# the outputs go to $OUT (the device tool copies it back) or ./gpu-results.
#   bash benchmarks/gpu_checks.sh            # ~6-8 minutes on an H200
# Needs: torch with CUDA, transformers 5.24, deepspeed 0.19.8 (pure Python; uses torch AdamW, nothing compiles).
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
run() { echo "+ $*"; timeout 240 "$@" 2>"$out/last.err" | grep RESULT | tee -a "$out/results.jsonl" || tail -5 "$out/last.err"; }
# 1. training step, paper recipe shapes (24x128 synthetic + 64x64 caption), ours vs the naive hook, same run
run python benchmarks/train_step.py --preset vicuna-7b --device cuda --dtype bfloat16
run python benchmarks/train_step.py --preset vicuna-7b --device cuda --dtype bfloat16 --compile --skip-naive
# 2. the vicuna-7b preset trains a few steps inside DeepSpeed ZeRO-2, bf16, random weights
run python benchmarks/train_step.py --preset vicuna-7b --device cuda --dtype bfloat16 --deepspeed 2 --skip-naive --iters 3
# 3. batched generation vs the per-sample loop (prompt 256, 24 new tokens, 32 prompts), and identical-to-bs1 count
run python benchmarks/generate.py --preset vicuna-7b --device cuda --dtype bfloat16
run python benchmarks/generate.py --preset vicuna-7b --device cuda --dtype bfloat16 --cache static
