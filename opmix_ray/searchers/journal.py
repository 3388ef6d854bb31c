"""A round's Optuna study as a journal file, <run>/search_round_k/optuna_journal.log.

    optuna-dashboard opmix_runs/NAME/search_round_0/optuna_journal.log

The Optuna searchers add every finished trial to it, with the trial's metrics as the user attr
"metrics"; the engine stamps the study with a fingerprint of what the trials were scored on (the
round's adapters). A redone round (`opmix-ray resume` after the driver died mid-search) reads it
back: when the fingerprint matches, the finished trials are not run again and the searcher goes on
from them; otherwise the file is set aside as optuna_journal.log.stale.
"""
from __future__ import annotations

import os

STUDY = "opmix"  # optuna.load_study(study_name="opmix", storage=JournalStorage(JournalFileBackend(path)))
FINGERPRINT = "opmix.fingerprint"
METRICS = "metrics"


def open_study(path: str, create: bool = True):
    """The journal's study; None when the file has none and create is False."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    if not create and not os.path.isfile(path):
        return None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    storage = JournalStorage(JournalFileBackend(path))
    if not create:
        try:
            return optuna.load_study(study_name=STUDY, storage=storage)
        except KeyError:  # a file without the study
            return None
    return optuna.create_study(study_name=STUDY, storage=storage, direction="minimize", load_if_exists=True)


def finished_trials(path: str) -> list:
    """The journal's COMPLETE and FAIL trials in the order they finished ([] without a journal)."""
    from optuna.trial import TrialState
    study = open_study(path, create=False)
    if study is None:
        return []
    return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.FAIL)]


def reusable(path: str, fingerprint: str) -> list[dict]:
    """The metrics of the journal's finished trials if it was written on the same fingerprint
    (each {"state": "complete"|"fail", "metrics": {...}}); else [] and a stale journal moved aside."""
    from optuna.trial import TrialState
    study = open_study(path, create=False)
    if study is None:
        return []
    if study.user_attrs.get(FINGERPRINT) != fingerprint:
        os.replace(path, path + ".stale")
        return []
    return [{"state": "complete" if t.state == TrialState.COMPLETE else "fail", "metrics": dict(t.user_attrs.get(METRICS, {}))}
            for t in finished_trials(path)]


def stamp(path: str, fingerprint: str) -> None:
    open_study(path).set_user_attr(FINGERPRINT, fingerprint)
