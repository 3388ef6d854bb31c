"""One round's search: a Ray Tune Tuner whose trials merge the adapters and score the result.

The searcher (searchers/) proposes adapter weights over the round's `Candidates`
(engine/candidates.py); each trial scores one or, with search.candidates_per_trial, several of them
(engine/scoring.py, engine/trial_batch.py), and search.scorer_pool keeps scoring processes alive
across rounds. A trial whose process dies is retried, and one Tune gives up on is scored again
after the search (engine/rerun.py). What the round then pushes is engine/decision.py's call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.search import ConcurrencyLimiter

from opmix_ray import rundir
from opmix_ray.config import Config
from opmix_ray.console import Progress, say
from opmix_ray.engine.candidates import Candidates
from opmix_ray.engine.placement import trial_resources
from opmix_ray.engine.rerun import ActorDeaths, RetryCounter, candidate_records, rescore
from opmix_ray.engine.scoring import candidate_mixture, merged_trial
from opmix_ray.engine.trial_batch import BATCH, ROWS, BatchSearcher, batch_trial, pooled_trial, start_scorers
from opmix_ray.engine.tracking import trial_callbacks
from opmix_ray.mixture import Mixture
from opmix_ray.searchers import METRIC, MODE, TrialResult, create_searcher, journal
from search_spaces import SimplexSpace

TRIAL_RETRIES = 2  # reruns of a trial whose process died, before it counts as failed


class _SearchProgress(tune.Callback):
    """Trials done out of the round's budget and the best objective so far, as one progress line."""

    def __init__(self, round_idx: int, total: int, done: int = 0):
        self.bar, self.n, self.best = Progress(f"round {round_idx} search", total, "trials"), done, float("inf")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        value = last.get(METRIC)
        if value is not None and np.isfinite(value):
            self.best = min(self.best, float(value))
        self.n += len(last.get(ROWS) or trial.config.get(BATCH) or [None])  # candidates, not trials
        self.bar.update(self.n, f"best {self.best:.4f}" if np.isfinite(self.best) else "")

    def on_experiment_end(self, trials, **info):
        self.bar.close()


def warm_starts(cfg: Config, space) -> list[np.ndarray]:
    """Equal adapter weights (projected onto the caps), and under the safe rule stay (a_old = 1) first
    when it is feasible, so the searcher learns from the point the decision compares against."""
    if not cfg.search.warm_start:
        return []
    k = len(space.coords)
    points = [space.project(np.full(k, 1.0 / k)) if not space.contains(np.full(k, 1.0 / k)) else np.full(k, 1.0 / k)]
    if cfg.decision.rule == "safe" and "old" in space.coords:
        stay = np.eye(k)[space.coords.index("old")]
        if space.contains(stay, tol=1e-9):
            points.insert(0, stay)
    return points


def make_searcher(cfg: Config, candidates: Candidates, round_idx: int, warm: bool = True,
                  journal_path: str | None = None):
    """The round's searcher. objective_weights: the mixing law proposes for the objective's per-domain
    weights; journal_path: where an Optuna searcher records its study; a searcher whose __init__
    does not take one of them is built without it (CONTEXT_KWARGS)."""
    space = candidates.space or SimplexSpace(candidates.coords)
    return create_searcher(cfg.search.searcher, space=space, seed=cfg.run.seed * 1000 + round_idx,
                           points_to_evaluate=(warm_starts(cfg, space) or None) if warm else None,
                           objective_weights=candidates.objective_weights, journal_path=journal_path,
                           **cfg.search.searcher_options)


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
    n_rescored: int = 0  # trials whose process died for good, scored again after the search (engine/rerun.py)


def run_search(cfg: Config, candidates: Candidates, round_idx: int, run_dir: str) -> SearchOutcome:
    t0 = time.time()
    journal_path = str(rundir.at(run_dir, rundir.optuna_journal(round_idx)))
    # a round redone on resume: the trials its interrupted search finished count, and are not rerun
    reused = journal.reusable(journal_path, candidates.fingerprint)
    searcher = make_searcher(cfg, candidates, round_idx, journal_path=journal_path)
    if getattr(searcher, "journal_path", None):
        journal.stamp(journal_path, candidates.fingerprint)
    if reused:
        say(f"round {round_idx}: {len(reused)} trials of the interrupted search reused from {journal_path}")
    budget, k = max(cfg.search.num_samples - len(reused), 0), cfg.search.candidates_per_trial
    batch = BatchSearcher(searcher, k, budget) if k > 1 else None
    searcher = ConcurrencyLimiter(batch or searcher, max_concurrent=cfg.search.max_concurrent)
    trainable, pool = _trainable(cfg, candidates)
    retries, progress = RetryCounter(), _SearchProgress(round_idx, cfg.search.num_samples, done=len(reused))
    deaths = ActorDeaths()
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, metric=METRIC, mode=MODE, reuse_actors=True,
                                    num_samples=budget),  # with k > 1 the searcher ends it sooner
        # A trial whose worker dies (OOM kill, node lost, kill -9) is rerun on a fresh actor: a
        # trial is one merge + one eval, so a retry is cheap. Tune 2.60 can count one death twice
        # and drop the rerun; such trials are scored again after the search (engine/rerun.py). A
        # NaN objective is no error and is not retried: the searcher records it failed (base.py).
        run_config=tune.RunConfig(storage_path=run_dir, name=rundir.search_job(round_idx), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES),
                                  # result.json + progress.csv per trial: Tune's own ResultGrid and
                                  # ExperimentAnalysis(<run>/search_round_k) read the trials back
                                  # (TensorBoard and the other auto loggers stay off: driver.py)
                                  callbacks=[retries, progress, deaths, JsonLoggerCallback(), CSVLoggerCallback(),
                                             *trial_callbacks(cfg, run_dir, round_idx)]),
    )
    try:
        grid = tuner.fit() if budget else []
        # one record per candidate; those of trials whose process died are scored again first
        ran = candidate_records(grid, batch, deaths, lambda configs: rescore(
            trainable, configs, run_dir, round_idx, cfg.search.max_concurrent, TRIAL_RETRIES))
    finally:
        if pool is not None:
            ray.get(pool.end_round.remote())
    trials = [r["metrics"] for r in reused if r["state"] == "complete"]
    trials += [m for m in ran if m and np.isfinite(m.get(METRIC, np.nan))]
    if not trials:
        raise RuntimeError(f"round {round_idx}: every search trial failed (fix: see the trial errors in "
                           f"{run_dir}/{rundir.search_job(round_idx)})")
    best = TrialResult.from_row(min(trials, key=lambda m: m[METRIC]))
    weights = {k: best.weights[k] for k in candidates.coords}
    mixture = candidate_mixture(candidates, np.array(list(weights.values()), dtype=np.float64))
    keep = lambda m: {**TrialResult.from_row(m).as_row(), **({"node_id": m["node_id"]} if "node_id" in m else {})}
    return SearchOutcome(mixture, weights, best.objective, best.losses,
                         len(ran) + len(reused), len(ran) + len(reused) - len(trials), time.time() - t0,
                         [keep(m) for m in trials],
                         retries.n, len(deaths.trials))


def _trainable(cfg: Config, candidates: Candidates):
    """The round's Tune trainable, and the scorer pool's handle when search.scorer_pool is on."""
    cpus, pool = cfg.search.cpus_per_trial, None
    if cfg.search.scorer_pool:
        pool = start_scorers(cfg)
        fn = tune.with_parameters(pooled_trial, box=[ray.put(candidates), candidates.key], cpus=cpus)
    else:
        fn = tune.with_parameters(merged_trial if cfg.search.candidates_per_trial == 1 else batch_trial,
                                  candidates=candidates, cpus=cpus, gpus=cfg.placement.trial_gpus,
                                  device_pref=cfg.model.device)
    return tune.with_resources(fn, trial_resources(cfg)), pool
