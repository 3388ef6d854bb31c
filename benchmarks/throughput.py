"""Candidates/s: the real Ray Tune search path vs an in-process loop over the SAME candidates.

    .venv/bin/python benchmarks/throughput.py [--run-dir DIR] [--num-candidates 48] \
        [--max-concurrent 2] [--eval-tokens-per-domain N] [--model-config tiny|demo]

Without --run-dir it first runs the OP-Mix config once (engine.run, storage in a temp dir) and then
uses round 0's checkpoint + adapters. Candidates come from the seeded `random` searcher: the Tune
mode runs opmix_ray.search.run_search (Tuner, ConcurrencyLimiter, reuse_actors=True) with a subclass
that only timestamps suggest/complete in the driver; the loop mode draws the same sequence by calling
an identically seeded searcher's suggest() in-process, then calls search.score() with torch threads =
cores. Headline = steady-state ratio (setup excluded: Tuner start, actor start and each actor's
first-trial model build, i.e. the first max_concurrent completions; for the loop, the first call).
Results go to benchmarks/results/throughput.json.
"""
from __future__ import annotations

import argparse
import glob
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from opmix_ray import search
from opmix_ray.adapters import adapter_plan
from opmix_ray.config import load_config
from opmix_ray.data.shards import build_shards
from opmix_ray.engine import init_ray, run
from opmix_ray.searchers import METRIC, create_searcher
from opmix_ray.searchers._random import RandomSimplexSearcher
from opmix_ray.storage import write_json
from search_spaces import SimplexSpace

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "opmix_ray" / "configs"


class TimedRandomSearcher(RandomSimplexSearcher):
    """RandomSimplexSearcher (same suggestions) that records driver-side times and trial results."""
    log: list = []

    def suggest(self, trial_id):
        out = super().suggest(trial_id)
        TimedRandomSearcher.log.append(("suggest", time.perf_counter(), trial_id, None))
        return out

    def on_trial_complete(self, trial_id, result=None, error=False):
        TimedRandomSearcher.log.append(("complete", time.perf_counter(), trial_id, result or {}))


def rates(n: int, ends: list[float], t0: float, warm: int) -> dict:
    """Throughput including setup (n / (last end - t0)) and steady state (after the first `warm` ends)."""
    ends = sorted(ends)
    steady = (n - warm) / (ends[-1] - ends[warm - 1]) if n > warm else float("nan")
    return {"candidates": n, "seconds": ends[-1] - t0, "rate_incl_setup": n / (ends[-1] - t0),
            "steady_seconds": ends[-1] - ends[warm - 1] if n > warm else float("nan"), "rate_steady": steady}


def inputs(args, tmp: str):
    """(cfg, run_dir) from --run-dir, or from a fresh run of the chosen config."""
    if args.run_dir:
        cfg = load_config(Path(args.run_dir) / "config.yaml")
        init_ray(cfg)
        return cfg, Path(args.run_dir)
    path = CONFIGS / f"{args.model_config}.yaml"
    if not path.is_file():
        print(f"note: {path} does not exist; using tiny.yaml")
        path = CONFIGS / "tiny.yaml"
    cfg = load_config(path, {"run": {"storage_path": tmp, "name": "bench"}})
    summary = run(cfg)
    return cfg, Path(summary["run_dir"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", help="existing OP-Mix run dir (uses its round 0); default: run the config once")
    ap.add_argument("--num-candidates", type=int, default=48)
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--eval-tokens-per-domain", type=int, default=None, help="default: the config's")
    ap.add_argument("--model-config", choices=["tiny", "demo"], default="tiny")
    ap.add_argument("--out", default=str(HERE / "results" / "throughput.json"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="opmix_throughput_")
    cfg, run_dir = inputs(args, tmp)
    n, m = args.num_candidates, args.max_concurrent
    ev = args.eval_tokens_per_domain or cfg.search.eval_tokens_per_domain
    over = {"search": {"searcher": f"{__name__}:TimedRandomSearcher", "num_samples": n, "max_concurrent": m,
                       "eval_tokens_per_domain": ev}}
    if ev and ev > cfg.data.val_tokens_per_domain:  # more held-out windows than the run kept: re-split
        over["data"] = {"val_tokens_per_domain": ev}
    cfg = load_config(cfg.model_dump(mode="json"), over)
    shards = build_shards(cfg)
    current = shards.uniform()
    names = [name for name, _ in adapter_plan(current, cfg)]
    found = {p.split(os.sep)[-2]: os.path.dirname(p)
             for p in glob.glob(str(run_dir / "adapters_round_0" / "**" / "adapter_model.safetensors"), recursive=True)}
    dirs = {name: found[name] for name in names}
    cands = search.build_candidates(cfg, f"throughput/{run_dir}/0", str(run_dir / "main" / "round_0"),
                                    dirs, shards, current)
    eval_tokens = sum((v.shape[0] if not ev else max(1, min(v.shape[0], ev // shards.seq_len))) * shards.seq_len
                      for v in shards.val.values())

    # The candidates: exactly what run_search's searcher will suggest (same class, seed, warm start).
    space = SimplexSpace(cands.coords)
    uniform = np.full(len(space.coords), 1.0 / len(space.coords))
    ref = create_searcher("random", space=space, seed=cfg.run.seed * 1000 + 0, points_to_evaluate=[uniform])
    weights = [space.weights(ref.suggest(f"loop_{i}")) for i in range(n)]

    # In-process loop: driver, torch threads = cores, cold per-process cache (first call builds the model).
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    search._CACHE.clear()
    load = {"before_loop": os.getloadavg()[0]}
    t0, ends, loop_obj = time.perf_counter(), [], {}
    for a in weights:
        loop_obj[tuple(np.round(a, 6))] = search.score(cands, a)[METRIC]
        ends.append(time.perf_counter())
    loop = {"mode": "loop", **rates(n, ends, t0, 1), "torch_threads": torch.get_num_threads()}

    # Ray Tune: the real run_search, trials timestamped by the driver-side searcher.
    TimedRandomSearcher.log.clear()
    load["before_tune"] = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = search.run_search(cfg, cands, 0, str(Path(tmp) / "tune"))
    t_ret = time.perf_counter()
    load["after_tune"] = os.getloadavg()[0]
    log = TimedRandomSearcher.log
    done = [(t, r) for kind, t, _, r in log if kind == "complete"]
    first_suggest = min(t for kind, t, _, _ in log if kind == "suggest")
    tune_r = {"mode": "tune", **rates(len(done), [t for t, _ in done], t0, m),
              "run_search_seconds": t_ret - t0, "tuner_start_to_first_suggest_s": first_suggest - t0,
              "torch_threads": f"{int(cfg.search.cpus_per_trial)} per trial x {m}"}

    # Diagnostics: actor reuse, in-trial time (first trial per actor = model build), per-trial overhead.
    in_trial = [(r.get("pid"), r.get("time_this_iter_s", float("nan"))) for _, r in done]
    firsts, rest, seen = [], [], set()
    for pid, s in in_trial:
        (rest if pid in seen else firsts).append(s)
        seen.add(pid)
    steady_trial_s = m / tune_r["rate_steady"]  # wall seconds per trial per slot in steady state
    diag = {"actors": len(seen), "in_trial_s_first_per_actor": float(np.mean(firsts)),
            "in_trial_s_mean_rest": float(np.mean(rest)) if rest else float("nan"),
            "loop_s_per_candidate_steady": 1 / loop["rate_steady"],
            "slot_wall_s_per_trial_steady": steady_trial_s,
            "overhead_s_per_trial": steady_trial_s - (float(np.mean(rest)) if rest else float("nan"))}
    tune_obj = {tuple(np.round([t[f"a_{c}"] for c in cands.coords], 6)): t[METRIC] for t in out.trials}
    same = set(tune_obj) == set(loop_obj)
    max_dobj = max(abs(tune_obj[k] - loop_obj[k]) for k in loop_obj) if same else float("nan")

    result = {
        "headline": "ratio_steady = tune rate_steady / loop rate_steady (one-time per-round setup excluded)",
        "ratio_steady": tune_r["rate_steady"] / loop["rate_steady"],
        "ratio_incl_setup": tune_r["rate_incl_setup"] / loop["rate_incl_setup"],
        "rows": [loop, tune_r], "diagnostics": diag,
        "same_candidates": same, "max_abs_objective_diff": max_dobj,
        "setup": {"run_dir": str(run_dir), "model_params": int(sum({v.__array_interface__["data"][0]: v.size
                                                                      for v in cands.base_state.values()}.values())),
                  "adapters": list(cands.coords), "eval_tokens_per_candidate": int(eval_tokens),
                  "eval_tokens_per_domain": ev, "num_candidates": n, "max_concurrent": m,
                  "cpus_per_trial": cfg.search.cpus_per_trial, "candidates_from": "seeded random searcher "
                  "(seed = run.seed*1000 + 0, uniform warm start); loop calls its suggest() in-process"},
        "machine": {"cores": cores, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "torch_threads_loop": loop["torch_threads"], "python": sys.version.split()[0],
                    "loadavg_1min": load},
    }
    print(f"\nmachine: {cores} cores ({result['machine']['cpu']}), torch {torch.__version__}; "
          f"{result['setup']['model_params']} params, {len(cands.coords)} adapters, "
          f"{eval_tokens} eval tokens/candidate; 1-min load {load}")
    print(f"{'mode':<6}{'threads':>14}{'cands':>7}{'s (incl)':>10}{'c/s (incl)':>12}{'s (steady)':>12}{'c/s (steady)':>14}")
    for r in (loop, tune_r):
        print(f"{r['mode']:<6}{str(r['torch_threads']):>14}{r['candidates']:>7}{r['seconds']:>10.2f}"
              f"{r['rate_incl_setup']:>12.2f}{r['steady_seconds']:>12.2f}{r['rate_steady']:>14.2f}")
    print(f"ratio tune/loop: steady {result['ratio_steady']:.3f} (headline), incl. setup "
          f"{result['ratio_incl_setup']:.3f}; same candidates: {same}, max |d objective| {max_dobj:.2e}")
    print("diagnostics: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in diag.items()))
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
