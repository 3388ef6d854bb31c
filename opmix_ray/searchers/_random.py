"""Uniform random mixtures (Dirichlet(1) through the simplex space), seeded and resumable."""
from __future__ import annotations

import numpy as np
from ray.tune.search import Searcher

from opmix_ray.searchers.base import METRIC, MODE


class RandomSimplexSearcher(Searcher):
    def __init__(self, *, space, seed: int = 0, points_to_evaluate=None):
        super().__init__(metric=METRIC, mode=MODE)
        self.space, self.seed, self.n = space, seed, 0
        self.queue = [space.params(w) for w in (points_to_evaluate or [])]

    def suggest(self, trial_id: str):
        if self.queue:
            return dict(self.queue.pop(0))
        rng = np.random.default_rng([self.seed, self.n])  # draw n depends only on (seed, n): resumable
        self.n += 1
        return self.space.sample(rng)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        pass

    def get_state(self) -> dict:
        return {"seed": self.seed, "n": self.n, "queue": list(self.queue)}

    def set_state(self, state: dict) -> None:
        self.seed, self.n, self.queue = state["seed"], state["n"], list(state["queue"])

    def save(self, checkpoint_path: str):
        import json
        from opmix_ray.storage import atomic_write_bytes
        atomic_write_bytes(checkpoint_path, json.dumps(self.get_state()).encode())

    def restore(self, checkpoint_path: str):
        import json
        with open(checkpoint_path) as f:
            self.set_state(json.load(f))
