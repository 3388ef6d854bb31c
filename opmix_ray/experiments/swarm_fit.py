"""Fit RegMix or Olmix from your own swarm: a table of mixtures and the losses runs on them reached.

    opmix-ray fit-swarm swarm.csv --method regmix                  # LightGBM, RegMix's top-k proposal
    opmix-ray fit-swarm mix.csv --losses losses.csv --id index --mixture-prefix train_the_pile_ \\
        --target metric/the_pile_pile_cc_val_loss --test test_mix.csv --test-losses test_losses.csv

    from opmix_ray.experiments.swarm_fit import read_swarm, fit, predict, propose, evaluate
    swarm = read_swarm("swarm.csv")
    model = fit(swarm, "regmix")                  # or "regmix-linear", "olmix"
    predict(model, swarm)                         # predicted objective per run (a table, or an array)
    evaluate(model, read_swarm("held_out.csv"))   # {"spearman", "pearson", "mae", "n"}
    propose(model, swarm, prior="natural")        # {"mixture": {...}, "cv_spearman": ..., ...}

The default table: one row per run, a column `w_<domain>` per domain and loss columns
`loss_<domain>`; the column options of read_swarm (swarm_table.py) name other layouts. The
objective is `target`, or the mean of the loss columns. The models and proposers are the ones
`opmix-ray bench` uses (baselines/_regmix.py, _olmix.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from opmix_ray.experiments.swarm_table import LOSS, W, SwarmTable, read_swarm

__all__ = ["METHODS", "LOSS", "W", "SwarmModel", "SwarmTable", "cross_validate", "evaluate", "fit", "predict",
           "prior_mixture", "propose", "read_swarm"]

METHODS = ("regmix", "regmix-linear", "olmix")
LAW_RESTARTS = 32


@dataclass
class SwarmModel:
    """A fitted model: `predict(model, mixtures)` gives the objective it expects there."""
    method: str
    domains: tuple[str, ...]
    predict: object                   # [n, k] mixtures in `domains` order -> [n] predicted objective
    laws: list | None = None          # olmix: (c, t, huber) per law
    law_columns: list[str] = field(default_factory=list)  # olmix: the column each law was fitted to
    weights: np.ndarray | None = None  # olmix: the objective's weight per law
    mixture_columns: tuple[str, ...] = ()  # the swarm table's names for `domains`
    params: dict = field(default_factory=dict)  # what fit() was given (seed, LightGBM's params and rounds)


def _law_predict(laws, v):
    return lambda X: sum(vd * (np.exp(c) + np.exp(np.asarray(X) @ t)) for vd, (c, t, _) in zip(v, laws))


def fit(swarm: SwarmTable, method: str, seed: int = 0, lgbm_params: dict | None = None,
        lgbm_rounds: int | None = None) -> SwarmModel:
    """Fit `method` to the swarm's mixtures and objective.

    regmix: LightGBM regressor (lgbm_params / lgbm_rounds override the small, regularised
    defaults); regmix-linear: least squares on the weights; olmix: one mixing law
    L(w) = exp(c) + exp(t . w) per column the objective reads (the target alone, or each loss
    column, weighted equally), fitted with a Huber loss from LAW_RESTARTS starts."""
    from opmix_ray.experiments.baselines._regmix import fit_regressor
    if method not in METHODS:
        raise ValueError(f"method {method!r} (fix: one of {METHODS})")
    params = {"seed": seed, "lgbm_params": lgbm_params, "lgbm_rounds": lgbm_rounds}
    common = dict(mixture_columns=swarm.mixture_columns, params=params)
    if method == "olmix":
        from opmix_ray.searchers import fit_laws
        names = [swarm.target] if swarm.target else swarm.loss_columns()
        Y = np.stack([swarm.columns[c] for c in names], axis=1)
        laws = fit_laws(swarm.A, Y, np.random.default_rng(seed), LAW_RESTARTS)
        v = np.full(len(laws), 1.0 / len(laws))
        return SwarmModel(method, swarm.domains, _law_predict(laws, v), laws, names, v, **common)
    kind = "lightgbm" if method == "regmix" else "linear"
    return SwarmModel(method, swarm.domains, fit_regressor(swarm.A, swarm.y(), kind, seed, lgbm_params, lgbm_rounds),
                      **common)


def _mixtures(model: SwarmModel, X) -> np.ndarray:
    """X as [n, k] weights in the model's domain order: a SwarmTable, a table with a column per
    domain (its domain name or the swarm's column name: pyarrow, pandas, a dict), or an array."""
    if isinstance(X, SwarmTable):
        cols = dict(zip(X.domains, X.A.T))
    elif hasattr(X, "column_names") or hasattr(X, "columns") or isinstance(X, dict):
        names = list(X.column_names) if hasattr(X, "column_names") else list(X.columns if hasattr(X, "columns") else X)
        get = (lambda n: X.column(n).to_numpy()) if hasattr(X, "column_names") else (lambda n: X[n])
        cols = {}
        for d, c in zip(model.domains, model.mixture_columns or model.domains):
            name = d if d in names else c if c in names else None
            if name is not None:
                cols[d] = np.asarray(get(name), dtype=np.float64)
    else:
        A = np.asarray(X, dtype=np.float64)
        A = A[None] if A.ndim == 1 else A
        if A.ndim != 2 or A.shape[1] != len(model.domains):
            raise ValueError(f"predict: mixtures of shape {np.shape(X)}, but the model takes rows of "
                             f"{len(model.domains)} weights in the order {list(model.domains)} (fix: pass that "
                             "width and order, or a table with a column per domain)")
        return A
    missing = [d for d in model.domains if d not in cols]
    if missing:
        raise ValueError(f"predict: no column for the domains {missing} (fix: a column per domain of "
                         f"{list(model.domains)}, by domain name or the swarm's column name)")
    return np.stack([cols[d] for d in model.domains], axis=1)


def predict(model: SwarmModel, X) -> np.ndarray:
    """The objective the model predicts for each mixture of X: a SwarmTable (a held-out swarm), a
    table with a column per domain (pyarrow, pandas, or a dict; matched by name, so any column
    order), or an array whose rows hold the weights in `model.domains` order (the width is checked)."""
    return np.asarray(model.predict(_mixtures(model, X)), dtype=np.float64)


def _scores(pred: np.ndarray, y: np.ndarray) -> dict:
    from scipy.stats import pearsonr, spearmanr
    flat = np.ptp(pred) == 0 or np.ptp(y) == 0  # a constant has no rank correlation
    return {"n": int(len(y)), "spearman": None if flat else float(spearmanr(pred, y).statistic),
            "pearson": None if flat else float(pearsonr(pred, y).statistic),
            "mae": float(np.mean(np.abs(pred - y)))}


def evaluate(model: SwarmModel, held_out: SwarmTable) -> dict:
    """Spearman, Pearson and mean absolute error of the model's predictions on a held-out swarm's
    objective (which must be the one the model was fitted to: the same target or loss columns)."""
    return _scores(predict(model, held_out), held_out.y())


def cross_validate(swarm: SwarmTable, method: str, folds: int = 5, seed: int = 0, lgbm_params: dict | None = None,
                   lgbm_rounds: int | None = None) -> float | None:
    """Spearman between each run's objective and the prediction of a model fitted without its fold
    (the folds of baselines/_regmix.cross_val_spearman, so RegMix's figure matches the benchmark's)."""
    n = len(swarm.A)
    idx = np.random.default_rng(seed).permutation(n)
    pred = np.empty(n)
    for f in range(folds):
        test = idx[f::folds]
        train = np.setdiff1d(idx, test)
        part = SwarmTable(swarm.domains, swarm.A[train], {c: v[train] for c, v in swarm.columns.items()},
                          swarm.target, loss_prefix=swarm.loss_prefix)
        pred[test] = predict(fit(part, method, seed, lgbm_params, lgbm_rounds), swarm.A[test])
    return _scores(pred, swarm.y())["spearman"]


def prior_mixture(swarm: SwarmTable, prior: str | dict) -> np.ndarray:
    """natural: the swarm's mean mixture (a RegMix swarm is drawn around the natural one);
    uniform; or a {domain: weight} mapping."""
    from opmix_ray.errors import DataError
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
    """The method's mixture and what the model predicts there, beside what it predicts at the swarm's
    best run (so the two predictions compare like with like) and that run's measured objective,
    with the fit's 5-fold cross-validated Spearman (and, for Olmix, the laws it fitted)."""
    from opmix_ray.experiments.baselines._regmix import simulate_mixtures
    p = prior_mixture(swarm, prior)
    upper = np.minimum(15.0 * p, 1.0) if bounds else np.ones_like(p)  # RegMix's usage bound
    rng = np.random.default_rng(seed)
    if model.method == "olmix":
        from opmix_ray.searchers import KL_LAMBDA, propose_mixture
        T = np.stack([t for _, t, _ in model.laws])
        w = np.clip(propose_mixture(T, model.weights, p, np.zeros_like(p), upper, KL_LAMBDA), 0, None)
    else:
        sims = simulate_mixtures(p, upper, simulations, rng)
        pred = predict(model, sims)
        w = sims[np.argsort(pred)[:top_k]].mean(axis=0)
    w = w / w.sum()
    y = swarm.y()
    best = int(np.argmin(y))
    cv = cross_validate(swarm, model.method, seed=seed, lgbm_params=model.params.get("lgbm_params"),
                        lgbm_rounds=model.params.get("lgbm_rounds"))
    out = {"method": model.method, "mixture": dict(zip(swarm.domains, map(float, w))),
           "predicted": float(predict(model, w[None])[0]), "cv_spearman": cv, "n_runs": len(swarm.A),
           "swarm_best": float(y[best]), "swarm_best_predicted": float(predict(model, swarm.A[best:best + 1])[0]),
           "swarm_best_row": swarm.row_name(best), "prior": dict(zip(swarm.domains, map(float, p))),
           "bounded": bounds, "target": swarm.objective_name(), "renormalised_rows": swarm.renormalised}
    if model.method == "olmix":
        out["laws"] = [{"column": c, "huber": float(h)} for c, (_, _, h) in zip(model.law_columns, model.laws)]
    return out
