"""A round's decision: push the leader, or keep the current mixture ("stay").

A search scores many noisy candidates, so its best one beats stay by a little even when no move
is better. The safe rule (decision.rule: safe) therefore scores stay on the same windows as the
leader and pushes the leader only when

    objective(stay) - objective(leader) > k * SE,   SE^2 = SE_eval^2 + SE_adapter^2

Stay is scored twice. a_old = 1 (the adapter trained on the current mixture, alone) is recorded,
but the rule compares the leader with the *matched* stay s = (a_old of the leader, then
(1 - a_old) * p_d on each domain adapter): it stands for the same mixture p and has the leader's
own blend of adapters. A blend of several adapters moves the weights less than one adapter at full
weight (their deltas are far from parallel), so against a_old = 1 every blend looks worse and the
rule could never move; against the matched stay only the direction differs.

- SE_eval: the standard error of the paired per-window difference (leader - stay), per domain,
  combined with the objective's weights: the two models see the same windows, so what they share
  cancels.
- SE_adapter: adapters trained on other data draws would give other deltas. A second 'old'
  adapter on another data seed (adapters.replicate_old) measures it: with d_d the per-domain loss
  gap of the two 'old' adapters, one adapter at full weight has noise variance
  s1^2 = sum_d v_d d_d^2 / 2 (an upper bound on the objective's: it ignores cancellation across
  domains), and the leader minus stay, sum_i (a_i - s_i) e_i, has s1^2 sum_i (a_i - s_i)^2.

Without an 'old' adapter nothing stands for stay, and the rule falls back to the argmin.

What "stay" means (decision.stay_within_caps): a mixture whose repetition caps run out before the
end of the run cannot be kept; the sampler would draw the capped domains at full weight until
their caps are spent and never again, so the end of the run, where the lr anneals, trains without
them. Staying is therefore the reference mixture: the current one where the caps left allow it,
the excess of a capped domain spread over the others in proportion to their weights
(`reference_mixture`). The rule compares the leader with the stay that stands for it, and a round
that does not move pushes it (when it is the current mixture, a stay pushes nothing).

Where new data arrives (a live domain change, or rounds.initial_stay at a continual stage) the current
mixture gives it weight 0, so staying would ignore it. There the reference is the prior-share stay
(engine/rule.py prior_stay): a new domain at the continual analogue of uniform, the parts of a split
at their parent's weight by tokens, a revision at the old version's weight. The 'old' adapter is
still trained on the current mixture; the stay blends it with the new domains' adapters.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from opmix_ray.config import Config
from opmix_ray.engine.adapters import REPLICATE
from opmix_ray.engine.candidates import Candidates, trial_weights
from opmix_ray.engine.scoring import candidate_mixture, merged_model
from opmix_ray.engine.search import SearchOutcome, make_searcher
from opmix_ray.evaluate import window_losses
from opmix_ray.engine.rule import adapter_noise_var, matched_stay, reference_mixture, safe_rule, weighted
from opmix_ray.mixture import Mixture
from opmix_ray.searchers import METRIC


@dataclass(frozen=True)
class Decision:
    """What a round decided, final once made: a confirmation gives a new record (with_confirmation)."""
    moved: bool
    reason: str
    rule: str
    k: float
    stay_objective: float | None  # the matched stay the rule compares with
    leader_objective: float | None
    se: float | None
    se_eval: float | None
    se_adapter: float | None
    leader_weights: dict[str, float]
    leader_mixture: dict[str, float]
    leader_source: str  # "trial" (best Tune trial) or "law" (the mixing law's proposal)
    stay_old_objective: float | None = None  # a_old = 1: the old adapter alone
    confirm: dict | None = None  # decision.confirm: the confirmation adapter's figures (engine/confirm.py)
    stay_mixture: dict[str, float] | None = None  # what staying pushes (reference_mixture); None: the current one

    def as_dict(self) -> dict:
        return asdict(self)

    def with_confirmation(self, moved: bool, reason: str, figures: dict) -> "Decision":
        """The decision after the confirmation adapter's verdict (engine/confirm.py); the merged
        model's reason is kept in the figures."""
        return replace(self, moved=moved, reason=reason, confirm={**figures, "merged_reason": self.reason})


def _law_leader(cfg: Config, candidates: Candidates, trials: list[dict], round_idx: int) -> dict | None:
    """The mixing law's KL-regularised proposal, refitted on every finished trial (a fresh searcher fed
    the trials' reports, so it does not depend on what Tune kept of the live one); None if unfit."""
    searcher = make_searcher(cfg, candidates, round_idx, warm=False)
    if not hasattr(searcher, "law_proposal"):
        return None
    for i, m in enumerate(trials):
        searcher.on_trial_complete(f"trial_{i}", m)
    return searcher.law_proposal()


def _l1(a: Mixture, b: Mixture) -> float:
    return float(np.abs(a.as_array() - b.as_array()).sum())


def decide(cfg: Config, candidates: Candidates, out: SearchOutcome, round_idx: int) -> Decision:
    """What the round pushes (engine/decision.py): the leader is the best trial within the trust region, or
    the mixing law's proposal when its leave-one-out fit is good; the safe rule then compares it with
    stay on the same windows, in this process."""
    cur = candidates.current
    pool = [m for m in out.trials if cfg.decision.max_l1_step is None or
            _l1(candidate_mixture(candidates, trial_weights(candidates, m)), cur) <= cfg.decision.max_l1_step]
    best = min(pool, key=lambda m: m[METRIC]) if pool else None
    a = trial_weights(candidates, best) if best else candidates.unit("old")[:len(candidates.coords)]
    source, law = "trial", None
    if cfg.decision.rule == "safe" and "old" in candidates.coords:
        law = _law_leader(cfg, candidates, out.trials, round_idx)
        if law and law.get("loo_spearman") is not None and law["loo_spearman"] >= cfg.decision.law_min_loo_spearman:
            w = np.asarray(law["w"], dtype=np.float64)
            if cfg.decision.max_l1_step is None or _l1(candidate_mixture(candidates, w), cur) <= cfg.decision.max_l1_step:
                a, source = w, "law"
    leader_mix = candidate_mixture(candidates, a) if best or source == "law" else cur
    named = {c: float(x) for c, x in zip(candidates.coords, a)}
    common = dict(rule=cfg.decision.rule, k=cfg.decision.k, leader_weights=named,
                  leader_mixture=leader_mix.as_dict(), leader_source=source)
    if cfg.decision.rule == "argmin" or "old" not in candidates.coords:
        reason = "argmin over the trials" if cfg.decision.rule == "argmin" else \
            "no 'old' adapter stands for stay: argmin over the trials"
        return Decision(moved=True, reason=reason, stay_objective=None, se=None, se_eval=None, se_adapter=None,
                        leader_objective=float(best[METRIC]) if best else None, **common)
    if best is None and source == "trial":
        return Decision(moved=False, reason=f"no candidate within decision.max_l1_step={cfg.decision.max_l1_step}",
                        stay_objective=None, leader_objective=None, se=None, se_eval=None, se_adapter=None, **common)
    base = {d: candidates.stay.get(d, 0.0) for d in cur.domains} if candidates.stay else cur.as_dict()
    ref = reference_mixture(base, candidates.caps_share if cfg.decision.stay_within_caps else None)
    stay_a = matched_stay(named, cur.as_dict(), ref)
    mm = merged_model(candidates)
    scored = {}
    for name, w in (("stay", candidates.full([stay_a[c] for c in candidates.coords])),
                    ("stay_old", candidates.unit("old")), ("leader", candidates.full(a))):
        mm.apply(w)
        scored[name] = window_losses(mm.model, candidates.val, max_tokens=candidates.max_tokens)
    candidates.driver_evals += 3 + (REPLICATE in candidates.extra)
    noise = None
    if REPLICATE in candidates.extra:
        mm.apply(candidates.unit(REPLICATE))
        rep = {d: float(v.mean()) for d, v in window_losses(mm.model, candidates.val, max_tokens=candidates.max_tokens).items()}
        noise = adapter_noise_var({d: float(v.mean()) for d, v in scored["stay_old"].items()}, rep,
                                  candidates.objective_weights)
    mm.reset()
    moved, reason, figures = safe_rule(scored["stay"], scored["leader"], candidates.objective_weights, named,
                                       cfg.decision.k, noise, stay_a)
    figures["stay_old_objective"] = weighted(scored["stay_old"], candidates.objective_weights)
    stay_mix = None
    if any(abs(ref[d] - x) > 1e-12 for d, x in cur.as_dict().items()):
        stay_mix = candidate_mixture(candidates, np.array([stay_a[c] for c in candidates.coords])).as_dict()
        if not moved:
            what = "the new data at its prior share" if candidates.stay else "the current mixture within its caps"
            reason = reason.replace("keeping the current mixture", f"keeping {what}")
    if law:
        reason += f"; law loo_spearman {law.get('loo_spearman')}"
    return Decision(moved=moved, reason=reason, stay_mixture=stay_mix, **figures, **common)
