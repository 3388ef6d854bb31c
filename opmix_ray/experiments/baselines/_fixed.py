"""The mixtures that cost nothing to find."""
from opmix_ray.engine.rule import reference_mixture
from opmix_ray.experiments.baselines.base import BaselineContext, BaselineResult
from opmix_ray.mixture import Mixture


def uniform(ctx: BaselineContext, objective) -> BaselineResult:
    return BaselineResult("uniform", ctx.shards.uniform(), 0.0, 0.0)


def natural(ctx: BaselineContext, objective) -> BaselineResult:
    """Token-proportional, i.e. training without mixing (the paper's -6.3% comparison)."""
    return BaselineResult("natural", ctx.shards.natural(), 0.0, 0.0)


def uniform_capped(ctx: BaselineContext, objective) -> BaselineResult:
    """Uniform held to the repetition caps for the whole run: a domain whose cap cannot last at 1/k
    gets the share its cap allows, the rest spread equally over the others. What a user who knows
    the caps would train on instead of searching; OP-Mix's safe rule stays at this mixture's analogue
    for the rest of the run when no candidate beats it."""
    cfg, shards = ctx.cfg, ctx.shards
    caps = shards.cap_tokens(cfg)
    share = {d: caps[d] / cfg.main.total_tokens for d in shards.domains}
    w = reference_mixture(shards.uniform().as_dict(), share)
    return BaselineResult("uniform-capped", Mixture.from_dict(w, shards.domains), 0.0, 0.0,
                          info={"cap_share": share})
