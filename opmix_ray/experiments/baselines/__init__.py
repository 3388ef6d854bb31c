"""Baselines users compare OP-Mix against. Each returns the Mixture it would train the main run
on, plus the search FLOPs and seconds it spent finding it.

    from opmix_ray.experiments.baselines import BaselineContext, propose
    ctx = BaselineContext(cfg, shards, storage_path="/tmp/bench/seed_0")
    result = propose("regmix", ctx, objective={"manpages": 1.0})

| name          | method                                                                 |
|---------------|------------------------------------------------------------------------|
| uniform       | equal token shares                                                     |
| natural       | token-proportional ("training without mixing")                         |
| uniform-capped| uniform held to the repetition caps for the whole run                  |
| regmix        | proxy swarm (Ray Tune trials) + LightGBM, mean of top-k simulated      |
| regmix-linear | the same swarm + a linear regressor                                    |
| olmix         | the same swarm + the per-domain log-linear law and the KL proposer     |
| doremi        | reference on natural weights, proxy trained with Group DRO             |
| aioli         | online: LearnParams probes in the one run, p <- p * exp(eta * A^T 1)   |

A name maps to "module:function" and is imported only when used, like ray.tune.search.
"""
from __future__ import annotations

import importlib

from opmix_ray.experiments.baselines.base import BaselineContext, BaselineResult, usage_upper_bounds

_REGISTRY = {
    "uniform": "opmix_ray.experiments.baselines._fixed:uniform",
    "natural": "opmix_ray.experiments.baselines._fixed:natural",
    "uniform-capped": "opmix_ray.experiments.baselines._fixed:uniform_capped",
    "regmix": "opmix_ray.experiments.baselines._regmix:regmix_lightgbm",
    "regmix-linear": "opmix_ray.experiments.baselines._regmix:regmix_linear",
    "olmix": "opmix_ray.experiments.baselines._olmix:olmix",
    "doremi": "opmix_ray.experiments.baselines._doremi:doremi",
    "aioli": "opmix_ray.experiments.baselines._aioli:aioli",
}
# Methods whose mixture does not depend on the objective: proposed once per seed.
OBJECTIVE_FREE = ("uniform", "natural", "uniform-capped", "doremi", "aioli")
# Methods whose row is their own training run (the mixture changes during it): no fixed full run.
ONLINE = ("aioli",)

__all__ = ["ONLINE", "OBJECTIVE_FREE", "BaselineContext", "BaselineResult", "propose", "usage_upper_bounds"]


def propose(name: str, ctx: BaselineContext, objective: dict[str, float]) -> BaselineResult:
    """Run baseline `name` for this objective ({domain: weight}, val-loss weights)."""
    if name not in _REGISTRY:
        raise ValueError(f"bench.methods: unknown baseline '{name}' (fix: one of {sorted(_REGISTRY)})")
    module, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)(ctx, objective)
