"""What a finished run (or every engine run of an `opmix-ray continual` output dir) did with its device.

    python benchmarks/gpu_report.py opmix_runs/gpu/smollm2-gpu --memory opmix_runs/gpu/gpu_memory.csv
    python benchmarks/gpu_report.py continual_runs/smollm2          # each OP-Mix stage run

Per run (its summary.json and history.json): the main run's tokens, its seconds inside training
steps (batch draw, forward, backward, optimizer step; boundaries, evaluation, adapters and search
excluded), tokens/s, MFU = 6 N tokens / seconds / the device's dense bf16 peak
(opmix_ray.compute.PEAK_BF16_FLOPS; N from the run's own FLOPs count), candidates/s per round, the
search's share of the FLOPs (adapters + candidates scored, over all) and of the wall time (the
rounds' adapter, search and confirmation seconds, over the run's). --memory: nvidia-smi's
memory.used samples (MiB, every process on the GPU), whose maximum is the peak.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opmix_ray.compute import mfu, peak_bf16_flops  # noqa: E402


def row(run_dir: Path, peak: float | None) -> str | None:
    s = json.loads((run_dir / "summary.json").read_text())
    if not s.get("main_train_s"):
        return None
    rounds = json.loads((run_dir / "history.json").read_text())["rounds"]
    n = s["main_flops"] / (6.0 * s["main_tokens"])
    u = mfu(n, s["main_tokens"], s["main_train_s"], peak)
    rates = ", ".join(f"{r:.2f}" for r in s.get("candidates_per_s") or [] if r) or "-"
    search_wall = sum(sum(r["wall_s"].values()) for r in rounds)
    flops_share = s["search_flops"] / (s["search_flops"] + s["main_flops"])
    return (f"| {s['run']} | {s['main_tokens']} | {s['main_train_s']:.1f} | {s['main_tokens_per_s']:.0f} | "
            + (f"{100 * u:.1f}% |" if u is not None else "- |")
            + f" {rates} | {100 * flops_share:.0f}% | {100 * search_wall / s['wall_s']:.0f}% | {s['wall_s']:.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="opmix_runs/gpu/smollm2-gpu",
                    help="a run dir, or an `opmix-ray continual` output dir")
    ap.add_argument("--memory", help="nvidia-smi memory.used,memory.total samples (csv, MiB)")
    args = ap.parse_args()
    out = Path(args.out)
    import torch
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_bf16_flops(name)
    print(f"device: {name}; dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else f"device: {name}; peak unknown")
    print("| run | main tokens | train s | tokens/s | MFU | candidates/s per round | search share of FLOPs "
          "| search share of wall time | wall s |\n|---|---|---|---|---|---|---|---|---|")
    runs = [out] if (out / "summary.json").is_file() else sorted(p.parent for p in (out / "runs").glob("*/summary.json"))
    for run_dir in runs:
        line = row(run_dir, peak)
        if line:
            print(line)
    if args.memory and Path(args.memory).is_file():
        used = [tuple(float(x) for x in ln.split(",")[:2]) for ln in Path(args.memory).read_text().splitlines()
                if ln.count(",") >= 1 and ln.split(",")[0].strip().replace(".", "").isdigit()]
        if used:
            top = max(used)
            print(f"\npeak GPU memory: {top[0] / 1024:.1f} GiB of {top[1] / 1024:.1f} GiB "
                  f"({len(used)} samples, every process on the GPU)")
    if (out / "results.md").is_file():
        print()
        print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
