"""opmix-ray resume: kill -9 of the driver, then resume -> the uninterrupted run's history and losses.

- fast: the main run's resume state (AdamW, LR schedule, sampler streams) round-trips through
  safetensors + JSON and the next steps are bit-identical; a dir that is no run exits 2, one line;
- slow: Ctrl-C (SIGINT to the group) or SIGTERM mid-round ends the run in seconds with one line,
  and `opmix-ray resume` finishes it; (~3 tiny runs) a run is SIGKILLed (its whole process group, local Ray included) at a
  random moment after round 0 is pushed, `opmix-ray resume` finishes it, and every round's record
  and the final val losses equal an uninterrupted run's exactly (search.max_concurrent: 1).
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from opmix_ray.config import ModelSection, load_config
from opmix_ray.data.sampler import MixtureSampler
from opmix_ray.engine.main_run import STATE_JSON, STATE_TENSORS, _train_state, load_train_state
from opmix_ray.mixture import Mixture
from opmix_ray.model import build_model, load_checkpoint
from opmix_ray.training import make_optimizer, train_step

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "opmix_ray" / "configs" / "tiny.yaml")
# no warm start and the argmin rule: a random candidate, not uniform again, wins, so the mixture really changes
SETS = {"search": {"max_concurrent": 1, "searcher": "random", "num_samples": 3, "warm_start": False},
        "decision": {"rule": "argmin"}}


def _setup(train, cfg, path=None):
    model = load_checkpoint(path).train() if path else build_model(cfg.model, 97, 16, seed=0)
    opt, sched = make_optimizer(model, cfg.main, total=20)
    sampler = MixtureSampler(train, Mixture.from_dict({"a": 0.3, "b": 0.7}), 16, seed=5)
    return model, opt, sched, sampler


def test_train_state_round_trips_bit_exactly(tmp_path):
    from safetensors.torch import save_file
    cfg = load_config(TINY, {"model": ModelSection(hidden_size=32, num_layers=1, num_heads=2,
                                                   intermediate_size=64).model_dump(), "main": {"warmup_steps": 3}})
    rng = np.random.default_rng(0)
    train = {"a": rng.integers(0, 97, 400), "b": rng.integers(0, 97, 300)}  # short: epochs roll over
    model, opt, sched, sampler = _setup(train, cfg)
    for _ in range(6):
        train_step(model, opt, sched, sampler.next_batch(4)[0])
    meta, tensors = _train_state(opt, sched, sampler, {"step": 6})
    model.save_pretrained(tmp_path, safe_serialization=True)
    save_file(tensors, tmp_path / STATE_TENSORS)
    (tmp_path / STATE_JSON).write_text(json.dumps(meta))
    new = Mixture.from_dict({"a": 0.8, "b": 0.2})  # a pushed winner, applied after the restore
    sampler.set_mixture(new)
    ref = [train_step(model, opt, sched, sampler.next_batch(4)[0]) for _ in range(8)]
    model2, opt2, sched2, sampler2 = _setup(train, cfg, str(tmp_path))
    assert load_train_state(str(tmp_path), opt2, sched2, sampler2)["step"] == 6
    sampler2.set_mixture(new)
    got = [train_step(model2, opt2, sched2, sampler2.next_batch(4)[0]) for _ in range(8)]
    assert got == ref
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert sampler2.drawn_total == sampler.drawn_total


def _env() -> dict:
    # ray.init in this process sets RAY_ADDRESS; a child inheriting it would join that (shut down)
    # cluster instead of starting its own local Ray
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "opmix_ray.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, env=_env(), **kw)


def test_resume_of_a_dir_that_is_no_run_exits_2_with_one_line(tmp_path):
    out = _cli("resume", str(tmp_path))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "config error at RUN_DIR" in lines[0] and "fix:" in lines[0], out.stderr


def _sets(tmp, name):
    return ["--set", f"run.storage_path={tmp}", "--set", f"run.name={name}",
            *[x for sec in SETS for k, v in SETS[sec].items() for x in ("--set", f"{sec}.{k}={v}")]]


def _kill_group(proc) -> None:
    """SIGKILL the driver's whole process group (its local Ray too) and wait until none of its
    processes are left, so no stale raylet or worker outlives it into the resume."""
    try:
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        family = [proc.pid]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 60
    for pid in family:  # only processes this test started (the driver's descendants)
        while psutil.pid_exists(pid) and time.time() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.Error:
                break
            time.sleep(0.5)
        if psutil.pid_exists(pid) and time.time() >= deadline:
            os.kill(pid, signal.SIGKILL)


def _rounds(run_dir):
    with open(f"{run_dir}/history.json") as f:
        return json.load(f)["rounds"]


KEYS = ("round", "step", "weights", "objective", "adapter_weights", "merged_val_loss", "base_val_loss",
        "drawn_before", "mixture_before", "n_trials")


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    import ray

    from opmix_ray.engine.driver import run
    ref = run(load_config(TINY, {"run": {"storage_path": str(tmp_path), "name": "ref"}, **SETS}))
    ray.shutdown()
    run_dir = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "opmix_ray.cli", "run", TINY, *_sets(tmp_path, "killed")],
                            cwd=ROOT, process_group=0, stdout=log, stderr=subprocess.STDOUT, env=_env())
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "history.json").is_file() and _rounds(run_dir):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before round 0 was pushed: " + (tmp_path / "killed.log").read_text()[-3000:]
    delay = random.Random(0).uniform(0, 20)  # lands in the next segment's training or mid-round 1
    print(f"round 0 pushed; killing the driver {delay:.1f}s later")
    time.sleep(delay)
    assert proc.poll() is None, "the run finished before the kill"
    _kill_group(proc)
    assert not (run_dir / "summary.json").exists()
    # a copy whose checkpoints' train_state.json is damaged: resume refuses in one line, before Ray
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    for f in broken.glob("main/round_*/train_state.json"):
        f.write_text("{")
    bad = _cli("resume", str(broken))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert len(bad.stderr.strip().splitlines()) == 1 and "train_state.json unreadable" in bad.stderr, bad.stderr
    out = _cli("resume", str(run_dir), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(out.stdout[-1500:])
    summary = json.loads((run_dir / "summary.json").read_text())
    got, want = _rounds(run_dir), _rounds(ref["run_dir"])
    assert [{k: r[k] for k in KEYS} for r in got] == [{k: r[k] for k in KEYS} for r in want]
    assert summary["final_val_loss"] == ref["final_val_loss"]  # bit-equal, not just close
    assert summary["final_mixture"] == ref["final_mixture"]
    again = _cli("resume", str(run_dir))
    assert again.returncode == 0 and "already finished" in again.stdout


@pytest.mark.parametrize("sig, to_group", [
    # ~200 s each (a run and its resume): the default suite keeps the resume state's round trip above
    pytest.param("SIGINT", True, marks=pytest.mark.slow),  # Ctrl-C in a terminal: the whole process group
    pytest.param("SIGTERM", False, marks=pytest.mark.slow),  # a scheduler's stop: the driver alone
])
def test_a_stop_signal_mid_round_ends_the_run_in_seconds_and_it_resumes(tmp_path, sig, to_group):
    signum = getattr(signal, sig)
    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "opmix_ray.cli", "run", TINY, *_sets(tmp_path, "stopped")],
                            cwd=ROOT, process_group=0, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env())
    deadline = time.time() + 900  # round 1's adapter job has started: mid-round
    while time.time() < deadline and proc.poll() is None and not (run_dir / "adapters_round_1").exists():
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before round 1 started"
    time.sleep(random.Random(sig).uniform(0, 3))  # seeded: the same moment on every run
    t0 = time.time()
    (os.killpg if to_group else os.kill)(proc.pid, signum)
    err = proc.stderr.read()
    rc = proc.wait(timeout=60)
    took = time.time() - t0
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of its Ray is left in the group
    except ProcessLookupError:
        pass
    assert took < 10, f"took {took:.1f}s"
    assert rc == 128 + signum, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("opmix-ray:")]
    assert ours == [f"opmix-ray: stopped by {sig}; every pushed round is saved in {run_dir.resolve()} (fix: "
                    f"`opmix-ray resume {run_dir.resolve()}` continues the run)"], err[-3000:]
    check = _cli("check", str(run_dir))
    assert check.returncode == 0, check.stdout + check.stderr
    out = _cli("resume", str(run_dir), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert [r["round"] for r in _rounds(run_dir)] == [0, 1] and (run_dir / "summary.json").is_file()
    # what a pipe gets from the resumed run: plain progress lines, no bar redrawn in place (test_console.py)
    text = out.stdout
    assert "[opmix " in text and "mixture per round" in text, text[-3000:]
    assert "\x1b[" not in text and "\r" not in text, text[-3000:]


@pytest.mark.slow  # the default suite: test_bad_input's full-disk message and free-space preflight, the resume state above
def test_a_full_disk_mid_run_keeps_the_last_round_whole_and_the_run_resumes(tmp_path):
    """On a small tmpfs that fills after round 0: one line naming the full storage, exit 1, round 0's
    files still match its manifest; with space again, `resume` finishes the run."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run_dir = small / "full"
        proc = subprocess.Popen([sys.executable, "-m", "opmix_ray.cli", "run", TINY, *_sets(small, "full")],
                                cwd=ROOT, process_group=0, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=_env())
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None and not (run_dir / "rounds" / "round_0_manifest.json").is_file():
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before round 0 was pushed: " + proc.stderr.read()[-3000:]
        filler = small / "filler"
        with open(filler, "wb") as f:  # leave ~256 KiB: the next checkpoint cannot be written
            try:
                while shutil.disk_usage(small).free > 256 * 1024:
                    f.write(b"\0" * min(1 << 20, shutil.disk_usage(small).free - 256 * 1024))
                    f.flush()
            except OSError:
                pass
        err = proc.stderr.read()
        rc = proc.wait(timeout=900)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        ours = [line for line in err.splitlines() if line.startswith("opmix-ray:")]
        assert rc == 1 and len(ours) == 1, err[-3000:]
        assert "No space left on device" in ours[0] and f"the storage at {run_dir.resolve()} is full" in ours[0], ours[0]
        from opmix_ray.cli.check import check_run_dir
        assert not [p for p in check_run_dir(run_dir) if "round_0" in p.split(":")[0] or "manifest" in p], \
            check_run_dir(run_dir)
        filler.unlink()
        out = _cli("resume", str(run_dir), timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert (run_dir / "summary.json").is_file()
    finally:
        subprocess.run(["umount", "-l", str(small)])
