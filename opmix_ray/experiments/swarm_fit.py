"""Fit RegMix or Olmix from your own swarm: a table of mixtures and the losses runs on them reached.

    opmix-ray fit-swarm swarm.csv --method regmix                  # LightGBM, RegMix's top-k proposal
    opmix-ray fit-swarm swarm.parquet --method olmix --target loss_python --prior uniform --no-bounds

    from opmix_ray.experiments.swarm_fit import read_swarm, fit, predict, propose
    swarm = read_swarm("swarm.csv")
    model = fit(swarm, "regmix")                  # or "regmix-linear", "olmix"
    predict(model, swarm.A)                       # predicted objective per mixture
    propose(model, swarm, prior="natural")        # {"mixture": {...}, "cv_spearman": ..., ...}

The table: one row per run; a column `w_<domain>` per domain (the run's mixture; rows are
normalised) and loss columns `loss_<domain>` (per-domain val loss; Olmix fits one law per loss
column). The objective is `--target COLUMN`, or the mean of the loss columns. CSV or parquet.
The models and proposers are the ones `opmix-ray bench` uses (baselines/_regmix.py, _olmix.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opmix_ray.errors import DataError

METHODS = ("regmix", "regmix-linear", "olmix")
W, LOSS = "w_", "loss_"


@dataclass
class SwarmTable:
    domains: tuple[str, ...]
    A: np.ndarray                     # [n, k] mixtures, rows summing to 1
    columns: dict[str, np.ndarray]    # every other numeric column, by name
    target: str | None                # the objective's column; None = mean of the loss_ columns

    def y(self) -> np.ndarray:
        if self.target is not None:
            return self.columns[self.target]
        return np.mean([self.columns[c] for c in self.loss_columns()], axis=0)

    def loss_columns(self) -> list[str]:
        return [c for c in self.columns if c.startswith(LOSS)]


def _bad(path, why: str) -> DataError:
    return DataError(f"data error at TABLE: {path} {why} (fix: one row per run, columns w_<domain> for the "
                     "mixture and loss_<domain> for the losses, as CSV or parquet)")


def read_swarm(path: str | Path, target: str | None = None) -> SwarmTable:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    p = Path(path)
    if not p.is_file():
        raise _bad(p, "does not exist")
    try:
        table = pq.read_table(p) if p.suffix == ".parquet" else pacsv.read_csv(p)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _bad(p, f"is not a readable table ({' '.join(str(exc).split())[:120]})") from None
    cols = {}
    for name in table.column_names:
        try:
            cols[name] = np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)
        except (ValueError, TypeError, pa.ArrowInvalid):
            continue  # a text column (a run name): not a number, not used
    doms = tuple(c[len(W):] for c in cols if c.startswith(W))
    if len(doms) < 2:
        raise _bad(p, f"has {len(doms)} mixture columns w_<domain>")
    A = np.stack([cols.pop(W + d) for d in doms], axis=1)
    finite = np.all(np.isfinite(A), axis=1) & np.all(A >= 0, axis=1) & (A.sum(axis=1) > 0)
    if not finite.all():
        raise _bad(p, f"has rows {np.flatnonzero(~finite)[:5].tolist()} whose weights are not >= 0 with a positive sum")
    if target is not None and target not in cols:
        raise DataError(f"data error at --target: {target} is not a numeric column of {p} (fix: one of "
                        f"{sorted(cols)})")
    if target is None and not any(c.startswith(LOSS) for c in cols):
        raise _bad(p, "has no loss_<domain> column and no --target was given")
    if len(A) < 5:
        raise _bad(p, f"has {len(A)} runs; a fit needs at least 5")
    bad_y = [c for c in ([target] if target else [c for c in cols if c.startswith(LOSS)])
             if not np.all(np.isfinite(cols[c]))]
    if bad_y:
        raise _bad(p, f"has missing or non-finite values in {bad_y}")
    return SwarmTable(doms, A / A.sum(axis=1, keepdims=True), cols, target)


@dataclass
class SwarmModel:
    method: str
    domains: tuple[str, ...]
    predict: object          # A' -> predicted objective
    laws: list | None = None  # olmix: (c, t, huber) per loss column
    weights: np.ndarray | None = None  # olmix: objective weight per law


def fit(swarm: SwarmTable, method: str, seed: int = 0, lgbm_params: dict | None = None,
        lgbm_rounds: int | None = None) -> SwarmModel:
    from opmix_ray.experiments.baselines._regmix import fit_regressor
    if method not in METHODS:
        raise ValueError(f"method {method!r} (fix: one of {METHODS})")
    if method == "olmix":
        from opmix_ray.searchers import fit_laws
        names = [swarm.target] if swarm.target else swarm.loss_columns()
        Y = np.stack([swarm.columns[c] for c in names], axis=1)
        laws = fit_laws(swarm.A, Y, np.random.default_rng(seed), 32)
        v = np.full(len(laws), 1.0 / len(laws))
        predict = lambda X: sum(vd * (np.exp(c) + np.exp(np.asarray(X) @ t)) for vd, (c, t, _) in zip(v, laws))
        return SwarmModel(method, swarm.domains, predict, laws, v)
    kind = "lightgbm" if method == "regmix" else "linear"
    return SwarmModel(method, swarm.domains, fit_regressor(swarm.A, swarm.y(), kind, seed, lgbm_params, lgbm_rounds))


def predict(model: SwarmModel, A) -> np.ndarray:
    return np.asarray(model.predict(np.asarray(A, dtype=np.float64)), dtype=np.float64)


def prior_mixture(swarm: SwarmTable, prior: str | dict) -> np.ndarray:
    """natural: the swarm's mean mixture (a RegMix swarm is drawn around the natural one);
    uniform; or a {domain: weight} mapping."""
    if isinstance(prior, dict):
        missing = [d for d in swarm.domains if d not in prior]
        if missing or any(not (float(prior[d]) >= 0) for d in swarm.domains):
            raise DataError(f"data error at --prior: needs a weight >= 0 for every domain {list(swarm.domains)}, "
                            f"missing {missing} (fix: a YAML or JSON mapping domain: weight)")
        p = np.array([float(prior[d]) for d in swarm.domains])
    elif prior == "uniform":
        p = np.ones(len(swarm.domains))
    else:
        p = swarm.A.mean(axis=0)
    return p / p.sum()


def propose(model: SwarmModel, swarm: SwarmTable, prior: str | dict = "natural", bounds: bool = True,
            simulations: int = 100_000, top_k: int = 128, seed: int = 0) -> dict:
    """The method's mixture, its predicted objective, and the fit's cross-validated Spearman."""
    from opmix_ray.experiments.baselines._regmix import cross_val_spearman, simulate_mixtures
    p = prior_mixture(swarm, prior)
    upper = np.minimum(15.0 * p, 1.0) if bounds else np.ones_like(p)  # RegMix's usage bound
    rng = np.random.default_rng(seed)
    if model.method == "olmix":
        from opmix_ray.searchers import KL_LAMBDA, propose_mixture
        T = np.stack([t for _, t, _ in model.laws])
        w = np.clip(propose_mixture(T, model.weights, p, np.zeros_like(p), upper, KL_LAMBDA), 0, None)
        cv = None
    else:
        sims = simulate_mixtures(p, upper, simulations, rng)
        pred = predict(model, sims)
        w = sims[np.argsort(pred)[:top_k]].mean(axis=0)
        cv = cross_val_spearman(swarm.A, swarm.y(), "lightgbm" if model.method == "regmix" else "linear", seed=seed)
    w = w / w.sum()
    return {"method": model.method, "mixture": dict(zip(swarm.domains, map(float, w))),
            "predicted": float(predict(model, w[None])[0]), "cv_spearman": cv, "n_runs": len(swarm.A),
            "swarm_best": float(swarm.y().min()), "prior": dict(zip(swarm.domains, map(float, p))),
            "bounded": bounds, "target": swarm.target or f"mean of {', '.join(swarm.loss_columns())}"}
