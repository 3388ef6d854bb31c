"""RegMix-style regression over a proxy swarm (Liu et al. 2024).

Fit a regressor from mixture weights to the swarm's objective, score `regmix_simulations`
Dirichlet(p) mixtures within the usage bounds, and return the mean of the top `regmix_top_k`
(averaging the top-k is RegMix's guard against one lucky prediction).

LightGBM's defaults (min 20 rows per leaf) cannot split a swarm of a few dozen runs, so the trees
here are small and regularised (num_leaves 7, min 3 rows per leaf, 300 rounds at lr 0.05;
bench.regmix_lgbm_params and bench.regmix_lgbm_rounds change them). The
linear model is least squares on the weights without an intercept: the weights sum to one, so an
intercept would be collinear with them.
"""
from __future__ import annotations

import time

import numpy as np
from scipy.stats import spearmanr

from opmix_ray.experiments.baselines.base import BaselineContext, BaselineResult, usage_upper_bounds
from opmix_ray.experiments.experiment_config import LGBM_PARAMS, LGBM_ROUNDS
from opmix_ray.mixture import Mixture

def fit_regressor(A: np.ndarray, y: np.ndarray, kind: str, seed: int = 0, params: dict | None = None,
                  rounds: int | None = None):
    """A predict(A') -> y' callable fitted on (A, y); params/rounds: LightGBM's (bench.regmix_lgbm_*)."""
    if kind == "linear":
        beta, *_ = np.linalg.lstsq(A, y, rcond=None)
        return lambda X: np.asarray(X) @ beta
    import lightgbm  # the native API: the sklearn wrapper would pull in scikit-learn
    data = lightgbm.Dataset(A, y, params={"min_data_in_bin": 1, "verbose": -1})
    booster = lightgbm.train({**(LGBM_PARAMS if params is None else params), "seed": seed}, data,
                             num_boost_round=rounds or LGBM_ROUNDS)
    return lambda X: booster.predict(np.asarray(X))


def cross_val_spearman(A: np.ndarray, y: np.ndarray, kind: str, folds: int = 5, seed: int = 0,
                       params: dict | None = None, rounds: int | None = None) -> float:
    """Spearman between held-out predictions (k-fold) and the swarm's real objective."""
    idx = np.random.default_rng(seed).permutation(len(y))
    pred = np.empty(len(y))
    for f in range(folds):
        test = idx[f::folds]
        train = np.setdiff1d(idx, test)
        pred[test] = fit_regressor(A[train], y[train], kind, seed, params, rounds)(A[test])
    return float(spearmanr(pred, y).statistic)


def simulate_mixtures(p: np.ndarray, upper: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n Dirichlet(p) draws (RegMix, arXiv 2407.01492) within the usage bounds; draws past a bound are dropped."""
    W = rng.dirichlet(np.maximum(p, 1e-3), size=n)
    keep = W[np.all(W <= upper + 1e-12, axis=1)]
    return keep if len(keep) else W


def _regmix(ctx: BaselineContext, objective: dict[str, float], kind: str) -> BaselineResult:
    swarm = ctx.swarm
    t0 = time.time()
    y = swarm.targets(objective)
    b = ctx.cfg.bench
    predict = fit_regressor(swarm.A, y, kind, ctx.seed, b.regmix_lgbm_params, b.regmix_lgbm_rounds)
    sims = simulate_mixtures(ctx.shards.natural().as_array(), usage_upper_bounds(ctx.cfg, ctx.shards),
                             b.regmix_simulations, ctx.rng(2))
    pred = predict(sims)
    top = np.argsort(pred)[: b.regmix_top_k]
    w = sims[top].mean(axis=0)
    cv = cross_val_spearman(swarm.A, y, kind, seed=ctx.seed, params=b.regmix_lgbm_params, rounds=b.regmix_lgbm_rounds)
    info = {"regressor": kind, "cv_spearman": cv,
            "predicted": float(pred[top].mean()), "n_simulated": len(sims), "swarm_size": len(y),
            "swarm_best": float(y.min())}
    name = "regmix" if kind == "lightgbm" else "regmix-linear"
    return BaselineResult(name, Mixture.normalised(ctx.shards.domains, w, ctx.shards.data_hash),
                          swarm.flops, swarm.wall_s + time.time() - t0, info)


def regmix_lightgbm(ctx: BaselineContext, objective: dict[str, float]) -> BaselineResult:
    return _regmix(ctx, objective, "lightgbm")


def regmix_linear(ctx: BaselineContext, objective: dict[str, float]) -> BaselineResult:
    return _regmix(ctx, objective, "linear")
