"""The simplex cut by linear inequalities A_ub @ a <= b_ub, which ConstrainedSimplex's boxes cannot
express: repetition caps on the mixture a collapsed candidate stands for (collapsed.py builds them).

Sampling never rejects (rejection starves when the caps leave a sliver of the simplex). A point u of
the box maps to v on the plain simplex (SimplexSpace); a feasible v is kept as it is, an infeasible
one goes to its nearest feasible point (the Euclidean projection, a small QP). So the map is onto,
params(w) is SimplexSpace.params(w) for a feasible w (warm starts rely on it), and a draw keeps
the direction it had: a v that leans on one domain still leans on it after the caps cut the
others. (Pulling every infeasible v straight towards one interior point instead makes most draws
land near that point once a cap is tight: with a 1.4% cap left on one domain, 2,000 draws averaged
92% on whichever domain the interior point favoured.) The interior point c, used to start the
projection and to absorb the solver's last 1e-10, is the point nearest the simplex's barycentre
among those with at least half the largest possible slack on every row.

    A, b = cap_constraints(("old", "python", "fortunes"), {"python": .75, "fortunes": .25}, {"fortunes": .1})
    space = PolytopeSimplex(("old", "python", "fortunes"), A, b)
    space.weights(space.sample(rng))          # sums to 1, and a_old * .25 + a_fortunes <= .1

A weight fixed by lower == upper leaves no interior: every point then maps to c, so fix coordinates
with ConstrainedSimplex instead.
"""
from __future__ import annotations

import numpy as np

from search_spaces.simplex import SearchedThroughBase, SimplexSpace

_TOL = 1e-9

class PolytopeSimplex(SearchedThroughBase):
    """{a : sum a = 1, lower <= a <= upper, A_ub @ a <= b_ub}, searched through the plain simplex."""

    def __init__(self, coords, A_ub, b_ub, lower: dict | None = None, upper: dict | None = None):
        self.coords = tuple(coords)
        k = len(self.coords)
        self._base = SimplexSpace(self.coords)  # checks >= 2 distinct names
        lower, upper = dict(lower or {}), dict(upper or {})
        unknown = sorted(c for c in set(lower) | set(upper) if c not in self.coords)
        if unknown:
            raise ValueError(f"bounds name unknown coordinates {unknown} (fix: use names from {self.coords})")
        self.A_ub = np.array(A_ub, dtype=np.float64).reshape(-1, k) if np.size(A_ub) else np.zeros((0, k))
        self.b_ub = np.array(b_ub, dtype=np.float64).reshape(-1)
        if len(self.b_ub) != len(self.A_ub) or not (np.all(np.isfinite(self.A_ub)) and np.all(np.isfinite(self.b_ub))):
            raise ValueError(f"A_ub {self.A_ub.shape} and b_ub {self.b_ub.shape} (fix: finite, shapes [m, {k}] "
                             "and [m], one column per coordinate)")
        self.lower = np.array([lower.get(c, 0.0) for c in self.coords], dtype=np.float64)
        self.upper = np.array([upper.get(c, 1.0) for c in self.coords], dtype=np.float64)
        bad = [c for c, lo, hi in zip(self.coords, self.lower, self.upper) if not 0.0 <= lo <= hi <= 1.0 + _TOL]
        if bad:
            raise ValueError(f"bounds of {bad} are not 0 <= lower <= upper <= 1 (fix: correct them)")
        # Every inequality as one system G a <= h, for the step rule and the centre; all-zero rows bind
        # nothing (or nothing fits, which the centre's LP reports).
        live = np.abs(self.A_ub).sum(axis=1) > 0
        if np.any(self.b_ub[~live] < -_TOL):
            raise ValueError("a constraint row is 0 <= negative (fix: drop it or correct its b_ub)")
        eye = np.eye(k)
        self._G = np.vstack([self.A_ub[live], -eye, eye])
        self._h = np.concatenate([self.b_ub[live], -self.lower, self.upper])
        self.centre = self._centre()
        self._slack = np.maximum(self._h - self._G @ self.centre, 0.0)

    def _centre(self) -> np.ndarray:
        """An interior point: the largest smallest (row-normalised) slack s* by one LP, then, among the
        points with slack >= s*/2 on every row, the one nearest the barycentre (an LP optimum alone is
        a vertex of the slack polytope and may put nearly all weight on one coordinate). Rows stay
        strict there when the polytope has an interior, so the step t of _pull_in is > 0."""
        from scipy.optimize import linprog, minimize

        k = len(self.coords)
        norm = np.linalg.norm(self._G, axis=1)
        A = np.hstack([self._G, norm[:, None]])  # G a + s * |g| <= h
        A_eq = np.hstack([np.ones((1, k)), np.zeros((1, 1))])
        res = linprog(np.r_[np.zeros(k), -1.0], A_ub=A, b_ub=self._h, A_eq=A_eq, b_eq=[1.0],
                      bounds=[(None, None)] * k + [(0.0, 1.0)], method="highs")
        if res.status != 0:
            raise ValueError(f"no mixture fits: the caps A_ub @ a <= b_ub {np.round(self.b_ub, 4).tolist()} and "
                             f"bounds {self.bounds()} leave nothing of the simplex (fix: relax the tightest "
                             "repetition cap or lower bound, or train on more tokens per capped domain)")
        vertex = np.clip(res.x[:k], self.lower, self.upper)
        h = self._h - 0.5 * res.x[k] * norm
        bary = np.full(k, 1.0 / k)
        qp = minimize(lambda x: (float(np.sum((x - bary) ** 2)), 2.0 * (x - bary)), vertex / vertex.sum(), jac=True,
                      method="SLSQP", constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1.0,
                                                    "jac": lambda x: np.ones_like(x)},
                                                   {"type": "ineq", "fun": lambda x: h - self._G @ x,
                                                    "jac": lambda x: -self._G}],
                      options={"maxiter": 500, "ftol": 1e-14})
        c = qp.x if qp.success and np.all(self._G @ qp.x <= self._h - 0.25 * res.x[k] * norm) else vertex
        c = np.clip(c, self.lower, self.upper)
        return c / c.sum()

    def _map(self, v: np.ndarray) -> np.ndarray:
        """A point of the plain simplex -> itself when feasible, else its nearest feasible point."""
        return v if self.contains(v, tol=1e-12) else self.project(v)

    def _pull_in(self, v: np.ndarray) -> np.ndarray:
        """v on the hyperplane sum = 1 -> centre + t (v - centre), largest t in [0, 1] keeping every row."""
        d = v - self.centre
        rate = self._G @ d
        up = rate > 1e-15
        t = min(1.0, float(np.min(self._slack[up] / rate[up]))) if up.any() else 1.0
        return self.centre + max(t, 0.0) * d

    # --- the SimplexSpace contract ---
    @property
    def free_coords(self) -> tuple[str, ...]:
        return self.coords

    def from_free(self, v) -> np.ndarray:
        """A point of the plain simplex (e.g. a grid lattice point) -> the feasible point it maps to."""
        v = np.asarray(v, dtype=np.float64)
        return self._map(v / v.sum())

    def weights(self, config: dict) -> np.ndarray:
        """A trial config (u_<c> keys, or w_<c> for every coordinate) -> a feasible mixture."""
        if all(f"w_{c}" in config for c in self.coords):
            w = self._base.weights(config)  # validates and normalises
            if not self.contains(w, tol=1e-6):
                raise ValueError(f"suggested weights {np.round(w, 6).tolist()} break the constraints "
                                 "(fix: suggest through space.params or space.sample)")
            return w
        return self._map(self._base.weights(config))

    def params(self, weights) -> dict[str, float]:
        """Inverse of weights() for a feasible w: feasible points map to themselves."""
        w = np.asarray(weights, dtype=np.float64)
        if not self.contains(w, tol=1e-6):
            raise ValueError(f"weights {np.round(w, 6).tolist()} break the constraints "
                             "(fix: warm-start from a feasible mixture, e.g. space.project(w))")
        return self._base.params(np.clip(w, 0.0, None))

    def contains(self, w, tol: float = 1e-9) -> bool:
        w = np.asarray(w, dtype=np.float64)
        return bool(w.shape == (len(self.coords),) and np.all(np.isfinite(w)) and abs(w.sum() - 1) <= tol
                    and np.all(w >= self.lower - tol) and np.all(w <= self.upper + tol)
                    and np.all(self.A_ub @ w <= self.b_ub + tol))

    def project(self, w) -> np.ndarray:
        """The nearest feasible point (Euclidean) to any w, by SLSQP on the small QP. The solver's own
        tolerance can leave a row off by ~1e-10, so its answer is pulled in (t ~ 1 - 1e-10): feasible
        exactly, and as near as the solver got."""
        from scipy.optimize import minimize

        w = np.nan_to_num(np.asarray(w, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        cons = [{"type": "eq", "fun": lambda x: x.sum() - 1.0, "jac": lambda x: np.ones_like(x)}]
        if len(self.A_ub):
            cons.append({"type": "ineq", "fun": lambda x: self.b_ub - self.A_ub @ x, "jac": lambda x: -self.A_ub})
        res = minimize(lambda x: (float(np.sum((x - w) ** 2)), 2.0 * (x - w)), self.centre, jac=True,
                       method="SLSQP", bounds=list(zip(self.lower, self.upper)), constraints=cons,
                       options={"maxiter": 500, "ftol": 1e-15})
        x = np.clip(res.x if np.all(np.isfinite(res.x)) else self.centre, self.lower, self.upper)
        return self._pull_in(x / x.sum() if x.sum() > 0 else self.centre)

    def bounds(self) -> dict[str, tuple[float, float]]:
        return {c: (round(float(lo), 6), round(float(hi), 6)) for c, lo, hi in zip(self.coords, self.lower, self.upper)}
