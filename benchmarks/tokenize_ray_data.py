"""Seconds to read, tokenize and split the bundled corpus: data.reader driver vs ray_data.

    .venv/bin/python benchmarks/tokenize_ray_data.py [--repeats 5] [--num-cpus N] [--data-path DIR]

Both readers build the shards of the default data settings (val and selection windows included)
`--repeats` times in one process, alternating, after one untimed warm-up build each (the first
Ray Data build also starts its worker processes). Ray is started once, before any timing, with
`--num-cpus` CPUs (default: every core). Each repeat of ray_data ends when the val/selection
windows are back on the driver and every train array is in the object store. The script checks the
two readers' tokens and data hash agree, prints the medians, and writes
benchmarks/results/tokenize_ray_data.json with the load average before and after (another job on
the machine skews the figures; measure on an idle one).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import ray

from opmix_ray.config import load_config
from opmix_ray.data.read import build_shards
from opmix_ray.storage import write_json

OUT = Path(__file__).resolve().parent / "results" / "tokenize_ray_data.json"


def _build(cfg) -> tuple[float, object]:
    t = time.perf_counter()
    shards = build_shards(cfg)
    if cfg.data.reader == "ray_data":  # the train arrays exist, not only their future
        ray.wait([shards.train.ref(d) for d in shards.domains], num_returns=len(shards.domains), fetch_local=False)
    return time.perf_counter() - t, shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--data-path", default=None, help="a dir of domains; default: the bundled corpus")
    args = ap.parse_args()
    load_before = os.getloadavg()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    cfgs = {r: load_config({"data": {"reader": r, "path": args.data_path}}) for r in ("driver", "ray_data")}
    got = {r: _build(c)[1] for r, c in cfgs.items()}  # warm-up, and the equality check
    a, b = got["driver"], got["ray_data"]
    same = a.data_hash == b.data_hash and all(np.array_equal(a.train[d], b.train[d]) for d in a.domains)
    times = {r: [] for r in cfgs}
    for _ in range(args.repeats):
        for r, c in cfgs.items():
            times[r].append(_build(c)[0])
    med = {r: statistics.median(v) for r, v in times.items()}
    result = {"corpus": args.data_path or "bundled", "tokens": sum(a.train_tokens().values()),
              "domains": list(a.domains), "repeats": args.repeats, "seconds": times, "median_s": med,
              "ray_data_over_driver": med["ray_data"] / med["driver"], "identical": same,
              "ray_num_cpus": args.num_cpus, "cores": os.cpu_count(), "loadavg_before": load_before,
              "loadavg_after": os.getloadavg(), "python": platform.python_version(), "ray": ray.__version__}
    write_json(OUT, result)
    print(f"{result['tokens']} train tokens, {args.repeats} repeats, identical={same}")
    for r in cfgs:
        print(f"  {r:9s} median {med[r]:.2f}s  ({', '.join(f'{t:.2f}' for t in times[r])})")
    print(f"  load average before {load_before[0]:.1f}, after {result['loadavg_after'][0]:.1f}; wrote {OUT}")
    ray.shutdown()


if __name__ == "__main__":
    main()
