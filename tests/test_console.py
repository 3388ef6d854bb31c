"""Progress and messages as a user sees them: a redrawn bar with an ETA on a terminal (a real
pseudo-terminal here), short plain lines in a pipe, nothing under --quiet, no ANSI codes with
NO_COLOR or off a terminal; and a real `opmix-ray run` in a pipe free of Hugging Face's bars."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNIPPET = ("from opmix_ray.console import Progress, say\n"
           "say('hello')\n"
           "p = Progress('main run', 100, 'steps')\n"
           "for i in range(1, 101):\n"
           "    p.update(i, f'loss {1 / i:.3f}')\n"
           "say('bye')\n")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "OPMIX_VERBOSITY")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _in_pipe(**env) -> str:
    return subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, env=_env(**env),
                          timeout=60, check=True).stdout


def _in_pty(**env) -> str:
    import pty
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-c", SNIPPET], stdout=slave, stderr=slave, env=_env(**env))
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    p.wait(timeout=60)
    os.close(master)
    return out.decode()


def test_a_pipe_gets_plain_lines_every_tenth():
    out = _in_pipe()
    lines = out.splitlines()
    assert "\r" not in out and "\x1b" not in out
    bars = [line for line in lines if "main run" in line]
    assert 10 <= len(bars) <= 12 and bars[-1].split("] ", 1)[1].startswith("main run 100/100 steps")
    assert "ETA" in bars[5] and lines[0].endswith("hello") and lines[-1].endswith("bye")


def test_a_terminal_gets_one_redrawn_bar_with_an_eta():
    out = _in_pty()
    assert out.count("\r") >= 100 and "[####" in out and "ETA" in out and "\x1b[2K" in out
    assert "hello" in out and "bye" in out.splitlines()[-1]
    assert "\x1b" not in _in_pty(NO_COLOR="1")


def test_quiet_prints_nothing_while_working():
    assert _in_pipe(OPMIX_VERBOSITY="quiet") == ""
    assert _in_pty(OPMIX_VERBOSITY="quiet").strip() == ""


def test_the_verbosity_flags_work_anywhere_on_the_line(monkeypatch):
    import importlib
    cli = importlib.import_module("opmix_ray.cli.main")
    monkeypatch.delenv("OPMIX_VERBOSITY", raising=False)
    assert cli.main(["config-help", "--quiet"]) == 0 and os.environ["OPMIX_VERBOSITY"] == "quiet"
    assert cli.main(["-v", "config-help"]) == 0 and os.environ["OPMIX_VERBOSITY"] == "verbose"
    monkeypatch.delenv("OPMIX_VERBOSITY")


# the default suite: the Progress lines above (this test and test_resume's stop-and-resume check a
# real run's piped output for plain lines; this one also that no library chatter gets through)
@pytest.mark.slow
@pytest.mark.parametrize("quiet", [False, True])  # quiet: test_quiet_prints_nothing_while_working
def test_a_real_run_in_a_pipe(tmp_path, quiet):
    cmd = [sys.executable, "-m", "opmix_ray.cli", *(["--quiet"] if quiet else []), "run",
           str(ROOT / "opmix_ray" / "configs" / "tiny.yaml"), f"run.storage_path={tmp_path}", "rounds.num_rounds=1",
           "search.num_samples=3", "search.searcher=random"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "Loading weights" not in out + p.stderr and "\x1b[" not in out and "\r" not in out
    assert "worker processes have been started" not in out + p.stderr  # Ray's worker-pool warning
    assert "mixture per round" in out  # what the command ends with, in either mode
    if quiet:
        assert "[opmix " not in out
    else:
        assert "round 0 search 3/3 trials" in out and "main run 60/60 steps" not in out  # final step not reported
        assert "round 0 adapters 8/8 trained" in out
        assert len([line for line in out.splitlines() if "] main run " in line and "/60 steps" in line]) <= 11


def test_ray_worker_pool_warning_is_dropped_and_other_raylet_lines_kept(monkeypatch, capsys):
    import ray._private.worker as ray_worker

    from opmix_ray.console import hide_ray_noise
    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # undone after the test
    monkeypatch.setenv("OPMIX_VERBOSITY", "normal")
    monkeypatch.setenv("RAY_COLOR_PREFIX", "0")
    hide_ray_noise()
    noise = ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: 10.0.0.1, which is "
             "4x the maximum expected startup concurrency (2).")
    ray_worker.print_to_stdstream({"lines": [noise], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    ray_worker.print_to_stdstream({"lines": [noise, "Task was killed due to the node running low on memory."],
                                   "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr().out
    assert "worker processes" not in out and "(raylet) Task was killed due to the node running low on memory." in out
