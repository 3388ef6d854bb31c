"""What every baseline shares: the run's data and config, the usage bounds, the proxy swarm."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from opmix_ray.experiments.experiment_config import ExperimentConfig
from opmix_ray.evaluate import objective
from opmix_ray.mixture import Mixture


@dataclass
class BaselineResult:
    method: str
    mixture: Mixture
    search_flops: float
    search_wall_s: float
    info: dict = field(default_factory=dict)


def usage_upper_bounds(cfg: ExperimentConfig, shards) -> np.ndarray:
    """Per-domain weight ceiling: RegMix's min(15 p_i, 1) and the repetition cap at the main budget."""
    p = shards.natural().as_array()
    caps = shards.cap_tokens(cfg)
    cap_share = np.array([caps[d] / cfg.main.total_tokens for d in shards.domains])
    return np.minimum(np.minimum(15.0 * p, 1.0), cap_share)


@dataclass
class Swarm:
    """Proxy runs from scratch on sampled mixtures: A [n, k] weights, per-run val losses."""
    A: np.ndarray
    losses: list[dict[str, float]]
    flops: float
    wall_s: float

    def targets(self, weights: dict[str, float]) -> np.ndarray:
        return np.array([objective(row, weights) for row in self.losses])


def sample_swarm_mixtures(p: np.ndarray, upper: np.ndarray, n: int, rng: np.random.Generator,
                          max_tries: int = 10_000) -> np.ndarray:
    """RegMix's swarm: Dirichlet(s * p^0.5) with s log-spaced over [0.1, 5], rejecting any w_i > upper_i."""
    prior = np.sqrt(p) / np.sqrt(p).sum()
    out = []
    for s in np.geomspace(0.1, 5.0, n):
        for _ in range(max_tries):
            w = rng.dirichlet(np.maximum(s * prior, 1e-3))
            if np.all(w <= upper + 1e-12):
                break
        else:  # every draw broke a bound: keep the last, pushed under the bounds
            w = _clip_to_bounds(w, upper)
        out.append(w)
    return np.array(out)


def _clip_to_bounds(w: np.ndarray, upper: np.ndarray) -> np.ndarray:
    for _ in range(100):
        w = np.minimum(w, upper)
        slack = upper - w
        short = 1.0 - w.sum()
        if short <= 1e-12:
            break
        w = w + short * slack / slack.sum()
    return w / w.sum()


class BaselineContext:
    """One seed's data and config; runs the proxy swarm once and shares it (regmix, olmix)."""

    def __init__(self, cfg: ExperimentConfig, shards, storage_path: str):
        self.cfg, self.shards, self.storage_path = cfg, shards, storage_path
        self.seed = cfg.run.seed
        self._swarm: Swarm | None = None

    def rng(self, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, salt])

    def proxy_job(self, weights: np.ndarray, tokens: int | None = None, **labels):
        """A proxy run (bench.proxy_model for bench.proxy_tokens) on fixed weights, as a FixedJob."""
        from opmix_ray.training import fixed_job
        return fixed_job(self.cfg, self.seed, self.shards, weights, tokens=tokens or self.cfg.bench.proxy_tokens,
                         model=self.cfg.bench.proxy_model, **labels)

    @property
    def swarm(self) -> Swarm:
        if self._swarm is None:
            from opmix_ray.training import run_fixed_jobs
            t0 = time.time()
            b = self.cfg.bench
            A = sample_swarm_mixtures(self.shards.natural().as_array(), usage_upper_bounds(self.cfg, self.shards),
                                      b.swarm_size, self.rng(1))
            rows = run_fixed_jobs([self.proxy_job(w, proxy=i) for i, w in enumerate(A)], self.shards,
                                  self.storage_path, "swarm", b.max_concurrent)
            self._swarm = Swarm(A, [r["val_loss"] for r in rows], sum(r["flops"] for r in rows), time.time() - t0)
        return self._swarm
