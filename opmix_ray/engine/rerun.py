"""A round's candidates whose trial died with its process are scored again once the search is over.

Tune reruns a trial whose actor died (FailureConfig), but Ray Tune 2.60 can count one death twice:
a second ActorDiedError from the dead actor arrives after the rerun was scheduled, and the pending
rerun is marked ERROR (TuneController._process_trial_failure sends a PENDING trial to ERROR). The
candidate would then be missing from the round. So `ActorDeaths` notes every trial that ends in
ERROR because its process died (a NaN objective is a result, recorded failed, and is not noted),
and `rescore` runs their configs through the same trainable in a second small Tuner, beside the
round's experiment in search_round_<k>/rerun: a process death costs time, never a candidate.
"""
from __future__ import annotations

from pathlib import Path

from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.search import Searcher

from opmix_ray import rundir
from opmix_ray.console import say
from opmix_ray.engine.trial_batch import BATCH, ROWS
from opmix_ray.searchers import METRIC, MODE


def process_died(error) -> bool:
    """Whether a trial's error is its process dying (an actor death, also one raised inside the
    trainable by an actor it waited on), rather than an exception of the code it ran."""
    from ray.exceptions import RayActorError, RayTaskError
    if isinstance(error, RayTaskError):
        error = error.as_instanceof_cause()
    return isinstance(error, RayActorError)


class ActorDeaths(tune.Callback):
    """The trials of a Tune run that ended in ERROR because their process died: {trial id: its
    config and its result path (Result.path in the ResultGrid)}."""

    def __init__(self):
        self.trials: dict[str, dict] = {}

    def on_trial_error(self, iteration, trials, trial, **info):
        if _died(trial):
            self.trials[trial.trial_id] = {"config": trial.config, "path": trial.path}


# What Ray writes for an actor whose process died (ActorDiedError, ActorUnavailableError)
DEATH_TEXT = ("The actor died unexpectedly", "The actor is dead", "ActorDiedError", "ActorUnavailableError")


def _died(trial) -> bool:
    """Whether the trial ended because its process died, read from the text Tune appends to the
    trial's error.txt as it handles the error (its last failure; nothing is unpickled here). Where
    that file is missing, Tune's own copy of the exception decides."""
    try:
        text = Path(trial.error_file).read_text(errors="replace")
    except (OSError, TypeError):
        return process_died(trial.get_pickled_error())
    return any(t in text.rsplit("Failure #", 1)[-1] for t in DEATH_TEXT)


class RetryCounter(tune.Callback):
    """Counts trial reruns after a worker died (Tune's own, FailureConfig), so a round's record can
    say how many it took."""

    def __init__(self):
        self.n = 0

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.n += 1


class _Replay(Searcher):
    """The given trial configs, in order, then FINISHED."""

    def __init__(self, configs: list[dict]):
        super().__init__(metric=METRIC, mode=MODE)
        self.todo = list(configs)

    def suggest(self, trial_id: str):
        return self.todo.pop(0) if self.todo else Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass


def candidate_records(grid, batch, deaths: ActorDeaths, score_again) -> list[dict | None]:
    """One record per candidate of a finished search (its metrics, or None: failed). With batches
    (a BatchSearcher, whose candidate ids are "<trial id>_c<j>") the searcher split each trial's
    result already; else each trial of the ResultGrid is one. The candidates of trials whose
    process died are scored by score_again(configs) (rescore) instead."""
    dead = deaths.trials
    if batch is not None:
        out = [m for cid, m in batch.records if cid.rsplit("_c", 1)[0] not in dead]
    else:
        paths = {d["path"] for d in dead.values()}
        out = [r.metrics for r in grid if r.path not in paths]
    if dead:
        for config, m in score_again([d["config"] for d in dead.values()]):
            out += m[ROWS] if m and BATCH in config else [m] * len(config.get(BATCH, [None]))
    return out


def rescore(trainable, configs: list[dict], run_dir: str, round_idx: int, max_concurrent: int,
            retries: int) -> list[tuple[dict, dict | None]]:
    """Score `configs` again with `trainable` (the round's own); (config, metrics or None when the
    trial failed again) for each, in the order Tune finished them."""
    say(f"round {round_idx}: {len(configs)} trials ended when their process died; scoring their candidates again")
    parent, name = rundir.search_rerun(round_idx).rsplit("/", 1)
    tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
        search_alg=_Replay(configs), metric=METRIC, mode=MODE, num_samples=len(configs), reuse_actors=True,
        max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(storage_path=str(rundir.at(run_dir, parent)), name=name, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=retries),
                                  callbacks=[JsonLoggerCallback(), CSVLoggerCallback()]))
    return [(r.config, None if r.error else r.metrics) for r in tuner.fit()]
