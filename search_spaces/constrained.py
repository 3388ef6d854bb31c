"""Constrained simplices: per-coordinate bounds, repetition caps and fixed coordinates.

Every space here has SimplexSpace's contract (`coords`, `param_names`, `weights(config)`,
`params(w)`, `sample(rng)`, `optuna_define_by_run`, `optuna_distributions`, `tune_param_space`,
`lower`, `upper`, `A_ub`, `b_ub`, `contains`), so a searcher written against one works on all of them.

Sampling never rejects. A point u of the box maps to v = Dirichlet(1) over the free coordinates
(SimplexSpace), then to w_F = l_F + r * cap(v) where r is the mass left after fixed values and
lower bounds, and cap() clips each coordinate at its room (u_i - l_i) / r and hands the excess to
the unclipped ones in proportion (the same rule the sampler applies to a capped domain). The map
is onto the feasible polytope, each output is feasible by construction (no loop that can starve
at 7+ domains), and a feasible w maps back exactly (`params`), which warm starts rely on.

    space = ConstrainedSimplex(("python", "bible", "fortunes"), lower={"python": 0.1},
                               upper=repetition_caps({"fortunes": 2e5}, 4, 1e6), fixed=None)
    space.weights(space.sample(rng))          # every entry within its bounds, summing to 1
"""
from __future__ import annotations

import numpy as np

from search_spaces.simplex import NoLinearRows, SearchedThroughBase, SimplexSpace, project_to_box_simplex

_TOL = 1e-9


def repetition_caps(available_tokens: dict[str, float], max_epochs: dict[str, float] | float,
                    tokens_to_train: float) -> dict[str, float]:
    """Upper bound per domain: a domain cannot supply more than available x max_epochs tokens
    of the tokens_to_train the mixture will be trained on. Caps >= 1 bind nothing and are kept 1."""
    if not tokens_to_train > 0:
        raise ValueError(f"tokens_to_train={tokens_to_train} (fix: pass the positive token budget)")
    out = {}
    for d, n in available_tokens.items():
        ep = max_epochs.get(d) if isinstance(max_epochs, dict) else max_epochs
        if ep is None or not ep > 0 or not n >= 0:
            raise ValueError(f"cap for '{d}': available={n}, max_epochs={ep} (fix: tokens >= 0, epochs > 0)")
        out[d] = float(min(1.0, n * ep / tokens_to_train))
    return out


def capped_proportional(v: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """v on the simplex -> the point that clips v_i at caps_i and gives the excess to the unclipped
    coordinates in proportion to v (uniformly if they are all 0). Needs sum(caps) >= 1.

    Terminates in <= k passes: each pass clips at least one more coordinate, and the mass left for
    the unclipped ones never goes negative (a clipped value is below what it was offered)."""
    v = np.asarray(v, dtype=np.float64)
    clipped = np.zeros(len(v), dtype=bool)
    w = v.copy()
    for _ in range(len(v) + 1):
        over = (~clipped) & (w > caps + 1e-12)
        if not over.any():
            break
        clipped |= over
        left = 1.0 - caps[clipped].sum()
        free = ~clipped
        base = v[free] if v[free].sum() > 0 else np.ones(free.sum())
        w = np.where(clipped, caps, 0.0)
        if free.any():
            w[free] = max(left, 0.0) * base / base.sum()
    return w


class ConstrainedSimplex(SearchedThroughBase, NoLinearRows):
    """{w : sum w = 1, lower <= w <= upper, w_c = fixed_c}, searched over the free coordinates."""

    def __init__(self, coords, lower: dict | None = None, upper: dict | None = None,
                 fixed: dict | None = None):
        self.coords = tuple(coords)
        if len(set(self.coords)) != len(self.coords):
            raise ValueError(f"simplex coordinates {self.coords}: need distinct names")
        lower, upper, fixed = dict(lower or {}), dict(upper or {}), dict(fixed or {})
        unknown = sorted(set(lower) | set(upper) | set(fixed) - set(self.coords))
        unknown = [c for c in unknown if c not in self.coords]
        if unknown:
            raise ValueError(f"bounds name unknown coordinates {unknown} (fix: use names from {self.coords})")
        self.fixed = {c: float(x) for c, x in fixed.items()}
        self.free = tuple(c for c in self.coords if c not in self.fixed)
        if len(self.free) < 2:
            raise ValueError(f"only {len(self.free)} free coordinate(s) in {self.coords} (fix: fix fewer "
                             "coordinates; with one free coordinate there is nothing to search)")
        self.lower = np.array([self.fixed.get(c, lower.get(c, 0.0)) for c in self.coords], dtype=np.float64)
        self.upper = np.array([self.fixed.get(c, upper.get(c, 1.0)) for c in self.coords], dtype=np.float64)
        bad = [c for c, lo, hi in zip(self.coords, self.lower, self.upper)
               if not (0.0 <= lo <= hi <= 1.0 + _TOL)]
        if bad:
            raise ValueError(f"bounds of {bad} are not 0 <= lower <= upper <= 1 (fix: correct them)")
        if self.lower.sum() > 1 + _TOL or self.upper.sum() < 1 - _TOL:
            raise ValueError(f"no mixture fits: lower bounds sum to {self.lower.sum():.4g} and upper bounds to "
                             f"{self.upper.sum():.4g} (fix: lower sum must be <= 1 <= upper sum; relax a "
                             "repetition cap or a fixed weight)")
        self._fi = np.array([self.coords.index(c) for c in self.free])
        self._base = SimplexSpace(self.free)
        self._room = max(0.0, 1.0 - self.lower.sum())  # mass to spread above the lower bounds
        span = self.upper[self._fi] - self.lower[self._fi]
        self._caps = span / self._room if self._room > _TOL else np.ones(len(self.free))

    # --- the SimplexSpace contract ---
    @property
    def free_coords(self) -> tuple[str, ...]:
        return self.free

    def from_free(self, v) -> np.ndarray:
        """A point v of the simplex over the free coordinates -> the feasible mixture it maps to."""
        return self._from_free_simplex(np.asarray(v, dtype=np.float64))

    def _from_free_simplex(self, v: np.ndarray) -> np.ndarray:
        w = self.lower.copy()
        if self._room > _TOL:
            w[self._fi] += self._room * capped_proportional(v, self._caps)
        return w

    def weights(self, config: dict) -> np.ndarray:
        """A trial config (u_<free> keys, or w_<c> for every coordinate) -> a feasible mixture."""
        if all(f"w_{c}" in config for c in self.coords):
            w = SimplexSpace(self.coords).weights(config)  # validates and normalises
            if not self.contains(w, tol=1e-6):
                raise ValueError(f"suggested weights {np.round(w, 6).tolist()} are outside the bounds "
                                 f"{self.bounds()} (fix: suggest through space.params or space.sample)")
            return w
        return self._from_free_simplex(self._base.weights(config))

    def params(self, weights) -> dict[str, float]:
        """Inverse of weights() for a feasible w: u for the free part (w_F - l_F) / r."""
        w = np.asarray(weights, dtype=np.float64)
        if not self.contains(w, tol=1e-6):
            raise ValueError(f"weights {np.round(w, 6).tolist()} are outside the bounds {self.bounds()} "
                             "(fix: warm-start from a feasible mixture, e.g. space.project(w))")
        v = (w[self._fi] - self.lower[self._fi]) / self._room if self._room > _TOL else np.ones(len(self.free))
        v = np.clip(v, 0.0, None)
        return self._base.params(v if v.sum() > 0 else np.ones(len(self.free)))

    def contains(self, w, tol: float = 1e-9) -> bool:
        w = np.asarray(w, dtype=np.float64)
        return bool(w.shape == (len(self.coords),) and np.all(np.isfinite(w)) and abs(w.sum() - 1) <= tol
                    and np.all(w >= self.lower - tol) and np.all(w <= self.upper + tol))

    def project(self, w) -> np.ndarray:
        """The nearest feasible point (Euclidean) to any w. Used to make a warm start or a proposal
        feasible."""
        return project_to_box_simplex(w, self.lower, self.upper)

    def bounds(self) -> dict[str, tuple[float, float]]:
        return {c: (round(float(lo), 6), round(float(hi), 6)) for c, lo, hi in zip(self.coords, self.lower, self.upper)}
