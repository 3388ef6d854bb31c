"""Bad run dirs, storage and stop signals through the real CLI: one line naming what is wrong,
the exit code, nothing of the user's removed (the cases on a config are in test_bad_input.py)."""
import json
import os
import signal
import socket
import subprocess
import time

import pytest
import ray
from opmix_ray.cli import main

from inputs import OPMIX
from inputs import base_config as _base
from inputs import write_config as _write


def test_overwrite_removes_a_marked_run_dir_and_says_what_it_removed(tmp_path, capsys):
    from opmix_ray.config import load_config
    from opmix_ray.engine.driver import _prepare_run_dir
    from opmix_ray.engine.preflight import check_storage
    cfg = load_config({"run": {"name": "r", "storage_path": str(tmp_path)}})
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / ".opmix_run").write_text("x")
    (run_dir / "history.json").write_text("{}")
    assert check_storage(cfg, overwrite=True) == run_dir.resolve()
    _prepare_run_dir(cfg, run_dir.resolve(), overwrite=True)
    assert sorted(p.name for p in run_dir.iterdir()) == [".opmix_run"]  # the new run's marker only
    assert f"--overwrite: removing the earlier run at {run_dir.resolve()}" in capsys.readouterr().out


GOOD_HISTORY = {"meta": {"domains": ["a"], "initial_mixture": {"a": 1.0}, "total_steps": 10}, "rounds": [], "final": None}


@pytest.mark.parametrize("history, summary, why", [
    (b"", None, "unreadable (JSONDecodeError)"), (b"{", None, "unreadable (JSONDecodeError)"),
    (b"\xff\xfe", None, "unreadable"), (b"{}", None, "has no 'meta' object"), (b"[]", None, "is a JSON list"),
    (b'{"meta": {"domains": ["a"], "initial_mixture": {"a": 1}}, "rounds": [{"weights": {}}]}', None,
     "rounds[0] has no round number"),
    (json.dumps(GOOD_HISTORY).encode(), b"{}", "summary.json: lacks"),
    (json.dumps(GOOD_HISTORY).encode(), b"[1]", "summary.json: is a JSON list"),
])
def test_damaged_history_or_summary_is_one_line_for_results_and_a_finding_for_check(history, summary, why, tmp_path,
                                                                                     capsys):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "history.json").write_bytes(history)
    if summary is not None:
        (run_dir / "summary.json").write_bytes(summary)
    assert main(["results", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0] and f"opmix-ray check {run_dir}" in err[0], err
    assert main(["check", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert why.split(": ")[-1] in out and "Traceback" not in out, out


def test_results_on_a_dir_without_history_is_bad_input(tmp_path, capsys):
    assert main(["results", str(tmp_path)]) == 2
    assert "no history.json" in capsys.readouterr().err


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_anything_is_written(tmp_path, good_data, capsys,
                                                                                    monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**20, 9 * 2**20, 2**20))
    rc = main(["run", _write(tmp_path, _base(tmp_path, good_data))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "1 MiB free and the run needs about" in err[0] and "fix" in err[0], err
    assert not (tmp_path / "runs").exists() and not ray.is_initialized()


def test_a_full_disk_inside_a_run_names_the_storage(tmp_path):
    import errno

    from opmix_ray.engine.faults import run_failed
    (tmp_path / "history.json").write_text("{}")
    exc = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "main" / "round_1" / "model.safetensors"))
    msg = str(run_failed(exc, "round 1: writing the round's files", tmp_path, str(tmp_path)))
    assert msg.startswith("round 1: writing the round's files failed: OSError:") and "No space left" in msg
    assert f"the storage at {tmp_path} is full" in msg and "model.safetensors" in msg and "opmix-ray resume" in msg


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_ends_the_wait_for_a_bucket_within_seconds(tmp_path, good_data, sig):
    """The installed CLI waiting on a gs:// bucket that never answers (the storage timeout set far
    longer than the test): the signal ends it at once, with the stop's one line and 128 + signal."""
    cfg = _base(tmp_path, good_data)
    cfg["run"]["storage_path"] = "gs://opmix-no-such-bucket/runs"
    env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
    env.update(PYTHONWARNINGS="ignore", OPMIX_RAY_STORAGE_TIMEOUT="300", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([str(OPMIX), "run", _write(tmp_path, cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        line = p.stdout.readline()  # printed once the wait passes 1 s: the probe is blocked by then
        assert "waiting for gs://opmix-no-such-bucket/runs to answer (up to 300 s; Ctrl-C stops)" in line, line
        t0 = time.time()
        p.send_signal(sig)
        out, err = p.communicate(timeout=10)
        took = time.time() - t0
    finally:
        p.kill()
    assert p.returncode == 128 + sig and took < 3, (p.returncode, took, err)
    assert f"opmix-ray: stopped by {signal.Signals(sig).name}" in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_an_object_store_that_never_answers_names_the_missing_credentials(tmp_path, monkeypatch):
    """An s3:// endpoint that accepts and never replies, and no AWS credentials anywhere: refused
    after the storage timeout, in one line that says where credentials would come from."""
    from opmix_ray.config import ConfigError, load_config
    from opmix_ray.engine.preflight import check_storage
    from opmix_ray.storage import STORAGE_TIMEOUT_ENV, missing_credentials
    for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
              "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv(STORAGE_TIMEOUT_ENV, "2")
    assert missing_credentials("s3://b/p").startswith("no AWS credentials found (set AWS_ACCESS_KEY_ID")
    assert missing_credentials("gs://b/p").startswith("no Google Cloud credentials found")
    assert missing_credentials("gs://b/p?anonymous=true") is None and missing_credentials("hdfs://h/p") is None
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(8)
    port = stalled.getsockname()[1]
    try:
        cfg = load_config({"run": {"name": "r", "storage_path": f"s3://b/runs?endpoint_override=127.0.0.1:{port}"
                                                               "&scheme=http&region=us-east-1"}})
        t0 = time.time()
        with pytest.raises(ConfigError) as info:
            check_storage(cfg, overwrite=False)
        took = time.time() - t0
    finally:
        stalled.close()
    msg = str(info.value)
    assert took < 6 and msg.startswith("config error at run.storage_path: ") and "\n" not in msg, (took, msg)
    assert "no AWS credentials found" in msg and "fix:" in msg, msg
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    assert missing_credentials("s3://b/p") is None
