"""`opmix-ray headroom CONFIG`: can this setting tell a good mixture from a bad one, beyond its noise?

    opmix-ray headroom opmix_ray/configs/bench.yaml --out bench_runs/headroom

Before two mixing methods are compared on a setting, two figures decide whether the comparison can
mean anything: how much better than uniform the best fixed mixture is (the headroom), and how much
two runs of one mixture differ when only the data order changes (the noise). From one init and
data split (run.seed), every run trains the main run's full budget on a fixed mixture:

  1. `n_mixtures` mixtures on data order 0 (the run's own order): uniform, natural, one leaning on
     each training domain, Dirichlet draws within the repetition caps; and uniform on data orders
     1..`orders` (run.data_seed);
  2. per objective, the best mixture other than uniform on order 0 (the oracle's pick), trained on
     orders 1..`orders` too.

Per objective, with d_j = objective(pick, order j) - objective(uniform, order j) for j = 1..orders:
  noise_sd    = sd of d_j (ddof 1): the uncertainty of one seed's comparison of two runs, both runs'
                noise included (a concentrated mixture's runs vary more than uniform's);
  oracle_gain = -mean of d_j, in nats (> 0: the pick beats uniform);
  ratio       = oracle_gain / noise_sd.
The pick is made on order 0 and measured on the other orders, so a lucky order-0 run does not
inflate the gain. Run again on the same --out with --overwrite and more mixtures (bench.oracle_runs)
or orders: the finished runs of the same setting are kept and only the new ones trained. A difference between two methods under 2 x noise_sd is no difference; a setting
whose ratio is under 3 cannot rank methods on that objective.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from opmix_ray.evaluate import objective

# Data-order seed of order j >= 1 (order 0 is the run's own: run.data_seed unset). Far from any
# run.seed a benchmark uses, so no other seed's order 0 is one of these.
ORDER_STRIDE = 10_000
PARTIAL = "headroom_partial.json"  # the runs finished so far, kept when a measurement is stopped
LEAN = 0.6  # the leaning mixtures: this share on one domain, the rest equal


def order_seed(seed: int, order: int) -> int | None:
    """run.data_seed of data order `order` for init/split seed `seed`; None = the run's own order."""
    return None if order == 0 else seed + ORDER_STRIDE * order


def objectives(shards) -> dict[str, dict[str, float]]:
    """mean: the training domains' mean val loss; target: the held-out (eval-only) domains' mean."""
    out = {"mean": {d: 1.0 for d in shards.domains}}
    if shards.eval_only:
        out["target"] = {d: 1.0 for d in shards.eval_only}
    return out


def headroom_mixtures(shards, upper: np.ndarray, n: int, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """[(label, weights)]: uniform, natural, one leaning on each domain, then Dirichlet(1) draws whose
    shares stay within `upper` (the repetition caps at the main budget), n in all."""
    k = len(shards.domains)
    out = [("uniform", shards.uniform().as_array()), ("natural", shards.natural().as_array())]
    for i, d in enumerate(shards.domains):
        w = np.full(k, (1.0 - LEAN) / (k - 1)) if k > 1 else np.ones(1)
        w[i] = LEAN if k > 1 else 1.0
        out.append((f"lean_{d}", w))
    tries = 0
    while len(out) < n:
        w = rng.dirichlet(np.ones(k))
        tries += 1
        if np.all(w <= upper + 1e-12) or tries > 10_000:  # caps this tight: take the draw, the sampler caps it
            out.append((f"draw_{len(out)}", w))
    return out[:max(n, 2 + k)]


def summarise(rows: list[dict], objs: dict[str, dict[str, float]], orders: int) -> dict:
    """Per objective: the pick on order 0, its paired differences with uniform on orders 1..orders,
    noise_sd, oracle_gain and ratio (see the module doc). rows: {label, order, val_loss}."""
    val = {(r["label"], r["order"]): r["val_loss"] for r in rows}
    labels = list(dict.fromkeys(r["label"] for r in rows if r["order"] == 0))
    out = {}
    for name, w in objs.items():
        order0 = {lab: objective(val[(lab, 0)], w) for lab in labels}
        pick = min((lab for lab in labels if lab != "uniform"), key=order0.get)
        uni = [objective(val[("uniform", j)], w) for j in range(1, orders + 1)]
        best = [objective(val[(pick, j)], w) for j in range(1, orders + 1)] if all(
            (pick, j) in val for j in range(1, orders + 1)) else None
        entry = {"n_orders": orders, "n_mixtures": len(labels), "pick": pick,
                 "order0": order0, "order0_gain": order0["uniform"] - order0[pick],
                 "uniform_sd": float(np.std(uni, ddof=1)) if len(uni) > 1 else None}
        if best is not None:
            d = np.array(best) - np.array(uni)
            sd = float(np.std(d, ddof=1)) if len(d) > 1 else math.nan
            gain = float(-d.mean())
            entry.update(noise_sd=sd, oracle_gain=gain, ratio=gain / sd if sd > 0 else math.inf,
                         paired_differences=d.tolist(), uniform=uni, oracle=best)
        out[name] = entry
    return out


def _job(cfg, shards, label: str, weights: np.ndarray, order: int) -> dict:
    from opmix_ray.training import fixed_job
    return fixed_job(cfg, cfg.run.seed, shards, weights, label=label, order=order,
                     data_seed=order_seed(cfg.run.seed, order))


def measure_headroom(cfg, shards, out_dir: str | Path, orders: int = 3, n_mixtures: int = 16,
                     max_concurrent: int = 2, say=print, reuse: list[dict] | None = None) -> dict:
    """Run both stages (module doc) as Ray Tune trials; returns the summary, every run's row, wall_s.
    reuse: rows of an earlier measurement of the same setting (its "runs"); a run with the same label,
    weights and data order is taken from there instead of trained again, so adding mixtures or
    orders costs only the new runs."""
    from opmix_ray.experiments.baselines import usage_upper_bounds
    t0, out_dir = time.time(), Path(out_dir)
    rng = np.random.default_rng([cfg.run.seed, 31])
    mixes = headroom_mixtures(shards, usage_upper_bounds(cfg, shards), n_mixtures, rng)
    weights = dict(mixes)
    objs = objectives(shards)
    jobs = [_job(cfg, shards, lab, w, 0) for lab, w in mixes]
    jobs += [_job(cfg, shards, "uniform", weights["uniform"], j) for j in range(1, orders + 1)]
    say(f"headroom: {len(mixes)} fixed mixtures on data order 0 and uniform on {orders} more orders "
        f"({len(jobs)} runs of {cfg.main.total_tokens} tokens)")
    reuse = list(reuse or []) + prior_runs(out_dir / PARTIAL, cfg)
    keep = _Keeper(out_dir / PARTIAL, setting_key(cfg))
    rows = _run(jobs, shards, out_dir, "headroom_mixtures", max_concurrent, reuse, say, keep)
    picks = sorted({summarise(rows, {n: w}, orders)[n]["pick"] for n, w in objs.items()})
    jobs = [_job(cfg, shards, lab, weights[lab], j) for lab in picks for j in range(1, orders + 1)]
    say(f"headroom: the picks {picks} on {orders} more data orders ({len(jobs)} runs)")
    rows += _run(jobs, shards, out_dir, "headroom_orders", max_concurrent, reuse, say, keep)
    return {"objectives": summarise(rows, objs, orders), "runs": rows, "orders": orders,
            "order_seeds": [order_seed(cfg.run.seed, j) for j in range(orders + 1)],
            "domains": list(shards.domains), "eval_only": list(shards.eval_only), "wall_s": time.time() - t0}


def _same_run(job: dict, row: dict) -> bool:
    """The same label, data order and weights (a dict per domain, as the fixed-mixture jobs carry them)."""
    if (row["label"], row["order"], row["data_seed"]) != (job["label"], job["order"], job["data_seed"]):
        return False
    a, b = row["weights"], job["weights"]
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and \
            all(abs(a[d] - b[d]) <= 1e-12 for d in a)
    return bool(np.allclose(a, b, rtol=0, atol=1e-12))


class _Keeper:
    """Writes every run as it finishes to OUT/headroom_partial.json, so a measurement stopped after
    hours keeps its finished runs for the next try (prior_runs reads the file)."""

    def __init__(self, path: Path, setting: dict):
        self.path, self.setting = path, setting
        self.runs = prior_runs(path, None, setting)

    def __call__(self, job: dict, row: dict) -> None:
        from opmix_ray.storage import write_json
        self.runs = [r for r in self.runs if not _same_run(job, r)] + _rows([job], [row])
        write_json(self.path, {"setting": self.setting, "runs": self.runs})


def _run(jobs: list[dict], shards, out_dir: Path, name: str, max_concurrent: int, reuse: list[dict], say,
         keep: _Keeper) -> list[dict]:
    """The jobs' rows, in job order: reused where `reuse` holds the same run, trained otherwise."""
    from opmix_ray.training import run_fixed_jobs
    kept = [next((r for r in reuse if _same_run(j, r)), None) for j in jobs]
    todo = [j for j, k in zip(jobs, kept) if k is None]
    if len(todo) < len(jobs):
        say(f"headroom: keeping {len(jobs) - len(todo)} finished runs of the same setting, training {len(todo)}")
    if not todo:
        return kept
    made = iter(_rows(todo, run_fixed_jobs(todo, shards, str(out_dir / "tune"), name, max_concurrent,
                                          on_row=lambda i, row: keep(todo[i], row))))
    return [k if k is not None else next(made) for k in kept]


def _rows(jobs: list[dict], done: list[dict]) -> list[dict]:
    return [{"label": j["label"], "order": j["order"], "data_seed": j["data_seed"], "weights": j["weights"],
             "val_loss": r["val_loss"], "drawn": r["drawn"], "wall_s": r["wall_s"], "n_params": r["n_params"],
             "flops": r["flops"]} for j, r in zip(jobs, done)]


def run_headroom(cfg, out_dir: str | Path, overwrite: bool = False) -> dict:
    """`opmix-ray headroom`: the measurement on the config's first bench seed, bench.oracle_runs
    mixtures and bench.noise_orders orders; writes OUT/headroom.json and returns it."""
    from opmix_ray.data.read import build_shards
    from opmix_ray.engine.preflight import check_against_data
    from opmix_ray.console import say
    from opmix_ray.experiments.experiment_config import prepare_out, seed_config
    from opmix_ray.ray_init import init_ray
    from opmix_ray.storage import write_json
    out = prepare_out(out_dir, "headroom.json", overwrite)
    sc = seed_config(cfg, cfg.bench.seeds[0], out)
    shards = build_shards(sc)
    check_against_data(sc, shards, None)
    out.mkdir(parents=True, exist_ok=True)
    init_ray(cfg)
    res = measure_headroom(sc, shards, out, cfg.bench.noise_orders, cfg.bench.oracle_runs,
                           cfg.bench.max_concurrent, say, reuse=prior_runs(out / "headroom.json", sc))
    res.update(seed=sc.run.seed, setting=setting_key(sc), config=cfg.model_dump(mode="json"))
    write_json(out / "headroom.json", res)
    (out / PARTIAL).unlink(missing_ok=True)  # every run it held is in headroom.json now
    return res


def prior_runs(path: Path, cfg, setting: dict | None = None) -> list[dict]:
    """The runs of an earlier measurement at `path` (headroom.json, or the runs a stopped one
    finished) when it measured cfg's setting (or `setting`); [] otherwise."""
    import json
    if not path.is_file():
        return []
    res = json.loads(path.read_text())
    return res.get("runs", []) if res.get("setting") == (setting or setting_key(cfg)) else []


def markdown(res: dict) -> str:
    """The per-objective table `opmix-ray headroom` prints."""
    lines = ["| objective | oracle's pick | gain over uniform, nats | noise sd, nats | gain / noise | orders | mixtures |",
             "|---|---|---|---|---|---|---|"]
    for name, o in res["objectives"].items():
        lines.append(f"| {name} | {o['pick']} | {o['oracle_gain']:+.4f} | {o['noise_sd']:.4f} | {o['ratio']:.2f} | "
                     f"{o['n_orders']} | {o['n_mixtures']} |")
    return "\n".join(lines)


# The headroom measurements shipped with the package (opmix_ray/configs/headroom_*.json): what
# `opmix-ray demo` quotes beside its result when its setting is the measured one.
SHIPPED = Path(__file__).resolve().parent.parent / "configs"


def setting_key(cfg) -> dict:
    """What the noise and the headroom of fixed-mixture runs depend on: the data (domains, targets,
    split, caps), the model and the main run's budget and schedule; not where files go."""
    d, m = cfg.data, cfg.main
    return {"domains": d.domains, "eval_only": d.eval_only_domains, "seq_len": d.seq_len,
            "val_tokens": d.val_tokens_per_domain, "max_epochs": d.max_epochs, "default_max_epochs": d.default_max_epochs,
            "bundled_revisions": d.build_revisions or d.path is None, "model": cfg.model.model_dump(mode="json"),
            "main": {k: getattr(m, k) for k in ("total_tokens", "batch_size", "lr", "warmup_steps", "schedule",
                                                "weight_decay")}, "seed": cfg.run.seed}


def shipped_headroom(cfg) -> dict | None:
    """The shipped measurement of cfg's setting (setting_key equal), or None."""
    import json
    key = setting_key(cfg)
    for f in sorted(SHIPPED.glob("headroom_*.json")):
        res = json.loads(f.read_text())
        if res.get("setting") == key:
            return {**res, "file": f.name}
    return None
