"""`opmix-ray fidelity RUN_DIR`: how well merged adapters predict what training would really do.

    opmix-ray fidelity opmix_runs/demo --round 0 --mixtures 16 --truth-seeds 2

On a finished OP-Mix run's round k, for `mixtures` adapter-weight vectors a (always stay, a_old = 1;
the round's leader; equal weights; then draws from the round's search space, caps included):
  proxy = the merged-adapter objective the search ranks by (search.score, in this process);
  truth = the exact continuation of the main run from round k's checkpoint on E(a) up to the next
          boundary (engine/continuation.py: optimizer moments, schedule, sampler state and repetition
          counters restored), once per truth seed. Seed 0 is the run's own data order: for the
          mixture the run pushed, its truth is the main run's own loss at the next boundary.
Per objective (mean, target, the run's own) it reports Spearman and Pearson of proxy vs truth,
the agreement of the truth seeds (the ceiling), the regret of the proxy's pick (true loss of its
choice minus the best true loss among the candidates), and the same for two model-free picks:
stay, and the entropy of E(a). Writes RUN_DIR/fidelity_round_<k>.json; `truths_from` reuses a
file's truths so proxy variants can be scored on the same candidates (benchmarks/fidelity_levers.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr

from opmix_ray import rundir
from opmix_ray.config import ConfigError
from opmix_ray.evaluate import objective
from opmix_ray.storage import read_json, write_json


def corr(x, y) -> dict:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"spearman": None, "pearson": None}
    return {"spearman": float(spearmanr(x, y).statistic), "pearson": float(pearsonr(x, y).statistic)}


def entropy(mixture: dict[str, float]) -> float:
    p = np.array([v for v in mixture.values() if v > 0])
    return float(-(p * np.log(p)).sum())


def scores(candidates: list[dict], proxy_key: str, weights: dict[str, float]) -> dict:
    """Rank fidelity and regret of the proxy and of the model-free picks for one objective."""
    truth = np.array([objective(c["truth_mean"], weights) for c in candidates])
    proxy = np.array([objective(c[proxy_key], weights) for c in candidates])
    ent = np.array([entropy(c["mixture"]) for c in candidates])
    seeds = [np.array([objective(t, weights) for t in c["truth"]]) for c in candidates]
    per_seed = np.array(seeds).T  # [truth seeds, candidates]
    best = float(truth.min())
    stay = next(i for i, c in enumerate(candidates) if c["label"] == "stay")
    return {"proxy": {**corr(proxy, truth), "regret": float(truth[int(np.argmin(proxy))] - best)},
            "stay": {"regret": float(truth[stay] - best)},
            "entropy": {**corr(-ent, truth), "regret": float(truth[int(np.argmax(ent))] - best)},
            "truth_seed_agreement": corr(per_seed[0], per_seed[1]) if len(per_seed) > 1 else None,
            "truth_spread": float(np.ptp(truth)), "best_true": best}


def _candidate_weights(cands, rec: dict, n: int, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    from opmix_ray.engine.rule import matched_stay, reference_mixture
    k = len(cands.coords)
    out = [("stay", np.eye(k)[cands.coords.index("old")])] if "old" in cands.coords else []
    cur = cands.current.as_dict()
    ref = reference_mixture(cur, cands.caps_share)
    if out and any(abs(ref[d] - x) > 1e-12 for d, x in cur.items()):  # staying within the caps left
        s = matched_stay({c: float(c == "old") for c in cands.coords}, cur, ref)
        out.append(("reference", np.array([s[c] for c in cands.coords])))
    leader = (rec.get("decision") or {}).get("leader_weights") or rec.get("adapter_weights") or {}
    if all(c in leader for c in cands.coords):
        out.append(("leader", np.array([leader[c] for c in cands.coords], dtype=np.float64)))
    eq = np.full(k, 1.0 / k)
    out.append(("equal", eq if cands.space.contains(eq) else cands.space.project(eq)))
    while len(out) < n:
        out.append((f"draw_{len(out)}", cands.space.weights(cands.space.sample(rng))))
    return out[:max(n, len(out))]


@dataclass
class RoundProxy:
    """A finished run's round, ready to score candidates on: its config (with the proxy's overrides),
    data, checkpoint, the merged-adapter candidates, and how many steps a truth continues for."""
    cfg: object
    shards: object
    history_round: dict
    checkpoint: str
    candidates: object  # engine.candidates.Candidates
    steps: int


def round_proxy(run_dir: str | Path, round_idx: int = 0, overrides: dict | None = None,
                adapter_dirs: dict | None = None) -> RoundProxy:
    """Round `round_idx` of the run in `run_dir` as the search saw it; overrides: config changes for
    the proxy only (search.*, adapters.*); adapter_dirs: these adapters instead of the run's own."""
    from opmix_ray.data.read import build_shards
    from opmix_ray.engine.main_run import checkpoint_path, steps_and_boundaries
    from opmix_ray.engine.records import BoundaryInfo
    from opmix_ray.engine.candidates import build_candidates
    from opmix_ray.history import read_history
    from opmix_ray.mixture import Mixture
    from opmix_ray.run_config import load_run_config_only
    run_dir = Path(run_dir).expanduser().resolve()
    if not (run_dir / rundir.HISTORY).is_file():
        raise ConfigError(f"config error at RUN_DIR: {run_dir} has no {rundir.HISTORY} (fix: pass the dir of a "
                          "finished OP-Mix run, e.g. opmix_runs/demo)")
    cfg = load_run_config_only(run_dir, overrides)
    hist = read_history(run_dir)
    if round_idx >= len(hist.get("rounds", [])):
        raise ConfigError(f"config error at --round: {run_dir} has {len(hist.get('rounds', []))} rounds "
                          "(fix: pick an earlier round)")
    rec = hist["rounds"][round_idx]
    shards = build_shards(cfg)
    current = Mixture.from_dict(rec["mixture_before"], shards.domains)
    adir = rundir.at(run_dir, rundir.adapter_root(round_idx))
    dirs = adapter_dirs or {p.name: str(p) for p in sorted(adir.iterdir())
                            if (p / "adapter_model.safetensors").is_file() or (p / "model.safetensors").is_file()}
    dirs = {c: dirs[c] for c in sorted(dirs, key=lambda c: (c != "old", c))}  # 'old' first, as the plan has it
    ckpt = checkpoint_path(str(run_dir), round_idx)
    total, bounds = steps_and_boundaries(cfg)
    start = bounds[round_idx]
    end = bounds[round_idx + 1] if round_idx + 1 < len(bounds) else total
    info = BoundaryInfo.from_dict(read_json(Path(ckpt) / rundir.STATE_JSON)["info"])
    cands = build_candidates(cfg, f"fidelity/{round_idx}/{time.time()}", ckpt, dirs, shards, current, info,
                             (end - start) * cfg.main.batch_size * shards.seq_len)
    return RoundProxy(cfg, shards, rec, ckpt, cands, end - start)


def truths(rp: RoundProxy, mixtures: list, truth_seeds: int) -> list[list[dict]]:
    """Per mixture, the exact continuation's val losses on each truth seed (Ray tasks, one CPU each)."""
    from opmix_ray.engine.continuation import continue_many
    from opmix_ray.ray_init import init_ray
    init_ray(rp.cfg)
    jobs = [{"weights": m.as_dict(), "truth_seed": s} for m in mixtures for s in range(truth_seeds)]
    rows = continue_many(rp.cfg, rp.shards, rp.checkpoint, jobs, rp.steps)
    return [[rows[i * truth_seeds + s]["val_loss"] for s in range(truth_seeds)] for i in range(len(mixtures))]


def run_fidelity(run_dir: str | Path, round_idx: int = 0, n: int = 16, truth_seeds: int = 2,
                 truths_from: str | Path | None = None, overrides: dict | None = None, adapter_dirs: dict | None = None,
                 write: bool = True) -> dict:
    """Proxy vs exact-continuation truth on round `round_idx` of the run in `run_dir` (see module doc).
    overrides: config changes for the proxy only (search.* such as delta_scale, eval tokens);
    adapter_dirs: score these adapters instead of the run's own."""
    from opmix_ray.engine.candidates import objective_weights
    from opmix_ray.engine.scoring import candidate_mixture, score
    from opmix_ray.mixture import Mixture
    t0 = time.time()
    rp = round_proxy(run_dir, round_idx, overrides, adapter_dirs)
    run_dir = Path(run_dir).expanduser().resolve()
    cfg, shards, rec, cands = rp.cfg, rp.shards, rp.history_round, rp.candidates
    current = cands.current
    if truths_from:
        prior = read_json(truths_from)
        picked = [(c["label"], np.array(c["a"])) for c in prior["candidates"]]
    else:
        picked = _candidate_weights(cands, rec, n, np.random.default_rng([cfg.run.seed, 7, round_idx]))
    proxies = [score(cands, a) for _, a in picked]
    # stay is the current mixture, unchanged; reference is it within the caps left (what a round that
    # does not move pushes when a cap would run out). The candidate the round pushed trains on the
    # pushed weights as recorded (the sampler breaks ties between equal shares by order, so a
    # last-bit difference would change its draws).
    dec = rec.get("decision") or {}
    moved = dec.get("moved", True)
    pushed = Mixture.from_dict(rec["weights"], shards.domains)
    kept = "reference" if dec.get("stay_mixture") else "stay"
    mixtures = [pushed if (label == kept and not moved) or (label == "leader" and moved and dec)
                else current if label == "stay"
                else candidate_mixture(cands, a) for label, a in picked]
    measured = [c["truth"] for c in prior["candidates"]] if truths_from else truths(rp, mixtures, truth_seeds)
    candidates = []
    for (label, a), m, p, t in zip(picked, mixtures, proxies, measured):
        candidates.append({"label": label, "a": a.tolist(), "mixture": m.as_dict(), "truth": t,
                           "truth_mean": {d: float(np.mean([x[d] for x in t])) for d in t[0]},
                           "proxy": {k[5:]: v for k, v in p.items() if k.startswith("loss_")}})
    objs = {"configured": objective_weights(cfg, shards), "mean": {d: 1.0 for d in shards.domains}}
    if shards.eval_only:
        objs["target"] = {d: 1.0 for d in shards.eval_only}
    result = {"run_dir": str(run_dir), "round": round_idx, "n": len(candidates), "truth_seeds": len(measured[0]),
              "truth_steps": rp.steps, "delta_scale": cands.scale, "search_space": type(cands.space).__name__,
              "objectives": {name: scores(candidates, "proxy", w) for name, w in objs.items()},
              "per_domain": {d: corr([c["proxy"][d] for c in candidates], [c["truth_mean"][d] for c in candidates])
                             for d in shards.val},
              "candidates": candidates, "wall_s": time.time() - t0}
    if write:
        write_json(rundir.at(run_dir, rundir.fidelity(round_idx)), result)
    return result
