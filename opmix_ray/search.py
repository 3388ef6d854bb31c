"""One round's search: a Ray Tune Tuner whose trials merge the adapters and score the result.

A candidate is a weight vector a over the adapters ({old, d_1..d_k}); a trial sets the model's
adapted weights to W0 + sum_i a_i * delta_i (merge.py), measures per-domain validation loss and
reports the objective plus the mixture a stands for, E(a)[d] = a_old * p_d + a_d. The base
weights, the stacked deltas and the validation windows go into the object store once
(tune.with_parameters) and each reused trial actor builds its model once per round.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray
import torch
from ray import tune
from ray.tune.search import ConcurrencyLimiter
from transformers import AutoConfig, AutoModelForCausalLM

from opmix_ray.config import Config
from opmix_ray.evaluate import domain_losses, objective
from opmix_ray.merge import MergedModel, load_lora_delta, stack_deltas
from opmix_ray.mixture import Mixture, expand_collapsed
from opmix_ray.model import load_checkpoint, set_threads
from opmix_ray.searchers import METRIC, MODE, create_searcher
from search_spaces import SimplexSpace

TRIAL_RETRIES = 2  # reruns of a trial whose process died, before it counts as failed
_CACHE: dict = {}  # per trial-actor process: round key -> MergedModel (reuse_actors=True keeps it)


@dataclass
class Candidates:
    """Everything a trial needs, shared through the object store."""
    key: str
    coords: tuple[str, ...]
    model_config: dict
    base_state: dict[str, np.ndarray]
    stacked: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    current: Mixture
    objective_weights: dict[str, float] | None
    max_tokens: int | None


def build_candidates(cfg: Config, key: str, base_path: str, adapter_dirs: dict[str, str], shards,
                     current: Mixture) -> Candidates:
    model = load_checkpoint(base_path)
    coords = tuple(adapter_dirs)
    stacked = stack_deltas([load_lora_delta(adapter_dirs[c]) for c in coords])
    base_state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return Candidates(key, coords, model.config.to_dict(), base_state, stacked, shards.val, current,
                      objective_weights(cfg, shards), cfg.search.eval_tokens_per_domain)


def objective_weights(cfg: Config, shards) -> dict[str, float]:
    """The configured objective, or the mean over the training domains (never eval-only ones)."""
    return dict(cfg.search.objective_weights or {d: 1.0 for d in shards.domains})


def candidate_mixture(c: Candidates, a: np.ndarray) -> Mixture:
    """The mixture over domains that adapter weights `a` stand for."""
    named = dict(zip(c.coords, a))
    return expand_collapsed(named.get("old", 0.0), [named.get(d, 0.0) for d in c.current.domains], c.current)


def _merged_model(c: Candidates) -> MergedModel:
    if c.key not in _CACHE:
        _CACHE.clear()
        conf = AutoConfig.for_model(**c.model_config)
        model = AutoModelForCausalLM.from_config(conf)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in c.base_state.items()}, strict=True)
        _CACHE[c.key] = MergedModel(model.eval(), c.stacked)
    return _CACHE[c.key]


def score(c: Candidates, a: np.ndarray) -> dict:
    """Merge with weights a, evaluate, return the trial's metrics."""
    mm = _merged_model(c)
    mm.apply(a)
    losses = domain_losses(mm.model, c.val, max_tokens=c.max_tokens)
    mix = candidate_mixture(c, a)
    return {METRIC: objective(losses, c.objective_weights), **{f"loss_{d}": v for d, v in losses.items()},
            **{f"mix_{d}": w for d, w in mix.as_dict().items()}, **{f"a_{k}": float(x) for k, x in zip(c.coords, a)}}


def merged_trial(config: dict, candidates: Candidates, cpus: float) -> None:
    """The Tune trainable: one candidate, one merge, one evaluation."""
    set_threads(cpus)
    a = SimplexSpace(candidates.coords).weights(config)
    tune.report({**score(candidates, a), "node_id": ray.get_runtime_context().get_node_id()})


class _RetryCounter(tune.Callback):
    """Counts trial reruns after a worker died, so a round's record can say how many it took."""

    def __init__(self):
        self.n = 0

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.n += 1


@dataclass
class SearchOutcome:
    mixture: Mixture
    weights: dict[str, float]
    objective: float
    losses: dict[str, float]
    n_trials: int
    n_failed: int
    wall_s: float
    trials: list[dict]
    n_retried: int = 0  # trial reruns after a worker died (FailureConfig)


def run_search(cfg: Config, candidates: Candidates, round_idx: int, run_dir: str) -> SearchOutcome:
    t0 = time.time()
    space = SimplexSpace(candidates.coords)
    uniform = np.full(len(space.coords), 1.0 / len(space.coords))
    # objective_weights: the mixing law proposes for the objective's per-domain weights; a searcher
    # whose __init__ does not take it is built without it (searchers/__init__.py CONTEXT_KWARGS).
    searcher = create_searcher(cfg.search.searcher, space=space, seed=cfg.run.seed * 1000 + round_idx,
                               points_to_evaluate=[uniform] if cfg.search.warm_start else None,
                               objective_weights=candidates.objective_weights, **cfg.search.searcher_options)
    searcher = ConcurrencyLimiter(searcher, max_concurrent=cfg.search.max_concurrent)
    trainable = tune.with_parameters(merged_trial, candidates=candidates, cpus=cfg.search.cpus_per_trial)
    trainable = tune.with_resources(trainable, {"cpu": cfg.search.cpus_per_trial})
    retries = _RetryCounter()
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, metric=METRIC, mode=MODE, reuse_actors=True,
                                    num_samples=cfg.search.num_samples),
        # A trial whose worker dies (OOM kill, node lost, kill -9) is rerun on a fresh actor: a
        # trial is one merge + one eval, so a retry is cheap and the candidate is not lost. A NaN
        # objective is no error and is not retried: the searcher records it failed (base.py).
        run_config=tune.RunConfig(storage_path=run_dir, name=f"search_round_{round_idx}", verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES),
                                  callbacks=[retries]),
    )
    grid = tuner.fit()
    trials = [r.metrics for r in grid if r.metrics and np.isfinite(r.metrics.get(METRIC, np.nan))]
    if not trials:
        raise RuntimeError(f"round {round_idx}: every search trial failed (fix: see the trial errors in "
                           f"{run_dir}/search_round_{round_idx})")
    best = min(trials, key=lambda m: m[METRIC])
    doms = candidates.current.domains
    weights = {k: best[f"a_{k}"] for k in candidates.coords}
    mixture = Mixture.normalised(doms, [best[f"mix_{d}"] for d in doms], candidates.current.data_hash)
    keep = lambda m: {k: v for k, v in m.items() if k in (METRIC, "node_id") or k[:2] in ("lo", "mi", "a_")}
    return SearchOutcome(mixture, weights, float(best[METRIC]), {k[5:]: v for k, v in best.items() if k.startswith("loss_")},
                         len(grid), len(grid) - len(trials), time.time() - t0, [keep(m) for m in trials],
                         retries.n)
