#!/usr/bin/env bash
# All GPU checks in one script, for a lent H100/H200 (see README "Benchmarks"). Each check prints one `RESULT {json}`
# line; they are collected in $OUT/results.jsonl (the device tool copies $OUT back; default ./gpu-results).
#
#   bash benchmarks/gpu_checks.sh                                  # vicuna-7b on cuda: ~10 minutes on an H200
#   bash benchmarks/gpu_checks.sh --preset tiny --device cpu --steps 4 --skip-generate   # the script itself, on a CPU
#
# 1. The real stage: `cheetah train` with random weights at the preset's shapes (`--random-backbone`), the paper's
#    recipe (bf16, ZeRO-2, gradient checkpointing, 24 synthetic + 64 caption samples per step), features cached once
#    before the first step, for --steps steps on the embedded world's data: samples/s, model-TFLOP/s and peak memory
#    from its metrics, next to `cheetah train --plan`'s estimate for the same settings.
# 2. Our training step against the naive forward-pre-hook implementation, same run (benchmarks/train_step.py).
# 3. Batched generation against the per-sample loop (benchmarks/generate.py).
# Needs: this repository installed (`pip install -e .`: torch with CUDA, transformers 5.24, deepspeed 0.19.8, mlflow;
# DeepSpeed runs with a torch optimiser, so nothing is compiled).
set -uo pipefail
preset=vicuna-7b
device=cuda
steps=40
generate=1
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) preset=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --skip-generate) generate=0; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
out=${OUT:-gpu-results}
work=$out/work
mkdir -p "$work"
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
export MLFLOW_TRACKING_URI=sqlite:///$(cd "$work" && pwd)/mlflow.db HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ "$device" = cpu ] && export DS_ACCELERATOR=cpu
if [ "$device" = cpu ]; then dtype=float32; echo "cpu" > "$out/device.txt"
else nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/device.txt"; dtype=bfloat16; fi
run() { echo "+ $*"; timeout 900 "$@" 2>"$out/last.err" | grep RESULT | tee -a "$out/results.jsonl" || tail -5 "$out/last.err"; }

# -- 1. the training stage ---------------------------------------------------------------------------------------
cheetah world --out "$work/source" --n 400 --image-size 64 > "$work/world.log" 2>&1 || tail -5 "$work/world.log"
cheetah synthesize --source "$work/source" --out "$work/data" --n 240 --captions 640 --selector random \
    > "$work/synthesize.log" 2>&1 || tail -5 "$work/synthesize.log"
cat > "$work/params.yaml" <<EOF
model: {preset: $preset, backbone_dir: null, dtype: bfloat16, random_backbone: true}
train:
  data: $work/data
  out: $work/vpgc
  state_dir: $work/state
  metrics: $work/train.json
  curve: $work/curve.csv
  curve_image: $work/curve.png
  steps: $steps
  synthetic_batch: 24
  caption_batch: 64
  precision: bf16
  zero_stage: 2
  gradient_checkpointing: true
  feature_cache: $work/features
  checkpoint_every: 100000
  eval_every: 100000
  heldout_fraction: 0.02
  log_every: 10
EOF
cheetah --params "$work/params.yaml" train --plan > "$work/plan.json" 2>"$out/last.err" || tail -5 "$out/last.err"
rm -rf "$work/state" "$work/vpgc"
echo "+ cheetah --params $work/params.yaml train   ($steps steps)"
cheetah --params "$work/params.yaml" train > "$work/train.log" 2>&1 || tail -20 "$work/train.log"
python - "$work" "$preset" "$device" <<'EOF' | tee -a "$out/results.jsonl"
import json, sys
work, preset, device = sys.argv[1:]
try:
    m = json.load(open(f"{work}/train.json"))
    plan = json.load(open(f"{work}/plan.json"))
except (OSError, ValueError) as e:
    print("RESULT " + json.dumps({"check": "train_stage", "error": str(e)}))
    sys.exit(0)
print("RESULT " + json.dumps({
    "check": "train_stage", "preset": preset, "device": device, "random_backbone": True, "steps": m["steps"],
    "batch": [24, 64], "precision": m["precision"], "zero_stage": m["zero_stage"], "world_size": m["world_size"],
    "samples_per_s": m["samples_per_s"], "model_tflops": m["model_tflops"],
    "peak_device_memory_gb": m["peak_device_memory_gb"], "peak_rss_gb": m["peak_rss_gb"],
    "planned_gb_per_rank": plan["per_rank_gb"]["total"], "final_train_loss": m["final_train_loss"]}))
EOF

# -- 2. our step vs the naive step (paper recipe shapes: 24x128 synthetic + 64x64 caption), same run -------------
run python benchmarks/train_step.py --preset "$preset" --device "$device" --dtype "$dtype"
run python benchmarks/train_step.py --preset "$preset" --device "$device" --dtype "$dtype" --checkpointing \
    --skip-naive

# -- 3. batched generation vs the per-sample loop (prompt 256, 24 new tokens, 32 prompts) -------------------------
if [ "$generate" = 1 ]; then
  run python benchmarks/generate.py --preset "$preset" --device "$device" --dtype "$dtype"
  [ "$device" = cpu ] || run python benchmarks/generate.py --preset "$preset" --device "$device" --dtype "$dtype" \
      --cache static
fi
