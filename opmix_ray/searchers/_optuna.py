"""Optuna's TPE and GP samplers on the mixture space, through Optuna's ask/tell API.

Why not ray.tune.search.optuna.OptunaSearch: its save/restore pickles the whole study (we never
unpickle from storage), and a restored copy does not give the same next suggestion. Here the study
is rebuilt from a JSON list of trials (params, state, value) in their original order, and the
sampler is re-created before every ask with a seed drawn from (seed, n), so the next suggestion is
a function of (seed, n, trials so far) only: restore gives exactly the same one.

Failed trials (NaN / inf / missing objective) are told as FAIL, which both samplers ignore.
With journal_path (the engine gives <run>/search_round_k/optuna_journal.log) every finished trial
is also added to a study in an Optuna journal file, which optuna-dashboard and optuna.load_study
open; the sampling study itself stays in memory, rebuilt from the records as above. A searcher
built on a journal that already holds finished trials goes on from them (searchers/journal.py):
they become its first records, and its next suggestion is the one it would have made after them.
Trials still running count through TPE's constant liar (Optuna's default), so TPE under a
concurrency limit of 2 does not propose the same point twice.
"""
from __future__ import annotations

import optuna
from optuna.trial import TrialState, create_trial

from opmix_ray.searchers import journal
from opmix_ray.searchers.base import METRIC, MODE, MixtureSearcher, SearcherError, as_floats

_STATES = {"running": TrialState.RUNNING, "complete": TrialState.COMPLETE, "fail": TrialState.FAIL}
JOURNAL_STUDY = journal.STUDY
# what a journal trial keeps of its result: enough for the engine to count it without rerunning it
_KEPT = ("loss_", "mix_", "a_")


def _kept(result: dict | None) -> dict:
    if not result:
        return {}
    out = {k: float(v) for k, v in result.items() if k.startswith(_KEPT) and isinstance(v, (int, float))}
    for k in (METRIC, "node_id"):
        if isinstance(result.get(k), (int, float, str)):
            out[k] = result[k]
    return out


class OptunaSimplexSearcher(MixtureSearcher):
    def __init__(self, *, space, seed: int = 0, points_to_evaluate=None, sampler: str = "tpe",
                 n_startup_trials: int = 8, journal_path: str | None = None,
                 metric: str = METRIC, mode: str = MODE):
        super().__init__(space=space, seed=seed, points_to_evaluate=points_to_evaluate, metric=metric, mode=mode)
        if sampler not in ("tpe", "gp"):
            raise SearcherError(f"optuna sampler '{sampler}' (fix: use 'tpe' or 'gp')")
        self.kind, self.n_startup = sampler, int(n_startup_trials)
        self.records: list[dict] = []  # one per Optuna trial, in Optuna's numbering order
        self._number: dict[str, int] = {}  # Tune trial id -> Optuna trial number
        self._study = None
        self.journal_path, self._journal = journal_path, None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if journal_path:
            self._replay_journal()

    def _replay_journal(self) -> None:
        """The journal's finished trials become this searcher's first trials, as if it had run them:
        the next suggestion's seed and the points still to evaluate follow from their count."""
        for t in journal.finished_trials(self.journal_path):
            state = "complete" if t.state == TrialState.COMPLETE else "fail"
            value = t.value if state == "complete" else None
            self.records.append({"params": dict(t.params), "state": state, "value": value})
            w = self.space.weights(dict(t.params))
            losses = as_floats(t.user_attrs.get(journal.METRICS, {}), "loss_") if value is not None else {}
            self.history.append({"id": f"journal_{t.number}", "w": list(map(float, w)), "value": value, "losses": losses})
        n = len(self.records)
        self.n_suggested += n
        self._warm = self._warm[n:]

    def _record(self, params: dict, state: str, value, result: dict | None = None) -> None:
        """A finished trial, into the journal file's study (the dashboard's and resume's copy)."""
        if not self.journal_path:
            return
        if self._journal is None:
            self._journal = journal.open_study(self.journal_path)
        self._journal.add_trial(create_trial(params=params, distributions=self.space.optuna_distributions(),
                                             state=_STATES[state], value=value if state == "complete" else None,
                                             user_attrs={journal.METRICS: _kept(result)}))

    def _sampler(self, n: int):
        seed = int(self.rng(n).integers(2**31 - 1))
        if self.kind == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=self.n_startup,
                                             warn_independent_sampling=False)
        # multivariate: the coordinates of a mixture are coupled through the normalisation.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.n_startup, multivariate=True)

    @property
    def study(self) -> optuna.Study:
        if self._study is None:  # fresh, unpickled or restored: replay the trials in order
            self._study = optuna.create_study(direction="minimize", sampler=self._sampler(0))
            dists = self.space.optuna_distributions()
            for r in self.records:
                self._study.add_trial(create_trial(params=r["params"], distributions=dists,
                                                   state=_STATES[r["state"]],
                                                   value=r["value"] if r["state"] == "complete" else None))
        return self._study

    def propose(self, trial_id: str):
        study = self.study
        assert len(study.trials) == len(self.records)  # Optuna trial number == index in records
        study.sampler = self._sampler(self.n_suggested)
        trial = study.ask(fixed_distributions=self.space.optuna_distributions())
        self._number[trial_id] = trial.number
        self.records.append({"params": dict(trial.params), "state": "running", "value": None})
        return dict(trial.params)

    def observe(self, trial_id, weights, value, result) -> None:
        state = "complete" if value is not None else "fail"
        n = self._number.pop(trial_id, None)
        if n is None:  # a warm-start point: Optuna never asked for it, add it as a finished trial
            params, study = self.space.params(weights), self.study  # build (replay) before appending
            self.records.append({"params": params, "state": state, "value": value})
            study.add_trial(create_trial(params=params, distributions=self.space.optuna_distributions(),
                                              state=_STATES[state], value=value))
            self._record(params, state, value, result)
            return
        # the study first: after a restore it is rebuilt from the records, and a record already
        # marked complete would be replayed as COMPLETE, which Optuna then refuses to be told again
        study = self.study
        self.records[n].update(state=state, value=value)
        self._record(self.records[n]["params"], state, value, result)
        if value is None:
            study.tell(n, state=TrialState.FAIL)
        else:
            study.tell(n, value)

    def state(self) -> dict:
        return {"records": self.records, "number": self._number}

    def load_state(self, state: dict) -> None:
        self.records = [dict(r) for r in state["records"]]
        self._number = dict(state["number"])
        self._study = None

    def __getstate__(self):  # Tune pickles the search algorithm into the experiment dir
        d = dict(self.__dict__)
        d["_study"] = d["_journal"] = None  # rebuilt from records (the journal reopened) on first use
        return d


def make_tpe(*, space, seed=0, points_to_evaluate=None, n_startup_trials: int = 8,
             journal_path: str | None = None, metric: str = METRIC, mode: str = MODE):
    return OptunaSimplexSearcher(space=space, seed=seed, points_to_evaluate=points_to_evaluate, sampler="tpe",
                                 n_startup_trials=n_startup_trials, journal_path=journal_path, metric=metric,
                                 mode=mode)


def make_gp(*, space, seed=0, points_to_evaluate=None, n_startup_trials: int = 8,
             journal_path: str | None = None, metric: str = METRIC, mode: str = MODE):
    return OptunaSimplexSearcher(space=space, seed=seed, points_to_evaluate=points_to_evaluate, sampler="gp",
                                 n_startup_trials=n_startup_trials, journal_path=journal_path, metric=metric,
                                 mode=mode)
