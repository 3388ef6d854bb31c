"""Olmix-style mixing-law swarm: the RegMix swarm, a per-domain law fit, the KL proposer.

For every domain in the objective, fit L_d(w) = exp(c_d) + exp(t_d . w) to the swarm (Huber delta
0.02, L-BFGS-B from many restarts), then take argmin_w sum_d v_d exp(t_d . w) + 0.05 KL(w || p)
under the usage bounds, with p the natural mixture. The law and the proposer are the ones the
OP-Mix mixing-law searcher uses (searchers/_mixing_law.py); here they see proxy runs instead of
merged adapters.
"""
from __future__ import annotations

import time

import numpy as np

from opmix_ray.experiments.baselines.base import BaselineContext, BaselineResult, usage_upper_bounds
from opmix_ray.mixture import Mixture
from opmix_ray.searchers import KL_LAMBDA, fit_laws, propose_mixture


def olmix(ctx: BaselineContext, objective: dict[str, float], restarts: int = 32) -> BaselineResult:
    swarm = ctx.swarm
    t0 = time.time()
    doms = sorted(objective)
    Y = np.array([[row[d] for d in doms] for row in swarm.losses])
    fits = fit_laws(swarm.A, Y, ctx.rng(3), restarts)
    T = np.stack([t for _, t, _ in fits])
    v = np.array([objective[d] for d in doms], dtype=np.float64)
    p = ctx.shards.natural().as_array()
    upper = usage_upper_bounds(ctx.cfg, ctx.shards)
    w = propose_mixture(T, v / v.sum(), p, np.zeros_like(p), upper, KL_LAMBDA)
    pred = float(sum(vd * (np.exp(c) + np.exp(t @ w)) for vd, (c, t, _) in zip(v / v.sum(), fits)))
    info = {"predicted": pred, "fit_huber": [f[2] for f in fits], "swarm_size": len(Y)}
    return BaselineResult("olmix", Mixture.normalised(ctx.shards.domains, np.clip(w, 0, None), ctx.shards.data_hash),
                          swarm.flops, swarm.wall_s + time.time() - t0, info)
