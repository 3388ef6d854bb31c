"""Optuna's TPE and GP samplers through Ray Tune's OptunaSearch, on the simplex space."""
from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch

from opmix_ray.searchers.base import METRIC, MODE


def _make(sampler, space, points_to_evaluate):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pts = [space.params(w) for w in (points_to_evaluate or [])]
    return OptunaSearch(space=space.optuna_define_by_run, metric=METRIC, mode=MODE, sampler=sampler,
                        points_to_evaluate=pts or None)


def make_tpe(*, space, seed=0, points_to_evaluate=None, n_startup_trials: int = 8):
    # multivariate TPE: the coordinates of a mixture are coupled through the normalisation.
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, multivariate=True)
    return _make(sampler, space, points_to_evaluate)


def make_gp(*, space, seed=0, points_to_evaluate=None, n_startup_trials: int = 8):
    sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
    return _make(sampler, space, points_to_evaluate)
