"""The safe rule's arithmetic: what "stay" stands for and how noisy a leader's gain is.

numpy only (no torch, Ray or config), so a baseline, a benchmark or a test can use the same stay
reference and noise terms as a round without importing the engine. engine/decision.py applies it
to a round's search; its docstring says why the rule is built this way.
"""
from __future__ import annotations

import math

import numpy as np


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


def reference_mixture(current: dict[str, float], caps_share: dict[str, float] | None) -> dict[str, float]:
    """The current mixture within the repetition caps left (caps_share: the share of the rest of the run
    each domain's cap still allows): a domain over its share gets the share, and the excess goes to the
    domains with room, in proportion to their weights, until none is over. The current mixture itself
    when no cap binds, or when the caps cannot all hold (their shares sum below 1)."""
    if not caps_share:
        return dict(current)
    w = {d: max(0.0, float(v)) for d, v in current.items()}
    cap = {d: float(caps_share.get(d, np.inf)) for d in w}
    if sum(min(cap[d], 1.0) for d in w if w[d] > 0) < 1.0:
        return dict(current)
    fixed: set[str] = set()
    for _ in range(len(w)):
        over = [d for d in w if d not in fixed and w[d] > cap[d]]
        if not over:
            break
        for d in over:
            fixed.add(d)
        excess = 1.0 - sum(cap[d] for d in fixed) - sum(w[d] for d in w if d not in fixed)
        room = sum(w[d] for d in w if d not in fixed)
        for d in w:
            w[d] = cap[d] if d in fixed else (w[d] + excess * w[d] / room if room > 0 else w[d])
    total = sum(w.values())
    return {d: v / total for d, v in w.items()}


def stay_old_share(current: dict[str, float], target: dict[str, float], own: set[str]) -> float | None:
    """The a_old at which old (on `current`) plus the domain adapters in `own` make exactly `target`:
    the domains without their own adapter move only with old, so they must all keep target/current
    at one ratio r, which is a_old; None when they do not, or when an own domain would need a
    negative weight (target below r * current)."""
    rest = [d for d in current if d not in own]
    if any(current[d] <= 0 < target[d] for d in rest):
        return None
    ratios = {target[d] / current[d] for d in rest if current[d] > 0}
    r = min(ratios) if ratios else min([target[d] / current[d] for d in current if current[d] > 0] or [1.0])
    if any(abs(target[d] - r * current[d]) > 1e-9 for d in rest) or any(target[d] < r * current[d] - 1e-12 for d in own):
        return None
    return r


def matched_stay(a: dict[str, float], current: dict[str, float],
                 target: dict[str, float] | None = None) -> dict[str, float]:
    """The leader's a_old, the rest of the weight on the domain adapters in the current mixture's
    proportions: E(s) = p, with the leader's blend of adapters. Domains without their own adapter
    (collapsed into old) only move with old, so their share stays with old. target: stand for this
    mixture instead of p (the reference mixture within caps, or a prior share for new data): a_old is
    lowered until every domain's target share covers a_old * p_d, and the domain adapters make up the
    rest; when the domains without an adapter pin a_old (target = r * p on all of them), a_old is r
    whatever the leader's; p when neither can be done."""
    if target is not None and "old" in a and any(abs(target[d] - current[d]) > 1e-12 for d in current):
        own = {d for d in current if d in a}
        ratios = [target[d] / current[d] for d in current if current[d] > 0]
        s_old = min([a["old"], *ratios])
        if not all(abs(target[d] - s_old * current[d]) <= 1e-9 for d in current if d not in own):
            s_old = stay_old_share(current, target, own)
        if s_old is not None:
            s = {"old": s_old, **{d: max(0.0, target[d] - s_old * current[d]) for d in own}}
            total = sum(s.values())
            return {c: s.get(c, 0.0) / total for c in a}
    own = [d for d in current if d in a]
    p_own = sum(current[d] for d in own)
    if "old" not in a or p_own <= 0:
        return {c: float(c == "old") for c in a}
    rest = 1.0 - a["old"]
    s = {"old": a["old"] + rest * (1.0 - p_own)}
    s.update({d: rest * current[d] for d in own})
    return {c: s.get(c, 0.0) for c in a}


def prior_stay(previous: dict[str, float], domains, added=(), replaced: dict | None = None,
               tokens: dict[str, int] | None = None) -> dict[str, float]:
    """What staying means where new data arrives: the previous mixture with the new data at a prior
    share, not at 0. `replaced` maps a domain that is gone to what took its place (the parts of a
    split, a revised version, or itself when revised in place): they share its weight in proportion
    to their tokens. Each domain in `added` (new to the run, replacing nothing) gets 1/n of the
    mixture, n = len(domains), the continual analogue of uniform, and the rest keep their ratios."""
    replaced, tokens = dict(replaced or {}), tokens or {}
    parts = {p for ps in replaced.values() for p in ps}
    w = {d: max(0.0, float(previous.get(d, 0.0))) for d in domains if d not in added and d not in parts}
    for gone, ps in replaced.items():
        size = {p: float(tokens.get(p, 1)) for p in ps}
        for p in ps:
            w[p] = w.get(p, 0.0) + max(0.0, float(previous.get(gone, 0.0))) * size[p] / sum(size.values())
    total = sum(w.values())
    w = {d: v / total for d, v in w.items()} if total > 0 else dict.fromkeys(w, 1.0 / len(w)) if w else {}
    n_new = len([d for d in added if d in domains])
    keep = 1.0 - n_new / len(domains) if w else 0.0
    out = {d: keep * w.get(d, 0.0) for d in domains}
    for d in added:
        if d in out:
            out[d] = 1.0 / len(domains) if w else 1.0 / n_new
    return out


def difference_var_factor(a: dict[str, float], s: dict[str, float] | None = None) -> float:
    """Var(sum_i (a_i - s_i) e_i) / s1^2 for independent, equal adapter noises e_i; s = stay (a_old = 1)
    unless given."""
    s = s if s is not None else {c: float(c == "old") for c in a}
    return float(sum((a[c] - s.get(c, 0.0)) ** 2 for c in a))


def safe_rule(stay: dict[str, np.ndarray], leader: dict[str, np.ndarray], weights: dict[str, float],
              leader_a: dict[str, float], k: float, noise_var: float | None,
              stay_a: dict[str, float] | None = None) -> tuple[bool, str, dict]:
    """(move?, reason, figures) for the safe rule; noise_var is s1^2 or None when not measured;
    stay_a: the adapter weights `stay` was scored with (default a_old = 1)."""
    s_obj, l_obj = weighted(stay, weights), weighted(leader, weights)
    se_eval = paired_se(leader, stay, weights)
    se_adapter = math.sqrt(noise_var * difference_var_factor(leader_a, stay_a)) if noise_var is not None else 0.0
    se = math.sqrt(se_eval**2 + se_adapter**2)
    gain = s_obj - l_obj
    figures = {"stay_objective": s_obj, "leader_objective": l_obj, "se": se, "se_eval": se_eval,
               "se_adapter": se_adapter if noise_var is not None else None}
    noise = "eval + adapter noise" if noise_var is not None else "eval noise only (no replicate adapter)"
    if gain > k * se:
        return True, f"leader beats stay by {gain:.4f} > {k:g} x SE {se:.4f} ({noise})", figures
    return False, f"leader's gain {gain:.4f} is within {k:g} x SE {se:.4f} ({noise}): keeping the current mixture", figures
