"""`opmix-ray bench CONFIG`: every method on the same data, model, main-run budget and seeds.

    opmix-ray bench opmix_ray/configs/bench.yaml --out bench_runs/default   # ~1 h on 2 cores

Objectives: "mean" (mean val loss over the training domains) and, when data.eval_only_domains is
set, "target" (mean val loss over those held-out domains, which no method trains on).
Per seed, in order:
  1. the proxy swarm (Tune trials) and the RegMix / Olmix fits on it, per objective;
  2. DoReMi (reference + Group DRO proxy, one Ray task) and Aioli (its one online run of the main
     model, a Ray task: its row is that run);
  3. OP-Mix: one real engine run per objective (Ray Train main run, adapters, Tune search);
then the headroom measurement on the first seed (experiments/headroom.py: bench.oracle_runs fixed
mixtures, and uniform and the best of them on bench.noise_orders more data orders) gives the oracle
and the noise of a one-seed comparison per objective; one Tune run trains every baseline's mixture
for the full main-run budget (the first seed's uniform and natural are the headroom's own runs);
uniform-long trains uniform for OP-Mix's total FLOPs; then the fidelity check.
Everything lands in OUT: results.json (rows per method x objective x seed, oracle, noise, headroom),
headroom.json, results.md, PNGs. Run again on the same OUT after a stop, the bench keeps the seeds
it finished (rows_partial.json) and a headroom.json of the same setting, and makes the rest.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from opmix_ray import rundir
from opmix_ray.compute import train_flops
from opmix_ray.console import say
from opmix_ray.experiments.experiment_config import ExperimentConfig, prepare_out, seed_config
from opmix_ray.experiments.headroom import objectives
from opmix_ray.experiments.baselines import (
    OBJECTIVE_FREE,
    ONLINE,
    BaselineContext,
    propose,
)
from opmix_ray.storage import read_json, write_json


def metrics(val_loss: dict[str, float], shards) -> dict:
    """Per-domain perplexities, their mean and worst over training domains, and the target's."""
    ppl = {d: math.exp(v) for d, v in val_loss.items()}
    train = [ppl[d] for d in shards.domains]
    tgt = [ppl[d] for d in shards.eval_only]
    return {"ppl": ppl, "mean_ppl": float(np.mean(train)), "worst_ppl": float(max(train)),
            "target_ppl": float(np.mean(tgt)) if tgt else None, "val_loss": val_loss}


def fingerprint(cfg: ExperimentConfig) -> dict:
    """What a seed's rows depend on: the whole config but the bench fields that only say which rows
    to make and how the rest is measured."""
    d = cfg.model_dump(mode="json")
    which = ("seeds", "methods", "oracle_runs", "noise_orders", "fidelity_mixtures", "max_concurrent")
    d["bench"] = {k: v for k, v in d["bench"].items() if k not in which}
    d.pop("schedule", None)  # the continual stages: no bench row reads them
    return d


def finished_rows(cfg: ExperimentConfig, out: Path) -> list[dict]:
    """The proposal and OP-Mix rows of an earlier bench on this --out that stopped before its end
    (rows_partial.json), when it ran the same setting; its fixed-mixture runs are made again."""
    f = out / "rows_partial.json"
    if not f.exists():
        return []
    data = read_json(f)
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint(cfg):
        say(f"{f} is from another setting: not reused")
        return []
    return [r for r in data["rows"] if r["seed"] in cfg.bench.seeds and r["method"] in cfg.bench.methods]


def _proposals(cfg: ExperimentConfig, seed: int, shards, out_dir: Path, skip=()) -> list[dict]:
    ctx = BaselineContext(cfg, shards, str(out_dir / f"seed_{seed}"))
    rows, objs = [], objectives(shards)
    for m in [m for m in cfg.bench.methods if m not in OPMIX_METHODS + LATER + tuple(skip)]:
        for name, obj in objs.items():
            if m in OBJECTIVE_FREE and name != "mean":
                continue  # one mixture serves every objective
            say(f"seed {seed}: {m}{'' if m in OBJECTIVE_FREE else f' ({name})'}")
            res = propose(m, ctx, obj)
            row = {"method": m, "objective": "any" if m in OBJECTIVE_FREE else name, "seed": seed,
                   "mixture": res.mixture.as_dict(), "search_flops": res.search_flops,
                   "search_wall_s": res.search_wall_s, "info": res.info}
            if m in ONLINE:  # its own run is the row: the final mixture is where it ended, not what it trained on
                info = res.info
                row.update(metrics(info["val_loss"], shards), main_flops=info["main_flops"], drawn=info["drawn"],
                           rounds=[r["weights"] for r in info["path"]])
                row["info"] = {k: v for k, v in info.items() if k not in ("val_loss", "drawn")}
            rows.append(row)
    return rows


# "opmix-v1": OP-Mix as it was first built, kept as a bench method so a change to the proxy or the
# decision shows side by side: a LoRA init per adapter, adapter lr 2x the main run's peak without
# weight decay, unit step size, raw merged deltas, no caps in the search, and the argmin over the trials pushed.
OPMIX_V1 = {"adapters": {"init": "per_adapter", "lr_schedule": "peak", "weight_decay": 0.0, "replicate_old": False},
            "search": {"delta_scale": 1.0, "delta_norm": "raw", "caps": False}, "decision": {"rule": "argmin"}}
# "demix": the same engine with full component models instead of LoRA adapters (adapters.kind:
# full): DeMix's weighted merge of fully fine-tuned models, scored by the same searcher and decided
# by the same rule, so it is also OP-Mix's full-rank ablation.
VARIANTS = {"opmix": {}, "opmix-v1": OPMIX_V1, "demix": {"adapters": {"kind": "full"}}}
OPMIX_METHODS = tuple(VARIANTS)
LATER = ("uniform-long",)  # rows made once the OP-Mix runs they are sized by have finished


def _opmix_rows(cfg: ExperimentConfig, seed: int, shards, out_dir: Path, method: str = "opmix") -> list[dict]:
    from opmix_ray.config import load_config
    from opmix_ray.engine.driver import run
    rows = []
    for name, obj in objectives(shards).items():
        c = seed_config(cfg, seed, out_dir).run_config()
        if VARIANTS[method]:
            c = load_config(c.model_dump(mode="json"), VARIANTS[method])
        c.run.name, c.search.objective_weights = f"{method}-{name}-s{seed}", obj
        say(f"seed {seed}: {'OP-Mix' if method == 'opmix' else method} ({name}) -> {c.run.storage_path}/{c.run.name}")
        s = run(c, overwrite=True)
        hist = read_json(rundir.at(s["run_dir"], rundir.HISTORY))
        wall = sum(sum(r["wall_s"].values()) for r in hist["rounds"])  # adapters, search, confirm
        rows.append({"method": method, "objective": name, "seed": seed, "mixture": s["final_mixture"],
                     "search_flops": s["search_flops"], "search_wall_s": wall, "main_flops": s["main_flops"],
                     "run_dir": s["run_dir"], "n_params": s.get("n_params"), "rounds": [r["weights"] for r in hist["rounds"]],
                     "decisions": [r.get("decision") for r in hist["rounds"]],
                     **metrics(s["final_val_loss"], shards)})
    return rows


def _fixed_metrics(cfg: ExperimentConfig, res: dict, shards, tokens: int) -> dict:
    return {**metrics(res["val_loss"], shards), "main_flops": train_flops(res["n_params"], tokens),
            "main_wall_s": res["wall_s"], "drawn": res["drawn"]}


def _train_fixed_rows(cfg: ExperimentConfig, rows: list[dict], shards_by_seed: dict, out_dir: Path,
                      done: list[dict] = ()) -> None:
    """Train every fixed row's mixture for the main budget (Tune trials) and fill in its metrics. `done`:
    runs already made (the headroom's order-0 runs at the first seed): a row with the same seed and
    weights takes that run's figures instead of training it again."""
    from opmix_ray.training import fixed_job, run_fixed_jobs
    first, jobs = cfg.bench.seeds[0], []
    for i, r in enumerate(rows):
        sh = shards_by_seed[r["seed"]]
        w = np.array([r["mixture"][d] for d in sh.domains])
        same = next((d for d in done if r["seed"] == first and np.array_equal(w, np.array(
            [d["weights"][x] for x in sh.domains]))), None)
        if same is not None:
            r.update(_fixed_metrics(cfg, same, sh, cfg.main.total_tokens), reused_run=same["label"])
        else:
            jobs.append(fixed_job(cfg, r["seed"], sh, w, row=i))
    say(f"training {len(jobs)} fixed-mixture full runs ({cfg.main.total_tokens} tokens each) as Tune trials")
    for job, res in zip(jobs, run_fixed_jobs(jobs, shards_by_seed, str(out_dir / "tune"), "full_runs",
                                             cfg.bench.max_concurrent) if jobs else []):
        rows[job["row"]].update(_fixed_metrics(cfg, res, shards_by_seed[job["seed"]], cfg.main.total_tokens))


def _uniform_long_rows(cfg: ExperimentConfig, rows: list[dict], shards_by_seed: dict, out_dir: Path) -> list[dict]:
    """Per seed, uniform trained for as many FLOPs as the costlier OP-Mix run of that seed spent in all
    (main run + search): what a user gets by training longer instead of searching."""
    from opmix_ray.training import fixed_job, run_fixed_jobs
    jobs = []
    for s in cfg.bench.seeds:
        op = [r for r in rows if r["seed"] == s and r["method"] == "opmix"]
        if not op:
            continue
        total = max(r["main_flops"] + r["search_flops"] for r in op)
        sh = shards_by_seed[s]
        n = op[0]["n_params"]
        step = cfg.main.batch_size * sh.seq_len
        tokens = int(round(total / train_flops(n, 1) / step)) * step
        jobs.append(fixed_job(cfg, s, sh, sh.uniform().as_array(), tokens=tokens, opmix_flops=total))
    if not jobs:
        return []
    say(f"training uniform with OP-Mix's total FLOPs on {len(jobs)} seeds")
    out = []
    for job, res in zip(jobs, run_fixed_jobs(jobs, shards_by_seed, str(out_dir / "tune"), "uniform_long",
                                             cfg.bench.max_concurrent)):
        sh = shards_by_seed[job["seed"]]
        out.append({"method": "uniform-long", "objective": "any", "seed": job["seed"], "mixture": job["weights"],
                    "search_flops": 0.0, "search_wall_s": 0.0, "tokens": job["tokens"],
                    "opmix_total_flops": job["opmix_flops"], **_fixed_metrics(cfg, res, sh, job["tokens"])})
    return out


def _oracle(cfg: ExperimentConfig, shards, out: Path) -> dict:
    """The headroom measurement on the first seed (experiments/headroom.py): its order-0 runs are the
    oracle's, its per-objective noise_sd the bench's noise."""
    from opmix_ray.experiments.headroom import PARTIAL, measure_headroom, prior_runs, setting_key
    sc = seed_config(cfg, cfg.bench.seeds[0], out)
    prior = read_json(out / "headroom.json") if (out / "headroom.json").exists() else None
    if prior and prior.get("setting") == setting_key(sc) and prior.get("orders") == cfg.bench.noise_orders \
            and len({r["label"] for r in prior["runs"] if r["order"] == 0}) == max(
                cfg.bench.oracle_runs, 2 + len(shards.domains)):
        say(f"keeping {out / 'headroom.json'}: the same setting, mixtures and orders")
        return prior
    res = measure_headroom(sc, shards, out / "headroom", cfg.bench.noise_orders, cfg.bench.oracle_runs,
                           cfg.bench.max_concurrent, say, reuse=prior_runs(out / "headroom.json", sc))
    res.update(seed=sc.run.seed, setting=setting_key(sc))
    write_json(out / "headroom.json", res)
    (out / "headroom" / PARTIAL).unlink(missing_ok=True)  # every run it held is in headroom.json now
    return res


def run_bench(cfg: ExperimentConfig, out_dir: str | Path, overwrite: bool = False) -> dict:
    """Run the whole benchmark; returns {rows, oracle, fidelity, wall_s} (also in OUT/results.json)."""
    from opmix_ray.data.read import build_shards
    from opmix_ray.engine.preflight import check_against_data, check_searcher
    from opmix_ray.experiments.bench_report import write_report
    from opmix_ray.ray_init import init_ray
    t0, out = time.time(), prepare_out(out_dir, "results.json", overwrite)
    check_searcher(cfg)
    shards_by_seed = {}
    for s in cfg.bench.seeds:  # every seed's data first: bad input fails before any compute
        sc = seed_config(cfg, s, out)
        shards_by_seed[s] = build_shards(sc)
        check_against_data(sc, shards_by_seed[s], None)
    out.mkdir(parents=True, exist_ok=True)
    init_ray(cfg)
    rows: list[dict] = []
    kept = finished_rows(cfg, out)
    for s in cfg.bench.seeds:
        sc, sh = seed_config(cfg, s, out), shards_by_seed[s]
        have = [r for r in kept if r["seed"] == s]
        if have:
            say(f"seed {s}: keeping {len(have)} rows an earlier bench on this --out finished")
        rows += have + _proposals(sc, s, sh, out, skip={r["method"] for r in have})
        for m in OPMIX_METHODS:
            if m in cfg.bench.methods and not any(r["method"] == m for r in have):
                rows += _opmix_rows(sc, s, sh, out, m)
        # a bench stopped later keeps these rows when run again on this --out
        write_json(out / "rows_partial.json", {"fingerprint": fingerprint(cfg), "rows": rows})
    first = cfg.bench.seeds[0]
    headroom = _oracle(cfg, shards_by_seed[first], out) if cfg.bench.oracle_runs else None
    done = [r for r in headroom["runs"] if r["order"] == 0] if headroom else []
    oracle = [{"method": "oracle-run", "objective": "any", "seed": first, "label": r["label"], "mixture": r["weights"],
               "search_flops": 0.0, "search_wall_s": 0.0, **_fixed_metrics(cfg, r, shards_by_seed[first],
                                                                           cfg.main.total_tokens)} for r in done]
    fixed = [r for r in rows if r["method"] not in OPMIX_METHODS + ONLINE]
    _train_fixed_rows(cfg, fixed, shards_by_seed, out, done)
    if "uniform-long" in cfg.bench.methods:
        rows += _uniform_long_rows(cfg, rows, shards_by_seed, out)
    fidelity = None
    first_opmix = next((r for r in rows if r["method"] == "opmix"), None)
    if cfg.bench.fidelity_mixtures and first_opmix:
        from opmix_ray.experiments.fidelity import run_fidelity
        say(f"fidelity: {cfg.bench.fidelity_mixtures} mixtures on {first_opmix['run_dir']} round 0")
        fidelity = run_fidelity(first_opmix["run_dir"], 0, cfg.bench.fidelity_mixtures)
    # DeMix's fidelity on the same instrument: its first run's round 0, the same number of mixtures
    first_demix = next((r for r in rows if r["method"] == "demix"), None)
    fidelity_demix = None
    if cfg.bench.fidelity_mixtures and first_demix:
        from opmix_ray.experiments.fidelity import run_fidelity
        say(f"fidelity (demix): {cfg.bench.fidelity_mixtures} mixtures on {first_demix['run_dir']} round 0")
        fidelity_demix = run_fidelity(first_demix["run_dir"], 0, cfg.bench.fidelity_mixtures)
    result = {"rows": rows, "oracle": oracle, "fidelity": fidelity, "fidelity_demix": fidelity_demix,
              "noise": {k: v["noise_sd"] for k, v in headroom["objectives"].items()} if headroom else None,
              "headroom": headroom["objectives"] if headroom else None,
              "wall_s": time.time() - t0,
              "domains": list(shards_by_seed[cfg.bench.seeds[0]].domains),
              "eval_only": list(shards_by_seed[cfg.bench.seeds[0]].eval_only),
              "config": cfg.model_dump(mode="json")}
    write_json(out / "results.json", result)
    (out / "rows_partial.json").unlink(missing_ok=True)
    write_report(result, out)
    return result
