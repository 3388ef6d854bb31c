"""The two mixtures that cost nothing to find."""
from opmix_ray.experiments.baselines.base import BaselineContext, BaselineResult


def uniform(ctx: BaselineContext, objective) -> BaselineResult:
    return BaselineResult("uniform", ctx.shards.uniform(), 0.0, 0.0)


def natural(ctx: BaselineContext, objective) -> BaselineResult:
    """Token-proportional, i.e. training without mixing (the paper's -6.3% comparison)."""
    return BaselineResult("natural", ctx.shards.natural(), 0.0, 0.0)
