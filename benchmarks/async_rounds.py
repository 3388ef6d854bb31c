"""Synchronous vs asynchronous rounds on the same config, seed and budget: the main run's stall per
round, when each winner was applied, wall time, and the final val loss.

    .venv/bin/python benchmarks/async_rounds.py     # tiny model, 2400 steps, 3 rounds, python objective (~15 min, 2 cores)
    .venv/bin/python benchmarks/async_rounds.py --config demo --total-tokens 4096000   # demo model, 2000 steps

Both runs are real engine runs (Ray Train main run, PEFT adapters, Tune + Optuna). The config is
sized so that a round (adapters + search) is shorter than a segment between rounds: only then can
an async winner land before the next boundary. The objective is one domain's val loss (python by
default), so the winners move away from the starting mixture: with the mean objective at this
scale the search keeps uniform (the bench found it near-optimal) and sync and async would push the
same mixtures. Results: benchmarks/results/async_rounds.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from importlib import resources
from pathlib import Path

import ray

from opmix_ray.config import load_config
from opmix_ray.engine.driver import run
from opmix_ray.storage import write_json


def _one(config: str, mode: str, args, storage: str) -> dict:
    cfg = load_config(Path(str(resources.files("opmix_ray") / "configs" / f"{config}.yaml")), {
        "run": {"storage_path": storage, "name": f"{config}-{mode}", "seed": args.seed},
        "rounds": {"mode": mode, "num_rounds": args.num_rounds},
        "main": {"total_tokens": args.total_tokens},
        "search": {"objective_weights": {args.objective: 1.0}, "num_samples": args.num_samples}})
    s = run(cfg, overwrite=True)
    ray.shutdown()
    hist = json.loads((Path(s["run_dir"]) / "history.json").read_text())
    total = hist["meta"]["total_steps"]
    s_per_step = hist["final"]["wall_s"] / total  # main-run wall per step, stalls included
    rounds = [{"round": r["round"], "snapshot_step": r["step"],
               "applied_step": hist["final"].get("applied_step", {}).get(str(r["round"])),
               "round_s": r["wall_s"]["adapters"] + r["wall_s"]["search"],
               "stall_s": hist["final"].get("stall_s", {}).get(str(r["round"]), 0.0)} for r in hist["rounds"]]
    bounds = hist["meta"]["boundaries"] + [total]
    seg_s = [(b - a) * s_per_step for a, b in zip(bounds, bounds[1:])]
    return {"mode": mode, "wall_s": s["wall_s"], "main_stall_s": s["main_stall_s"],
            "final_objective_loss": s["final_val_loss"][args.objective],
            "final_val_loss_mean": sum(s["final_val_loss"][d] for d in hist["meta"]["domains"]) / len(hist["meta"]["domains"]),
            "final_val_ppl_mean": s["final_val_ppl_mean"], "final_mixture": s["final_mixture"],
            "rounds": rounds, "segment_s": seg_s, "total_steps": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny", help="a bundled config name (tiny, demo)")
    ap.add_argument("--total-tokens", type=int, default=2_457_600, help="2400 steps of tiny's 16 x 64")
    ap.add_argument("--objective", default="python", help="the domain whose val loss the search minimises")
    ap.add_argument("--num-samples", type=int, default=12, help="candidates per round")
    ap.add_argument("--num-rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/async_rounds.json")
    args = ap.parse_args()
    t0, storage = time.time(), tempfile.mkdtemp(prefix="opmix_async_")
    res = {m: _one(args.config, m, args, storage) for m in ("sync", "async")}
    print(f"\n{args.config}, {args.total_tokens} tokens, {args.num_rounds} rounds, objective {args.objective}, seed {args.seed}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print("| mode | wall s | main stall s | final objective loss | final mean val loss | mean val ppl "
          "| rounds: snapshot step -> applied step (round s) |")
    print("|---|---|---|---|---|---|")
    for m, r in res.items():
        per = "; ".join(f"{x['snapshot_step']}->{x['applied_step']} ({x['round_s']:.0f}s)" for x in r["rounds"])
        print(f"| {m} | {r['wall_s']:.0f} | {r['main_stall_s']:.1f} | {r['final_objective_loss']:.4f} | "
              f"{r['final_val_loss_mean']:.4f} | "
              f"{r['final_val_ppl_mean']:.2f} | {per} |")
    ratio = res["async"]["final_val_ppl_mean"] / res["sync"]["final_val_ppl_mean"]
    d_obj = res["async"]["final_objective_loss"] - res["sync"]["final_objective_loss"]
    print(f"async/sync: wall {res['async']['wall_s'] / res['sync']['wall_s']:.3f}, final mean ppl {ratio:.4f}; "
          f"objective loss async - sync {d_obj:+.4f}")
    write_json(args.out, {"config": args.config, "total_tokens": args.total_tokens, "num_rounds": args.num_rounds,
                          "objective": args.objective, "num_samples": args.num_samples,
                          "seed": args.seed, "machine": platform.platform(), "cores": os.cpu_count(),
                          "bench_wall_s": time.time() - t0, "results": res})


if __name__ == "__main__":
    main()
