"""Candidates/s: the real Ray Tune search path vs an in-process loop over the SAME candidates.

    .venv/bin/python benchmarks/throughput.py [--run-dir DIR] [--num-candidates 48] \
        [--max-concurrent 2] [--eval-tokens-per-domain N] [--model-config tiny|demo] [--repeats 1] \
        [--candidates-per-trial 1] [--scorer-pool]

Without --run-dir it first runs the OP-Mix config once (engine.run, storage in a temp dir) and then
uses round 0's checkpoint + adapters. Candidates come from the seeded `random` searcher: the Tune
mode runs opmix_ray.engine.search.run_search (Tuner, ConcurrencyLimiter, reuse_actors=True) with a subclass
that only timestamps suggest/complete in the driver; the loop mode draws the same sequence by calling
an identically seeded searcher's suggest() in-process, then calls scoring.score() with torch threads =
cores. Headline = steady-state ratio (one-time setup excluded: Tuner start, actor start and each
actor's first-trial model build, i.e. rate after the first max_concurrent completions; for the loop,
after the first call). "incl" = candidates / whole run_search wall (teardown too) or whole loop.
--candidates-per-trial k packs k candidates into a trial (steady state then starts after the first
max_concurrent trials, i.e. max_concurrent x k candidates). --scorer-pool scores in processes that
outlive a round, and the passes find them three ways: pass 1 "cold" (the pool removed first, so its
trials wait for the scorers' imports: a search run on its own); pass 2 "started with the run" (the
pool removed, started as the driver starts it with the main run, and the pass begins once the
scorers are ready: what a run's first round finds when its scorers were ready before its first
trial, which the config run checks and reports as scorers_ready_before_first_trial_s); passes 3+
"warm" (every later round). With --scorer-pool and no --run-dir, the config run uses the pool too. A pass's breakdown: tuner_start_to_first_suggest_s (Tuner start), first_done_s
(to the first trial's result: actor start, imports, first model build and score),
fresh_process_import_s (`import opmix_ray.engine.scoring`, what a trial process imports, in a new
interpreter, measured once), in-trial seconds per trial (first per actor vs steady).
Results go to benchmarks/results/throughput.json (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import glob
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from opmix_ray.config import load_config
from opmix_ray.data.read import build_shards
from opmix_ray.engine import scoring
from opmix_ray.engine import candidates, search, trial_batch
from opmix_ray.engine.adapters import adapter_plan
from opmix_ray.engine.driver import run
from opmix_ray.ray_init import init_ray
from opmix_ray.searchers import METRIC, create_searcher
from opmix_ray.searchers._random import RandomSimplexSearcher
from opmix_ray.storage import write_json
from search_spaces import SimplexSpace

HERE = Path(__file__).resolve().parent


class TimedRandomSearcher(RandomSimplexSearcher):
    """RandomSimplexSearcher (same suggestions) that records driver-side times and trial results."""
    log: list = []

    def suggest(self, trial_id):
        out = super().suggest(trial_id)
        TimedRandomSearcher.log.append(("suggest", time.perf_counter(), trial_id, None))
        return out

    def on_trial_complete(self, trial_id, result=None, error=False):
        TimedRandomSearcher.log.append(("complete", time.perf_counter(), trial_id, result or {}))
        super().on_trial_complete(trial_id, result, error)


def rates(n: int, ends: list[float], t0: float, warm: int, t_end: float | None = None) -> dict:
    """n / (t_end - t0) including setup/teardown, and steady state: after the first `warm` completions."""
    ends, t_end = sorted(ends), t_end or max(ends)
    steady = ends[-1] - ends[warm - 1] if n > warm else float("nan")
    return {"candidates": n, "seconds": t_end - t0, "rate_incl_setup": n / (t_end - t0),
            "steady_seconds": steady, "rate_steady": (n - warm) / steady}


def inputs(args, tmp: str):
    """(cfg, run_dir) from --run-dir, or from a fresh run of the chosen config."""
    if args.run_dir:
        cfg = load_config(Path(args.run_dir) / "config.yaml")
        init_ray(cfg)
        return cfg, Path(args.run_dir)
    path = HERE.parent / "opmix_ray" / "configs" / f"{args.model_config}.yaml"
    if not path.is_file():
        print(f"note: {path} does not exist; using tiny.yaml"); path = path.with_name("tiny.yaml")
    over = {"run": {"storage_path": tmp, "name": "bench"},
            "search": {"scorer_pool": args.scorer_pool, "candidates_per_trial": args.candidates_per_trial}}
    summary = run(load_config(path, over))
    return load_config(path, {"run": over["run"]}), Path(summary["run_dir"])


def run_lead(args) -> dict | None:
    """The config run's scorer timeline: how long before its first trial asked for a scorer the
    last of them was ready (> 0: the first round never waited for the imports)."""
    if not args.scorer_pool or args.run_dir:
        return None
    import ray
    from opmix_ray.engine.trial_batch import POOL
    t = ray.get(ray.get_actor(POOL).timeline.remote())
    ready = [r for r in t["ready_at"] if r is not None]
    return {"scorers": len(t["ready_at"]), "scorers_ready_before_first_trial_s":
            min(t["leased_at"]) - max(ready) if ready and t["leased_at"] else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", help="existing OP-Mix run dir (uses its round 0); default: run the config once")
    ap.add_argument("--num-candidates", type=int, default=48)
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--eval-tokens-per-domain", type=int, default=None, help="default: the config's")
    ap.add_argument("--model-config", choices=["tiny", "demo"], default="tiny")
    ap.add_argument("--repeats", type=int, default=1, help="alternating loop/tune passes; the median ratio is reported")
    ap.add_argument("--candidates-per-trial", type=int, default=1, help="search.candidates_per_trial")
    ap.add_argument("--scorer-pool", action="store_true", help="search.scorer_pool: warm scorer processes")
    ap.add_argument("--out", default=str(HERE / "results" / "throughput.json"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="opmix_throughput_")
    cfg, run_dir = inputs(args, tmp)
    lead = run_lead(args)
    n, m = args.num_candidates, args.max_concurrent
    ev = args.eval_tokens_per_domain or cfg.search.eval_tokens_per_domain
    kpt = args.candidates_per_trial
    over = {"search": {"searcher": f"{__name__}:TimedRandomSearcher", "num_samples": n, "max_concurrent": m,
                       "eval_tokens_per_domain": ev, "candidates_per_trial": kpt, "scorer_pool": args.scorer_pool}}
    if ev and ev > cfg.data.val_tokens_per_domain:  # more held-out windows than the run kept: re-split
        over["data"] = {"val_tokens_per_domain": ev}
    cfg = load_config(cfg.model_dump(mode="json"), over)
    shards = build_shards(cfg)
    current = shards.uniform()
    names = [name for name, _ in adapter_plan(current, cfg)]
    found = {p.split(os.sep)[-2]: os.path.dirname(p)
             for p in glob.glob(str(run_dir / "adapters_round_0" / "**" / "adapter_model.safetensors"), recursive=True)}
    dirs = {name: found[name] for name in names}
    cands = candidates.build_candidates(cfg, f"throughput/{run_dir}/0", str(run_dir / "main" / "round_0"),
                                    dirs, shards, current)
    eval_tokens = sum((v.shape[0] if not ev else max(1, min(v.shape[0], ev // shards.seq_len))) * shards.seq_len
                      for v in shards.val.values())

    # The candidates: exactly what run_search's searcher will suggest (same class, seed, warm start).
    space = SimplexSpace(cands.coords)
    ref = create_searcher("random", space=space, seed=cfg.run.seed * 1000 + 0,
                          points_to_evaluate=search.warm_starts(cfg, space) or None)
    weights = [space.weights(ref.suggest(f"loop_{i}")) for i in range(n)]

    cores = len(os.sched_getaffinity(0))

    def loop_pass() -> dict:  # driver, torch threads = cores, cold cache (the first call builds the model)
        torch.set_num_threads(cores)
        scoring._CACHE.clear()
        load, t0, ends, obj = os.getloadavg()[0], time.perf_counter(), [], {}
        for a in weights:
            obj[tuple(np.round(a, 6))] = scoring.score(cands, a)[METRIC]
            ends.append(time.perf_counter())
        return {"mode": "loop", **rates(n, ends, t0, 1), "torch_threads": cores, "load_1min": load, "obj": obj}

    from ray import tune
    fit, grids = tune.Tuner.fit, []

    def spy(self):  # keeps each pass's ResultGrid: per-trial pid and time_this_iter_s
        grids.append(fit(self))
        return grids[-1]
    tune.Tuner.fit = spy

    def cold_pool() -> None:  # what a run's first round finds: no scorer started yet (build_candidates started them)
        import ray
        from opmix_ray.engine.trial_batch import POOL
        ray.kill(ray.get_actor(POOL))  # its scorers die with it (it owns them)
        while True:
            try:
                ray.get_actor(POOL)
                time.sleep(0.1)
            except ValueError:
                return

    def pool_state(rep: int) -> str:
        return ("cold", "started with the run", "warm")[min(rep, 2)] if args.scorer_pool else "off"

    def tune_pass(rep: int) -> dict:  # the real run_search, trials timestamped by the driver-side searcher
        TimedRandomSearcher.log.clear()
        if pool_state(rep) in ("cold", "started with the run"):
            cold_pool()
        if pool_state(rep) == "started with the run":
            import ray
            ray.get(trial_batch.start_scorers(cfg).timeline.remote())  # returns once every scorer is ready
        load, t0, cpu0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
        out = search.run_search(cfg, cands, 0, str(Path(tmp) / f"tune_{rep}"))
        t_ret, cpu = time.perf_counter(), time.process_time() - cpu0
        log = TimedRandomSearcher.log
        done = [(t, r) for kind, t, _, r in log if kind == "complete"]
        warm = min(m * kpt, n - 1)  # the candidates of the first max_concurrent trials
        row = {"mode": "tune", **rates(len(done), [t for t, _ in done], t0, warm, t_ret),
               "torch_threads": f"{cfg.search.cpus_per_trial:g} x {m} trials", "candidates_per_trial": kpt,
               "scorer_pool": pool_state(rep),
               "load_1min": load, "load_1min_after": os.getloadavg()[0], "driver_cpu_s": cpu,
               "last_trial_to_return_s": t_ret - max(t for t, _ in done),
               "tuner_start_to_first_suggest_s": min(t for kind, t, _, _ in log if kind == "suggest") - t0,
               "first_done_s": min(t for t, _ in done) - t0}
        # actor reuse; in-trial seconds (an actor's first trial includes its model build); busy slots
        trials = sorted((r.metrics for r in grids[-1] if r.metrics), key=lambda r: r.get("timestamp", 0))
        pids, secs = [r.get("pid") for r in trials], [r.get("time_this_iter_s", np.nan) for r in trials]
        ends = sorted({t for t, _ in done})[:len(trials)]  # one driver time per trial (a batch ends at once)
        w0, steady = ends[min(m, len(ends)) - 1], secs[m:]  # trials completing inside the steady window
        busy = sum(min(sec, t - w0) for t, sec in zip(ends[m:], steady))  # their compute inside it
        row.update(actors=len(set(pids)), trials_per_actor=sorted(Counter(pids).values()),
                   in_trial_s_first_per_actor=float(np.mean([s for i, s in enumerate(secs) if pids[i] not in pids[:i]])),
                   in_trial_s_steady=float(np.mean(steady)) if steady else float("nan"),
                   busy_slots_steady=busy / row["steady_seconds"],
                   idle_slot_s_per_trial=(m * row["steady_seconds"] - busy) / len(steady) if steady else float("nan"),
                   obj={tuple(np.round([t[f"a_{c}"] for c in cands.coords], 6)): t[METRIC] for t in out.trials})
        return row

    rows = [row for rep in range(args.repeats) for row in (loop_pass(), tune_pass(rep))]  # alternate the modes
    def per_call(threads: int, calls: list) -> float:
        torch.set_num_threads(threads)
        t = time.perf_counter()
        for fn in calls:
            fn()
        return (time.perf_counter() - t) / len(calls)
    # score() per candidate (warm) at 1 and at `cores` threads, and the one-time model build
    probe = {f"score_s_{th}_threads": per_call(th, [lambda a=a: scoring.score(cands, a) for a in weights[1:5]])
             for th in sorted({1, cores})}
    probe["model_build_s"] = per_call(cores, [lambda: (scoring._CACHE.clear(), scoring.merged_model(cands))])
    code = "import time; t = time.perf_counter(); import opmix_ray.engine.scoring; print(time.perf_counter() - t)"
    probe["fresh_process_import_s"] = float(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                                           text=True, check=True).stdout)
    loop_obj = rows[0]["obj"]
    same = all(set(r["obj"]) == set(loop_obj) for r in rows)
    max_dobj = max(abs(r["obj"][k] - loop_obj[k]) for r in rows for k in loop_obj) if same else float("nan")
    for r in rows:
        del r["obj"]
    ratio = lambda key: [t[key] / lp[key] for lp, t in zip(rows[::2], rows[1::2])]
    result = {
        "headline": "ratio_steady = median over repeats of tune rate_steady / loop rate_steady "
                    "(one-time per-round setup excluded: Tuner start, actor start, first model build)",
        "ratio_steady": float(np.median(ratio("rate_steady"))),
        "ratio_incl_setup": float(np.median(ratio("rate_incl_setup"))),
        "ratios_steady": ratio("rate_steady"), "ratios_incl_setup": ratio("rate_incl_setup"),
        # with the pool: per pass, the state the scorers were in (rows[].scorer_pool; see the docstring)
        "ratio_incl_setup_first_pass": ratio("rate_incl_setup")[0],
        "ratio_incl_setup_later_passes": float(np.median(ratio("rate_incl_setup")[1:])) if args.repeats > 1 else None,
        "ratio_incl_setup_by_pool_state": {st: [r for i, r in enumerate(ratio("rate_incl_setup")) if pool_state(i) == st]
                                           for st in dict.fromkeys(map(pool_state, range(args.repeats)))}
        if args.scorer_pool else None,
        "config_run_scorers": lead,
        "rows": rows, "probe": probe, "same_candidates": same, "max_abs_objective_diff": max_dobj,
        "setup": {"run_dir": str(run_dir), "model_params": int(sum({v.__array_interface__["data"][0]: v.size
                                                                      for v in cands.base_state.values()}.values())),
                  "adapters": list(cands.coords), "eval_tokens_per_candidate": int(eval_tokens),
                  "eval_tokens_per_domain": ev, "num_candidates": n, "max_concurrent": m, "repeats": args.repeats,
                  "candidates_per_trial": kpt, "scorer_pool": args.scorer_pool,
                  "cpus_per_trial": cfg.search.cpus_per_trial, "candidates_from": "seeded random searcher "
                  "(seed = run.seed*1000 + 0, the run's warm starts); loop calls its suggest() in-process"},
        "machine": {"cores": cores, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "torch_threads_loop": cores, "python": sys.version.split()[0]},
    }
    print(f"\nmachine: {cores} cores ({result['machine']['cpu']}), torch {torch.__version__}; "
          f"{result['setup']['model_params']} params, {len(cands.coords)} adapters, {eval_tokens} eval tokens/candidate")
    print(f"{'mode':<5}{'threads':>13}{'cands':>6}{'s incl':>8}{'c/s incl':>10}{'s steady':>10}{'c/s steady':>12}{'load':>6}")
    for r in rows:
        print(f"{r['mode']:<5}{r['torch_threads']:>13}{r['candidates']:>6}{r['seconds']:>8.2f}{r['rate_incl_setup']:>10.2f}"
              f"{r['steady_seconds']:>10.2f}{r['rate_steady']:>12.2f}{r['load_1min']:>6.1f}")
    print(f"ratio tune/loop (median of {args.repeats}): steady {result['ratio_steady']:.3f} (headline), incl. setup "
          f"{result['ratio_incl_setup']:.3f}; same candidates: {same}, max |d objective| {max_dobj:.2e}")
    later = result["ratio_incl_setup_later_passes"]
    print(f"incl. setup: first pass {result['ratio_incl_setup_first_pass']:.3f}, later passes "
          f"{'n/a' if later is None else f'{later:.3f}'} (k={kpt}, scorer pool {'on' if args.scorer_pool else 'off'})")
    if args.scorer_pool:
        print("incl. setup by scorer state: " + "; ".join(f"{k} " + ", ".join(f"{v:.3f}" for v in vs) for k, vs in
                                                            result["ratio_incl_setup_by_pool_state"].items()))
        if lead:
            print(f"config run: {lead['scorers']} scorers, the last ready "
                  f"{lead['scorers_ready_before_first_trial_s']:.1f} s before its first trial asked for one")
    fmt = lambda d: ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())
    print("probe: " + fmt(probe))
    for r in rows[1::2]:
        print("tune: " + fmt({k: v for k, v in r.items() if k not in ("mode", "torch_threads", "candidates")}))
    write_json(args.out, result)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
