#!/usr/bin/env bash
# Issue 9's GPU figures in one call of the `device` tool (about 8 minutes; the lease is 15 in all).
#
# Why one prepared script: a lent GPU machine starts bare, has no package registry and gives a
# session 15 minutes in total, starts included. Everything here needs only what its image holds
# (torch, torchvision, scikit-learn, safetensors, rich, pyyaml, pandas): `d3tune run --no-mlflow`
# and the two benchmarks import neither Ray, Optuna nor MLflow. Fractional-GPU packing
# (trial_phases.py --trials-per-gpu) needs Ray, whose wheel does not fit a call's 64 MiB: not here.
#
#   device run:  bash benchmarks/gpu_session.sh              (timeout_s 590; files come back in $OUT)
#   dry run:     DEVICE=cpu N_TRAIN=300 N_TEST=100 ATTACK_EPOCHS=1 D3_EPOCHS=2 PIPE_EPOCHS=1 \
#                OUT=/tmp/gpu_dry bash benchmarks/gpu_session.sh
#
# Each step has its own time limit, so one slow step cannot take the rest with it; every output
# lands in $OUT (8 files at most come back). The trial is the issue's: synthetic CIFAR-10-sized
# data (50,000 x 3x32x32), PreActResNet-18, BadNets, D3 100 epochs on 5 % clean data; targets
# <= 90 s per full trial and <= 15 s for D3 on an H100.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export D3TUNE_SYNTHETIC_TRAIN=${N_TRAIN:-50000} D3TUNE_SYNTHETIC_TEST=${N_TEST:-10000}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
STEP_S=${STEP_S:-130}  # 4 steps x 130 s stay inside one 600 s device call

step() {  # step NAME LIMIT_S COMMAND...: run with a limit, keep its whole output in $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*" | tee "$OUT/$name.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt" "$OUT/summary.txt"
  tail -n 12 "$OUT/$name.txt"
}

trial() {  # trial NAME [ENV=VALUE...]: one full trial, fresh (no model cache), no MLflow
  local name=$1
  shift
  step "$name" "$STEP_S" env "$@" "$PY" -m d3tune run --dataset synthetic --attack badnets \
    --defense d3 --device "$DEVICE" --no-mlflow --no-cache --out "$OUT/runs" \
    --set "train.epochs=${ATTACK_EPOCHS:-10}" --set "defense.epochs=${D3_EPOCHS:-100}"
}

: >"$OUT/summary.txt"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
  nproc
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

trial trial_fp32 D3TUNE_AMP=
trial trial_bf16 D3TUNE_AMP=bf16
trial trial_bf16_compile D3TUNE_AMP=bf16 D3TUNE_COMPILE=1
# The reference pipeline decodes PIL images per sample: 20 D3 epochs keep it inside its limit.
step pipeline "$STEP_S" "$PY" benchmarks/d3_pipeline.py --device "$DEVICE" --dataset synthetic \
  --epochs "${PIPE_EPOCHS:-20}" --repeats 1 --workers 8
rm -rf "$OUT/runs"  # result.json/weights per run: the phase times are in the step logs
echo "summary:"
cat "$OUT/summary.txt"
