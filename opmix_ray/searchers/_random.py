"""Uniform random mixtures: Dirichlet(1) through the space's own sampler, seeded and resumable."""
from __future__ import annotations

from opmix_ray.searchers.base import MixtureSearcher


class RandomSimplexSearcher(MixtureSearcher):
    """Draw n depends only on (seed, n), so a restored searcher continues the same sequence."""

    def propose(self, trial_id: str):
        return self.space.weights(self.space.sample(self.rng(self.n_suggested)))
