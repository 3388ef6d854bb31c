"""Tokens/s and MFU of every engine run of a finished `opmix-ray continual` output dir, then its table.

    python benchmarks/gpu_report.py continual_runs/smollm2      # (benchmarks/gpu_smollm2.sh runs it)

Per OP-Mix stage run (OUT/runs/<method>-stage<s>/summary.json): the main run's tokens, its seconds
inside training steps (batch draw, forward, backward, optimizer step; boundaries, evaluation,
adapters and search excluded), tokens/s, and MFU = 6 N tokens / seconds / the device's dense bf16
peak (opmix_ray.compute.PEAK_BF16_FLOPS; N from the run's own FLOPs count). The fixed-mixture
stages run as Tune trials and record no step timing.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opmix_ray.compute import mfu, peak_bf16_flops  # noqa: E402


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "continual_runs/smollm2")
    import torch
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_bf16_flops(name)
    print(f"device: {name}; dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else f"device: {name}; peak unknown")
    print("| run | main tokens | train s | tokens/s | MFU | candidates/s per round | search / main FLOPs |\n"
          "|---|---|---|---|---|---|---|")
    for summary in sorted((out / "runs").glob("*/summary.json")):
        s = json.loads(summary.read_text())
        if not s.get("main_train_s"):
            continue
        n = s["main_flops"] / (6.0 * s["main_tokens"])
        u = mfu(n, s["main_tokens"], s["main_train_s"], peak)
        rates = ", ".join(f"{r:.2f}" for r in s.get("candidates_per_s") or [] if r) or "-"
        print(f"| {s['run']} | {s['main_tokens']} | {s['main_train_s']:.1f} | {s['main_tokens_per_s']:.0f} | "
              + (f"{100 * u:.1f}% |" if u is not None else "- |")
              + f" {rates} | {s['search_flops'] / s['main_flops']:.2f} |")
    print()
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
