"""A complete custom searcher: random exploration, then local search around the best mixture.

Select it from YAML without touching the package (run from the directory holding examples/):

    search:
      searcher: examples.my_searcher:MySearcher
      searcher_options: {n_explore: 6, concentration: 40.0}

The base class (opmix_ray.searchers.MixtureSearcher) checks every suggestion is on the space,
plays warm-start points first, turns NaN / inf / missing results into failed trials (value None),
and saves / restores `history` as JSON, so this class keeps no state of its own.
"""
from __future__ import annotations

import numpy as np

from opmix_ray.searchers import MixtureSearcher


class MySearcher(MixtureSearcher):
    def __init__(self, *, space, seed=0, points_to_evaluate=None, n_explore: int = 6,
                 concentration: float = 40.0):
        super().__init__(space=space, seed=seed, points_to_evaluate=points_to_evaluate)
        self.n_explore, self.concentration = n_explore, concentration

    def propose(self, trial_id):
        # rng(n) depends only on (seed, n): a restored searcher makes the same draws.
        rng = self.rng(self.n_suggested)
        weights, values = self.completed()  # successful trials only
        if len(values) < self.n_explore:
            return self.space.weights(self.space.sample(rng))  # uniform on the (constrained) simplex
        best = weights[np.argmin(values)]
        # Dirichlet centred on the best mixture; larger concentration = smaller steps.
        w = rng.dirichlet(self.concentration * best + 0.5)
        return self.space.project(w)  # back inside bounds / caps if the space has any

    def observe(self, trial_id, weights, value, result):
        pass  # everything needed is already in self.history
