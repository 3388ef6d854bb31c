"""tracking.tensorboard and the Optuna journal, read back with the tools users open them in:
TensorBoard's EventAccumulator (the main run's loss and mixture weights per step, val loss per
boundary, the pushes; every trial's objective) and optuna.load_study on the round's journal."""
import os
from pathlib import Path

import optuna
import pytest
import ray

from opmix_ray.config import load_config

TINY = Path(__file__).resolve().parent.parent / "opmix_ray" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    from opmix_ray.engine.driver import run
    cfg = load_config(TINY, {"run": {"storage_path": str(tmp_path_factory.mktemp("runs"))},
                             "rounds": {"num_rounds": 1}, "search": {"num_samples": 4},
                             "tracking": {"tensorboard": True}})
    try:
        yield cfg, run(cfg)
    finally:
        ray.shutdown()


def _events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(path))
    acc.Reload()
    return acc


def test_the_main_run_writes_loss_weights_and_pushes_per_step(tracked_run):
    from opmix_ray.engine.main_run import steps_and_boundaries
    cfg, summary = tracked_run
    acc = _events(Path(summary["run_dir"]) / "tracking" / "main")
    tags = acc.Tags()["scalars"]
    total, boundaries = steps_and_boundaries(cfg)
    loss = acc.Scalars("main/train_loss")
    assert [e.step for e in loss] == list(range(total))
    for d in summary["final_mixture"]:
        assert f"mixture/{d}" in tags and f"val_loss/{d}" in tags
        assert [e.step for e in acc.Scalars(f"val_loss/{d}")] == [*boundaries, total]
    pushes = acc.Scalars("main/push_round")
    assert [e.step for e in pushes] == boundaries and [e.value for e in pushes] == [0.0]
    last = {d: acc.Scalars(f"mixture/{d}")[-1].value for d in summary["final_mixture"]}
    assert last == pytest.approx(summary["final_mixture"], abs=1e-6)


def test_every_trial_writes_events_and_the_optuna_journal_holds_the_study(tracked_run):
    cfg, summary = tracked_run
    search = Path(summary["run_dir"]) / "search_round_0"
    trial_dirs = [p for p in search.iterdir() if p.is_dir()]
    assert len(trial_dirs) == cfg.search.num_samples
    for t in trial_dirs:
        acc = _events(t)
        assert any(tag.endswith("objective") for tag in acc.Tags()["scalars"]), t
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    study = optuna.load_study(study_name="opmix", storage=JournalStorage(JournalFileBackend(
        os.fspath(search / "optuna_journal.log"))))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == cfg.search.num_samples
    import json
    h = json.loads((Path(summary["run_dir"]) / "history.json").read_text())
    assert min(t.value for t in done) == pytest.approx(h["rounds"][0]["objective"])
