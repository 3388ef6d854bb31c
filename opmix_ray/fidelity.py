"""`opmix-ray fidelity RUN_DIR`: how well merged adapters predict real training.

    opmix-ray fidelity opmix_runs/demo --round 0 --mixtures 16

For `mixtures` adapter-weight vectors a (equal weights, then Dirichlet(1) draws) on a finished
OP-Mix run's round checkpoint:
  proxy = the merged-adapter objective (what the search ranks by; search.score, in-process);
  truth = the objective after really training the checkpoint on the mixture E(a) for one round's
          tokens (the steps up to the next boundary), continuing the main run's lr schedule,
          as Ray Tune trials (training.run_fixed_jobs).
Reports Spearman and Pearson of proxy vs truth per objective and per domain; writes
RUN_DIR/fidelity_round_<k>.json. The truth runs start a fresh AdamW: the main run's optimizer
moments are not checkpointed, so they are the closest real continuation available.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr

from opmix_ray.config import ConfigError, load_config
from opmix_ray.evaluate import objective
from opmix_ray.storage import read_json, write_json


def _corr(x, y) -> dict:
    x, y = np.asarray(x), np.asarray(y)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"spearman": None, "pearson": None}
    return {"spearman": float(spearmanr(x, y).statistic), "pearson": float(pearsonr(x, y).statistic)}


def run_fidelity(run_dir: str | Path, round_idx: int = 0, n: int = 16, max_concurrent: int = 2) -> dict:
    from opmix_ray.data.shards import build_shards
    from opmix_ray.engine import init_ray
    from opmix_ray.main_run import checkpoint_path, steps_and_boundaries
    from opmix_ray.mixture import Mixture
    from opmix_ray.search import (
        build_candidates,
        candidate_mixture,
        objective_weights,
        score,
    )
    from opmix_ray.training import run_fixed_jobs
    run_dir = Path(run_dir).expanduser().resolve()
    if not (run_dir / "history.json").is_file():
        raise ConfigError(f"config error at RUN_DIR: {run_dir} has no history.json (fix: pass the dir of a "
                          "finished OP-Mix run, e.g. opmix_runs/demo)")
    cfg = load_config(run_dir / "config.yaml")
    hist = read_json(run_dir / "history.json")
    if round_idx >= len(hist.get("rounds", [])):
        raise ConfigError(f"config error at --round: {run_dir} has {len(hist.get('rounds', []))} rounds "
                          "(fix: pick an earlier round)")
    t0, rec = time.time(), hist["rounds"][round_idx]
    shards = build_shards(cfg)
    current = Mixture.from_dict(rec["mixture_before"], shards.domains)
    adir = run_dir / f"adapters_round_{round_idx}" / "adapters"
    dirs = {c: str(adir / c) for c in rec["adapter_weights"]}
    ckpt = checkpoint_path(str(run_dir), round_idx)
    cands = build_candidates(cfg, f"fidelity/{round_idx}", ckpt, dirs, shards, current)
    rng = np.random.default_rng([cfg.run.seed, 7, round_idx])
    k = len(cands.coords)
    A = np.vstack([np.full(k, 1.0 / k), rng.dirichlet(np.ones(k), size=max(0, n - 1))])[:n]
    proxy = [score(cands, a) for a in A]
    mixtures = [candidate_mixture(cands, a) for a in A]
    total, bounds = steps_and_boundaries(cfg)
    start = bounds[round_idx]
    end = bounds[round_idx + 1] if round_idx + 1 < len(bounds) else total
    tokens = (end - start) * cfg.main.batch_size * shards.seq_len
    jobs = [{"weights": m.as_dict(), "model": cfg.model.model_dump(), "main": cfg.main.model_dump(),
             "tokens": tokens, "seed": cfg.run.seed, "caps": shards.cap_tokens(cfg), "init_path": ckpt,
             "schedule": (start, total), "eval_tokens": cfg.search.eval_tokens_per_domain, "candidate": i}
            for i, m in enumerate(mixtures)]
    init_ray(cfg)
    truth = run_fixed_jobs(jobs, shards, str(run_dir / "tune"), f"fidelity_round_{round_idx}", max_concurrent)
    objs = {"configured": objective_weights(cfg, shards), "mean": {d: 1.0 for d in shards.domains}}
    if shards.eval_only:
        objs["target"] = {d: 1.0 for d in shards.eval_only}
    result = {"run_dir": str(run_dir), "round": round_idx, "n": len(A), "truth_tokens": tokens,
              "objectives": {name: _corr([objective({d[5:]: v for d, v in p.items() if d.startswith("loss_")}, w)
                                          for p in proxy], [objective(t["val_loss"], w) for t in truth])
                             for name, w in objs.items()},
              "per_domain": {d: _corr([p[f"loss_{d}"] for p in proxy], [t["val_loss"][d] for t in truth])
                             for d in shards.val},
              "candidates": [{"a": a.tolist(), "mixture": m.as_dict(), "proxy": {k2[5:]: v for k2, v in p.items()
                              if k2.startswith("loss_")}, "truth": t["val_loss"]}
                             for a, m, p, t in zip(A, mixtures, proxy, truth)],
              "truth_flops": sum(t["flops"] for t in truth), "wall_s": time.time() - t0}
    write_json(run_dir / f"fidelity_round_{round_idx}.json", result)
    return result
