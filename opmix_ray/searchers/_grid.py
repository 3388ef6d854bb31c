"""A simplex lattice {n / m : n_i >= 0 integers, sum n = m}, for few coordinates.

The lattice has C(m + k - 1, k - 1) points, so it is only sensible for small k (5 coordinates at
m = 4 is 70 points; 7 at m = 2 is 28). With resolution=None the finest m whose lattice fits in
max_points is used. On a constrained space the lattice is over the free coordinates and mapped
onto the bounds by the space (fixed values and lower bounds added, caps redistributed; on a
PolytopeSimplex feasible lattice points stay put and the others move towards its centre onto the
boundary), with duplicates dropped. Order is a seeded shuffle so a budget smaller than the lattice
still covers it evenly instead of sweeping one corner; then FINISHED.
"""
from __future__ import annotations

import math
from itertools import combinations

import numpy as np
from ray.tune.search import Searcher

from opmix_ray.searchers.base import METRIC, MODE, MixtureSearcher, SearcherError


def simplex_lattice(k: int, m: int) -> np.ndarray:
    """Every point n / m with n in N^k, sum n = m (stars and bars), shape [C(m+k-1, k-1), k]."""
    pts = []
    for bars in combinations(range(m + k - 1), k - 1):
        edges = (-1, *bars, m + k - 1)
        pts.append([edges[i + 1] - edges[i] - 1 for i in range(k)])
    return np.asarray(pts, dtype=np.float64) / m


class GridSimplexSearcher(MixtureSearcher):
    def __init__(self, *, space, seed: int = 0, points_to_evaluate=None, resolution: int | None = None,
                 max_points: int = 100,
                 metric: str = METRIC, mode: str = MODE):
        super().__init__(space=space, seed=seed, points_to_evaluate=points_to_evaluate, metric=metric, mode=mode)
        k = len(space.free_coords)  # a lattice over the free coordinates, mapped onto the bounds
        if resolution is None:
            resolution = 1
            while math.comb(resolution + k, k - 1) <= max_points:
                resolution += 1
        if resolution < 1:
            raise SearcherError(f"grid resolution {resolution} (fix: use an integer >= 1)")
        pts, seen = [], set()
        for v in simplex_lattice(k, resolution):
            w = space.from_free(v)
            key = tuple(np.round(w, 9))
            if key not in seen and space.contains(w, tol=1e-9):  # caps can map lattice points together
                seen.add(key)
                pts.append(w)
        if not pts:
            raise SearcherError(f"no lattice point of resolution {resolution} fits the space "
                                "(fix: raise search resolution or use another searcher)")
        order = np.random.default_rng(self.seed).permutation(len(pts))
        self.points = [pts[i].tolist() for i in order]
        self.next = 0

    def propose(self, trial_id: str):
        if self.next >= len(self.points):
            return Searcher.FINISHED
        self.next += 1
        return self.points[self.next - 1]

    def state(self) -> dict:
        return {"next": self.next}  # the points themselves are rebuilt from (space, seed, resolution)

    def load_state(self, state: dict) -> None:
        self.next = state["next"]
