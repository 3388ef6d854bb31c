"""A round's decision: push the leader, or keep the current mixture ("stay").

A search scores many noisy candidates, so its best one beats stay by a little even when no move
is better. The safe rule (decision.rule: safe) therefore scores stay, a_old = 1 (the merged model
of the adapter trained on the current mixture), on the same windows as the leader and pushes the
leader only when

    objective(stay) - objective(leader) > k * SE,   SE^2 = SE_eval^2 + SE_adapter^2

- SE_eval: the standard error of the paired per-window difference (leader - stay), per domain,
  combined with the objective's weights: the two models see the same windows, so what they share
  cancels.
- SE_adapter: adapters trained on other data draws would give other deltas. A second 'old'
  adapter on another data seed (adapters.replicate_old) measures it: with d_d the per-domain loss
  gap of the two 'old' adapters, one adapter at full weight has noise variance
  s1^2 = sum_d v_d d_d^2 / 2 (an upper bound on the objective's: it ignores cancellation across
  domains), and the leader minus stay, sum_i a_i e_i - e_old, has s1^2 (sum_i a_i^2 - 2 a_old + 1).

Without an 'old' adapter nothing stands for stay, and the rule falls back to the argmin.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Decision:
    moved: bool
    reason: str
    rule: str
    k: float
    stay_objective: float | None
    leader_objective: float | None
    se: float | None
    se_eval: float | None
    se_adapter: float | None
    leader_weights: dict[str, float]
    leader_mixture: dict[str, float]
    leader_source: str  # "trial" (best Tune trial) or "law" (the mixing law's proposal)

    def as_dict(self) -> dict:
        return asdict(self)


def _norm(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {d: v / total for d, v in weights.items()}


def weighted(windows: dict[str, np.ndarray], weights: dict[str, float]) -> float:
    """The objective from per-window losses: sum_d v_d mean(windows_d), v normalised."""
    return float(sum(v * windows[d].mean() for d, v in _norm(weights).items()))


def paired_se(leader: dict[str, np.ndarray], stay: dict[str, np.ndarray], weights: dict[str, float]) -> float:
    """Standard error of objective(leader) - objective(stay) over the shared windows."""
    var = 0.0
    for d, v in _norm(weights).items():
        diff = leader[d] - stay[d]
        if len(diff) > 1:
            var += v * v * float(diff.var(ddof=1)) / len(diff)
    return math.sqrt(var)


def adapter_noise_var(old: dict[str, float], replicate: dict[str, float], weights: dict[str, float]) -> float:
    """s1^2: the objective's noise variance for one adapter at full weight, from two 'old' adapters."""
    return float(sum(v * (old[d] - replicate[d]) ** 2 for d, v in _norm(weights).items()) / 2.0)


def difference_var_factor(a: dict[str, float]) -> float:
    """Var(sum_i a_i e_i - e_old) / s1^2 for independent, equal adapter noises e_i."""
    return max(0.0, sum(x * x for x in a.values()) - 2.0 * a.get("old", 0.0) + 1.0)


def safe_rule(stay: dict[str, np.ndarray], leader: dict[str, np.ndarray], weights: dict[str, float],
              leader_a: dict[str, float], k: float, noise_var: float | None) -> tuple[bool, str, dict]:
    """(move?, reason, figures) for the safe rule; noise_var is s1^2 or None when not measured."""
    s_obj, l_obj = weighted(stay, weights), weighted(leader, weights)
    se_eval = paired_se(leader, stay, weights)
    se_adapter = math.sqrt(noise_var * difference_var_factor(leader_a)) if noise_var is not None else 0.0
    se = math.sqrt(se_eval**2 + se_adapter**2)
    gain = s_obj - l_obj
    figures = {"stay_objective": s_obj, "leader_objective": l_obj, "se": se, "se_eval": se_eval,
               "se_adapter": se_adapter if noise_var is not None else None}
    noise = "eval + adapter noise" if noise_var is not None else "eval noise only (no replicate adapter)"
    if gain > k * se:
        return True, f"leader beats stay by {gain:.4f} > {k:g} x SE {se:.4f} ({noise})", figures
    return False, f"leader's gain {gain:.4f} is within {k:g} x SE {se:.4f} ({noise}): keeping the current mixture", figures
