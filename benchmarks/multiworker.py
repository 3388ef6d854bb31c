"""The main run on 1 vs 2 Ray Train workers at the same global batch: loss curve and tokens/s.

    .venv/bin/python benchmarks/multiworker.py [--seeds 0 1 2] [--config opmix_ray/configs/tiny.yaml]

Per seed it runs the config (one round, a random searcher and decision.rule: argmin, so a push
really changes the mixture) three ways, all with main.batch_size unchanged (the global batch):

* `1w x 1cpu`: main.num_workers 1, main.cpus_per_worker 1 (one torch thread; the reference curve);
* `1w x 2cpu`: one worker with two torch threads (the same cores as two workers);
* `2w x 1cpu`: main.num_workers 2 (DDP, gloo), each worker half of every global batch.

Loss: the largest per-step train-loss gap to `1w x 1cpu` (from the main run's TensorBoard events)
and the final mean val loss. Speed: the summary's main_tokens_per_s (training steps only, not the
round or Ray start-up). Results go to benchmarks/results/multiworker.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opmix_ray.config import load_config  # noqa: E402
from opmix_ray.engine.driver import run  # noqa: E402
from opmix_ray.storage import write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = {"1w x 1cpu": {"num_workers": 1, "cpus_per_worker": 1},
            "1w x 2cpu": {"num_workers": 1, "cpus_per_worker": 2},
            "2w x 1cpu": {"num_workers": 2, "cpus_per_worker": 1}}
SETS = {"search": {"max_concurrent": 1, "searcher": "random", "num_samples": 3, "warm_start": False},
        "decision": {"rule": "argmin"}, "tracking": {"tensorboard": True}, "rounds": {"num_rounds": 1}}


def _losses(run_dir: str) -> np.ndarray:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(Path(run_dir) / "tracking" / "main"))
    acc.Reload()
    return np.array([e.value for e in acc.Scalars("main/train_loss")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", default=str(HERE.parent / "opmix_ray" / "configs" / "tiny.yaml"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            ref = None
            for name, main in VARIANTS.items():
                cfg = load_config(args.config, {"run": {"storage_path": tmp, "name": f"s{seed}_{name.replace(' ', '')}",
                                                        "seed": seed}, "main": main, **SETS})
                summary = run(cfg)
                ray.shutdown()
                curve = _losses(summary["run_dir"])
                ref = curve if ref is None else ref
                vals = list(summary["final_val_loss"].values())
                rows.append({"seed": seed, "variant": name, "tokens_per_s": summary["main_tokens_per_s"],
                             "main_train_s": summary["main_train_s"], "steps": len(curve),
                             "max_step_loss_gap": float(np.abs(curve - ref).max()),
                             "final_mean_val_loss": float(np.mean(vals))})
                print(f"seed {seed} {name}: {rows[-1]['tokens_per_s']:.0f} tokens/s, "
                      f"max loss gap {rows[-1]['max_step_loss_gap']:.2e}, val {rows[-1]['final_mean_val_loss']:.5f}",
                      flush=True)
    print("\n| variant | tokens/s (mean, min-max over seeds) | max per-step loss gap to 1w x 1cpu | final mean val loss |")
    print("|---|---|---|---|")
    for name in VARIANTS:
        rs = [r for r in rows if r["variant"] == name]
        tps = [r["tokens_per_s"] for r in rs]
        print(f"| {name} | {statistics.mean(tps):.0f} ({min(tps):.0f}-{max(tps):.0f}) | "
              f"{max(r['max_step_loss_gap'] for r in rs):.1e} | "
              + ", ".join(f"{r['final_mean_val_loss']:.5f}" for r in rs) + " |")
    write_json(HERE / "results" / "multiworker.json",
               {"rows": rows, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "load_at_end": os.getloadavg(), "config": args.config})


if __name__ == "__main__":
    main()
