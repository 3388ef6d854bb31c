"""The tracking backends and the Optuna journal, read back with the tools users open them in:
TensorBoard's EventAccumulator, MLflow's client on the run's SQLite store, W&B's offline
transaction log (what `wandb sync` uploads), each with the main run's loss and mixture weights per
step, val loss per boundary, the pushes and every trial's objective; optuna.load_study on the
round's journal."""
import glob
import json
import os
import struct
from pathlib import Path

import optuna
import pytest

from opmix_ray.config import load_config

TINY = Path(__file__).resolve().parent.parent / "opmix_ray" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tracked_run(one_round_run):
    """conftest's one-round run, tracked by every backend (the tests here need MLflow and W&B)."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    return one_round_run


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


def test_mlflow_holds_the_main_run_per_step_and_one_run_per_trial(tracked_run):
    from mlflow.tracking import MlflowClient

    from opmix_ray.engine.main_run import steps_and_boundaries
    cfg, summary = tracked_run
    client = MlflowClient("sqlite:///" + str(Path(summary["run_dir"]) / "tracking" / "mlflow.db"))
    exp = client.get_experiment_by_name(cfg.run.name)
    runs = client.search_runs([exp.experiment_id])
    main = [r for r in runs if r.data.tags.get("opmix.role") == "main"]
    trials = [r for r in runs if r.data.tags.get("opmix.role") == "trial"]
    assert len(main) == 1 and len(trials) == cfg.search.num_samples
    run_id = main[0].info.run_id
    total, boundaries = steps_and_boundaries(cfg)
    assert [m.step for m in client.get_metric_history(run_id, "main/train_loss")] == list(range(total))
    for d, w in summary["final_mixture"].items():
        assert client.get_metric_history(run_id, f"mixture/{d}")[-1].value == pytest.approx(w, abs=1e-6)
        assert [m.step for m in client.get_metric_history(run_id, f"val_loss/{d}")] == [*boundaries, total]
    assert [m.step for m in client.get_metric_history(run_id, "main/push_round")] == boundaries
    h = json.loads((Path(summary["run_dir"]) / "history.json").read_text())
    assert min(r.data.metrics["objective"] for r in trials) == pytest.approx(h["rounds"][0]["objective"])


def _wandb_records(path):
    """The records of a W&B transaction log (.wandb): a 7-byte header, then LevelDB-log-style
    chunks (crc32, length, type) in 32 KiB blocks, each record a protobuf Record."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, buf = Path(path).read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (n == 0 and kind == 0):
            pos += left
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def _wandb_runs(run_dir):
    out = []
    for f in glob.glob(os.path.join(run_dir, "tracking", "wandb", "offline-run-*", "run-*.wandb")):
        info, history = None, []
        for rec in _wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                info = rec.run
            elif kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        out.append((info, history))
    return out


def test_wandb_offline_holds_the_main_run_per_step_and_one_run_per_trial(tracked_run):
    from opmix_ray.engine.main_run import steps_and_boundaries
    cfg, summary = tracked_run
    runs = _wandb_runs(summary["run_dir"])
    main = [h for info, h in runs if info.job_type == "main"]
    trials = [h for info, h in runs if info.job_type == "trial"]
    assert len(main) == 1 and len(trials) == cfg.search.num_samples
    assert {info.run_group for info, _ in runs} == {cfg.run.name, f"{cfg.run.name}/search_round_0"}
    total, boundaries = steps_and_boundaries(cfg)
    rows = main[0]
    assert sorted(r["_step"] for r in rows if "main/train_loss" in r) == list(range(total))
    last = {d: [r[f"mixture/{d}"] for r in rows if f"mixture/{d}" in r][-1] for d in summary["final_mixture"]}
    assert last == pytest.approx(summary["final_mixture"], abs=1e-6)
    assert [r["_step"] for r in rows if "main/push_round" in r] == boundaries
    h = json.loads((Path(summary["run_dir"]) / "history.json").read_text())
    assert min(r["objective"] for t in trials for r in t if "objective" in r) == pytest.approx(h["rounds"][0]["objective"])


def test_a_backend_that_is_not_installed_is_one_line_naming_the_field(monkeypatch):
    import importlib.util

    from opmix_ray.config import ConfigError
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tracking.*wandb.*not installed \(fix: pip install wandb"):
        load_config(TINY, {"tracking": {"wandb": True}})
    assert load_config(TINY, {"tracking": {"wandb": False}}).tracking.wandb is False


@pytest.mark.slow  # the default suite: test_trial_batch's round redone on its journal
def test_a_round_redone_on_resume_reads_its_finished_trials_from_the_journal(tracked_run, tmp_path):
    """The driver died mid-search after 2 of round 0's 4 trials: resume trains the adapters again
    (the same weights), takes the 2 trials from the journal, runs only 2 more, and the round comes
    out as the uninterrupted one did."""
    import shutil

    from optuna.trial import create_trial

    from opmix_ray.engine.resume import resume
    from opmix_ray.searchers import journal
    cfg, summary = tracked_run
    run_dir = tmp_path / "tiny"
    shutil.copytree(summary["run_dir"], run_dir)
    h = json.loads((run_dir / "history.json").read_text())
    want = h["rounds"][0]
    (run_dir / "history.json").write_text(json.dumps({**{k: v for k, v in h.items() if k != "final"}, "rounds": []}))
    (run_dir / "summary.json").unlink()
    path = str(run_dir / "search_round_0" / "optuna_journal.log")
    study = journal.open_study(path, create=False)
    fingerprint, done = study.user_attrs[journal.FINGERPRINT], journal.finished_trials(path)
    os.unlink(path)
    journal.stamp(path, fingerprint)
    cut = journal.open_study(path)
    for t in done[:2]:
        cut.add_trial(create_trial(params=t.params, distributions=t.distributions, value=t.value,
                                   user_attrs=t.user_attrs))
    got = resume(run_dir)
    rounds = json.loads((run_dir / "history.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0] and rounds[0]["n_trials"] == 4
    for key in ("weights", "objective", "adapter_weights", "merged_val_loss"):
        assert rounds[0][key] == want[key], key
    assert len([p for p in (run_dir / "search_round_0").iterdir() if p.is_dir()]) == 2  # only 2 trials ran
    assert [t.value for t in journal.finished_trials(path)][:2] == [t.value for t in done[:2]]
    assert len(journal.finished_trials(path)) == 4
    assert got["final_val_loss"] == summary["final_val_loss"]
