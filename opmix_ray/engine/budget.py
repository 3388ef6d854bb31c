"""A round's search sized to a share of the training it decides (search.budget_fraction).

A round trains one adapter per planned coordinate and scores num_samples merged candidates on the
selection windows; its cost (compute.round_search_flops) does not depend on how long the segment it
decides is. Where segments are short (a continual stage of a few dozen steps) the search can cost
more than the stage's training. With a budget the round scales adapters.steps, search.num_samples
and the selection tokens per domain by one factor f, the largest for which

    n_adapters * lora_flops(N, steps * batch * L) + (samples + DECISION_EVALS) * eval_flops(N, eval tokens)
        <= budget_fraction * train_flops(N, segment tokens)

keeping at least MIN_STEPS steps, MIN_SAMPLES candidates and MIN_WINDOWS windows per domain (a
round that cannot fit even those runs at the minimum and says so in its record).
"""
from __future__ import annotations

import math

from opmix_ray.compute import eval_flops, lora_flops, train_flops
from opmix_ray.config import Config

MIN_STEPS, MIN_SAMPLES, MIN_WINDOWS = 5, 4, 4
DECISION_EVALS = 4  # the decision's stay, a_old = 1, leader and replicate evaluations


def _plan(cfg: Config, f: float, seq_len: int, available: list[int]) -> tuple[int, int, int]:
    """(adapter steps, candidates, selection tokens per domain) at factor f, floors applied."""
    per_domain = cfg.search.eval_tokens_per_domain or max(available)
    steps = min(cfg.adapters.steps, max(MIN_STEPS, math.floor(cfg.adapters.steps * f)))
    samples = min(cfg.search.num_samples, max(MIN_SAMPLES, math.floor(cfg.search.num_samples * f)))
    tokens = min(per_domain, max(MIN_WINDOWS * seq_len, math.floor(per_domain * f / seq_len) * seq_len))
    return steps, samples, tokens


def eval_tokens(per_domain: int | None, available: list[int]) -> int:
    """Tokens one candidate is scored on: each domain's selection tokens, at most per_domain (None: all)."""
    return sum(min(a, per_domain or a) for a in available)


def _cost(cfg: Config, plan: tuple[int, int, int], n_params: int, seq_len: int, n_adapters: int,
          available: list[int]) -> float:
    steps, samples, per_domain = plan
    scored = eval_tokens(per_domain, available)
    return (n_adapters * lora_flops(n_params, steps * cfg.adapters.batch_size * seq_len)
            + (samples + DECISION_EVALS) * eval_flops(n_params, scored))


def sized(cfg: Config, n_params: int, seq_len: int, n_adapters: int, segment_tokens: int,
          available: list[int]) -> tuple[Config, dict | None]:
    """(the config this round runs with, what the budget did: None when search.budget_fraction is
    null or the configured search fits it). available: the selection tokens of each scored domain."""
    frac = cfg.search.budget_fraction
    if frac is None or not available:
        return cfg, None
    budget = frac * train_flops(n_params, segment_tokens)
    planned = _cost(cfg, _plan(cfg, 1.0, seq_len, available), n_params, seq_len, n_adapters, available)
    if planned <= budget:
        return cfg, None
    lo, hi = 0.0, 1.0  # cost grows with f: the largest f within the budget, by bisection
    for _ in range(40):
        mid = (lo + hi) / 2
        if _cost(cfg, _plan(cfg, mid, seq_len, available), n_params, seq_len, n_adapters, available) <= budget:
            lo = mid
        else:
            hi = mid
    steps, samples, per_domain = _plan(cfg, lo, seq_len, available)
    out = cfg.model_copy(deep=True)
    out.adapters.steps, out.search.num_samples, out.search.eval_tokens_per_domain = steps, samples, per_domain
    used = _cost(cfg, (steps, samples, per_domain), n_params, seq_len, n_adapters, available)
    return out, {"budget_flops": budget, "planned_flops": planned, "flops": used, "factor": lo,
                 "adapter_steps": steps, "num_samples": samples, "eval_tokens_per_domain": per_domain,
                 "at_minimum": used > budget}
