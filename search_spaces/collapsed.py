"""The collapsed "old" coordinate: OP-Mix's mixture reuse, and the one place its expand is written.

The "old" adapter is trained on the current mixture p, so a candidate a over ("old", d_1..d_k) stands
for the mixture E(a)[d] = a_old * p_d + a_d (normalised): old carries every domain in the current
proportions, and each searched domain's own coordinate adds to it. A domain without a coordinate
is reached only through old. A repetition cap on E is then a_old * p_d + a_d <= cap_d: a general
linear row, not a box, so CollapsedSpace is a PolytopeSimplex.

    space = CollapsedSpace({"python": .75, "fortunes": .25}, ("old", "python", "fortunes"), {"fortunes": .1})
    a = space.weights(space.sample(rng))      # over (old, python, fortunes), sums to 1
    space.expand(a)                           # {"python": ..., "fortunes": <= .1}
"""
from __future__ import annotations

import numpy as np

from search_spaces.polytope import PolytopeSimplex

OLD = "old"


def expand(coords, a, current: dict[str, float]) -> dict[str, float]:
    """E(a)[d] = a_old * p_d + a_d over the domains of `current` (p = current normalised), normalised."""
    named = dict(zip(tuple(coords), np.asarray(a, dtype=np.float64)))
    unknown = sorted(c for c in named if c != OLD and c not in current)
    if unknown:
        raise ValueError(f"coordinates {unknown} are not domains of the current mixture (fix: search "
                         f"'{OLD}' and domains of {sorted(current)})")
    p = np.array([max(0.0, float(w)) for w in current.values()])
    p_sum = p.sum()
    e = named.get(OLD, 0.0) * (p / p_sum if p_sum > 0 else p) + np.array([named.get(d, 0.0) for d in current])
    total = e.sum()
    if not (np.all(np.isfinite(e)) and np.all(e >= 0) and total > 0):
        raise ValueError(f"a={dict(named)} gives no mixture over {list(current)} (fix: weights >= 0, some on a "
                         "domain or on old with a current mixture that has weight)")
    return {d: float(x / total) for d, x in zip(current, e)}


def cap_constraints(coords, current: dict[str, float], caps_share: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Rows a_old * p_d + a_d <= caps_share[d] over `coords`, p = current normalised to sum 1.

    A domain without its own coordinate is reached only through old (a_old * p_d <= cap_d); a cap
    >= 1 binds nothing and a domain that neither old nor a coordinate can give weight to cannot
    exceed its cap, so neither gets a row (fewer rows, same polytope)."""
    coords = tuple(coords)
    p_sum = sum(max(0.0, float(x)) for x in current.values())
    if OLD in coords and not p_sum > 0:
        raise ValueError(f"current mixture {current} has no weight (fix: pass the mixture '{OLD}' stands for)")
    rows, rhs = [], []
    for d, cap in caps_share.items():
        if not 0.0 <= float(cap):
            raise ValueError(f"cap for '{d}' is {cap} (fix: caps are shares in [0, 1])")
        if d == OLD:
            raise ValueError(f"a cap names '{OLD}' (fix: cap domains; '{OLD}' is the collapsed coordinate)")
        if cap >= 1.0:
            continue
        row = np.zeros(len(coords))
        if OLD in coords:
            row[coords.index(OLD)] = max(0.0, float(current.get(d, 0.0))) / p_sum
        if d in coords:
            row[coords.index(d)] += 1.0
        if row.any():
            rows.append(row)
            rhs.append(float(cap))
    return np.array(rows, dtype=np.float64).reshape(-1, len(coords)), np.array(rhs, dtype=np.float64)


class CollapsedSpace(PolytopeSimplex):
    """{old} + searched domains (`coords`, in any order), cut by the caps on the mixture each point
    stands for."""

    def __init__(self, current: dict[str, float], coords, caps_share: dict[str, float] | None = None):
        coords = tuple(coords)
        if OLD in current or OLD not in coords:
            raise ValueError(f"coords {coords} over domains {sorted(current)} (fix: coords include '{OLD}', "
                             f"and no domain is named '{OLD}')")
        unknown = sorted(d for d in coords if d != OLD and d not in current)
        if unknown:
            raise ValueError(f"searched domains {unknown} are not in the current mixture {sorted(current)} "
                             "(fix: give every run domain a weight in `current`, 0 for a new one)")
        self.current = dict(current)
        super().__init__(coords, *cap_constraints(coords, self.current, caps_share or {}))

    def expand(self, a) -> dict[str, float]:
        """Coordinate weights -> the mixture over every domain of `current`."""
        return expand(self.coords, a, self.current)
