"""The probability simplex as a search space, by normalised exponentials.

A simplex is not a box: independent uniform weights, renormalised, crowd the centre. Here each
coordinate i gets u_i ~ U(0, 1) and w = e / sum(e) with e_i = -log(u_i); that makes w exactly
Dirichlet(1), uniform on the simplex, so a searcher that samples u uniformly samples mixtures
uniformly, and a model-based one (TPE, GP) searches a box whose every point is a valid mixture.

    space = SimplexSpace(("old", "python", "bible"))
    space.weights({"u_old": .2, "u_python": .5, "u_bible": .9})   # -> array summing to 1
"""
from __future__ import annotations

import math

import numpy as np

_U_MIN = 1e-9  # keeps -log(u) finite


class NoLinearRows:
    """No linear constraints beyond the simplex and the box: zero rows of A_ub @ w <= b_ub, the same
    contract as PolytopeSimplex, so searchers can treat every space as a polytope."""

    coords: tuple[str, ...]

    @property
    def A_ub(self) -> np.ndarray:
        return np.zeros((0, len(self.coords)))

    @property
    def b_ub(self) -> np.ndarray:
        return np.zeros(0)


class SearchedThroughBase:
    """A space whose searchers see the plain simplex `self._base` over its free coordinates: their
    parameters, samples and distributions are the base's; the space maps them onto its feasible set."""

    _base: "SimplexSpace"

    @property
    def param_names(self) -> list[str]:
        return self._base.param_names

    def sample(self, rng: np.random.Generator) -> dict[str, float]:
        return self._base.sample(rng)

    def optuna_distributions(self) -> dict:
        return self._base.optuna_distributions()

    def optuna_define_by_run(self, trial) -> None:
        self._base.optuna_define_by_run(trial)

    def tune_param_space(self) -> dict:
        return self._base.tune_param_space()


class SimplexSpace(NoLinearRows):
    def __init__(self, coords: tuple[str, ...] | list[str]):
        if len(coords) < 2 or len(set(coords)) != len(coords):
            raise ValueError(f"simplex coordinates {coords}: need >= 2 distinct names")
        self.coords = tuple(coords)

    @property
    def param_names(self) -> list[str]:
        return [f"u_{c}" for c in self.coords]

    def weights(self, config: dict) -> np.ndarray:
        """A trial config -> weights on the simplex. Accepts u_<c> (this space) or w_<c> (direct)."""
        if all(f"w_{c}" in config for c in self.coords):
            w = np.array([float(config[f"w_{c}"]) for c in self.coords])
            if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
                raise ValueError(f"suggested weights {w.tolist()} are not a mixture (need finite, >= 0, sum > 0)")
            return w / w.sum()
        u = np.array([float(config[p]) for p in self.param_names])
        e = -np.log(np.clip(u, _U_MIN, 1.0))
        if e.sum() <= 0:  # every u == 1: the limit of equal coordinates
            return np.full(len(self.coords), 1.0 / len(self.coords))
        return e / e.sum()

    def params(self, weights) -> dict[str, float]:
        """Inverse map (a warm-start point): u_i = exp(-k * w_i), so uniform w gives u = 1/e."""
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        return {p: float(math.exp(-len(w) * x)) for p, x in zip(self.param_names, w)}

    def optuna_distributions(self) -> dict:
        from optuna.distributions import FloatDistribution
        return {p: FloatDistribution(_U_MIN, 1.0) for p in self.param_names}

    def optuna_define_by_run(self, trial) -> None:
        for p in self.param_names:
            trial.suggest_float(p, _U_MIN, 1.0)

    def tune_param_space(self) -> dict:
        from ray import tune
        return {p: tune.uniform(_U_MIN, 1.0) for p in self.param_names}

    def sample(self, rng: np.random.Generator) -> dict[str, float]:
        return {p: float(rng.uniform(_U_MIN, 1.0)) for p in self.param_names}

    # Bounds of the plain simplex, so searchers can treat every space alike (see constrained.py).
    @property
    def lower(self) -> np.ndarray:
        return np.zeros(len(self.coords))

    @property
    def upper(self) -> np.ndarray:
        return np.ones(len(self.coords))

    @property
    def free_coords(self) -> tuple[str, ...]:
        return self.coords

    def from_free(self, v) -> np.ndarray:
        """Identity here; a constrained space maps the free coordinates' simplex onto its polytope."""
        v = np.asarray(v, dtype=np.float64)
        return v / v.sum()

    def contains(self, w, tol: float = 1e-9) -> bool:
        w = np.asarray(w, dtype=np.float64)
        return bool(w.shape == (len(self.coords),) and np.all(np.isfinite(w)) and np.all(w >= -tol)
                    and abs(w.sum() - 1) <= tol)

    def project(self, w) -> np.ndarray:
        """Nearest point of the simplex (Euclidean), for proposals that drift off it numerically."""
        k = len(self.coords)
        return project_to_box_simplex(w, np.zeros(k), np.ones(k))


def project_to_box_simplex(w, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """The nearest point (Euclidean) to any w with lower <= x <= upper and sum(x) = 1:
    clip(w + tau, lower, upper), tau by bisection so that it sums to 1."""
    w = np.nan_to_num(np.asarray(w, dtype=np.float64), nan=0.0)
    lo, hi = -1.0 - np.abs(w).max() - 1, 1.0 + np.abs(w).max() + 1
    for _ in range(200):
        tau = 0.5 * (lo + hi)
        s = np.clip(w + tau, lower, upper).sum()
        lo, hi = (tau, hi) if s < 1 else (lo, tau)
    out = np.clip(w + 0.5 * (lo + hi), lower, upper)
    return out / out.sum()
