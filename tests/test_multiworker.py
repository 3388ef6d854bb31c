"""The main run on several Ray Train workers (main.num_workers, main.grad_accum_steps).

- fast: how a global batch splits over ranks and micro-batches; accumulation gives one big step's
  update; every rank's resume state round-trips and a checkpoint refuses another world size;
- end to end (three tiny one-round runs and a resume, ~4 min on 2 cores): at the same global batch a 2-worker run with 2
  accumulation steps follows the 1-worker run's loss curve (per step, from its TensorBoard
  events) within 1e-4 nats, makes the same decisions, draws exactly the same tokens per domain,
  and its draws track the pushed weights; kill -9 of its driver after round 0 and
  `opmix-ray resume` give the uninterrupted 2-worker run's rounds and final losses bit for bit.
"""
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from test_resume import KEYS, _cli, _env, _kill_group, _rounds

from opmix_ray.config import ModelSection, load_config
from opmix_ray.data.sampler import MixtureSampler
from opmix_ray.engine.main_run import STATE_JSON, STATE_TENSORS, _train_state, load_train_state, rank_state
from opmix_ray.engine.ranks import rank_rows
from opmix_ray.mixture import Mixture
from opmix_ray.model import build_model
from opmix_ray.training import accumulated_step, make_optimizer, train_step

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "opmix_ray" / "configs" / "tiny.yaml")
# a random candidate, not uniform again, wins every round, so the pushes really change the mixture
SETS = {"search": {"max_concurrent": 1, "searcher": "random", "num_samples": 3, "warm_start": False},
        "decision": {"rule": "argmin"}, "tracking": {"tensorboard": True}, "rounds": {"num_rounds": 1}}
TWO = {"main": {"num_workers": 2, "grad_accum_steps": 2}}
LOSS_TOL = 1e-4  # nats per step: float sums in another order (DDP all-reduce, micro-batches); 1e-6 measured


def _small_cfg():
    return load_config(TINY, {"model": ModelSection(hidden_size=32, num_layers=1, num_heads=2,
                                                    intermediate_size=64).model_dump(), "main": {"warmup_steps": 3}})


def test_a_global_batch_splits_into_every_ranks_micro_batches_in_order():
    batch = np.arange(16 * 3).reshape(16, 3)
    parts = [m for r in range(2) for m in rank_rows(batch, r, 2, 2)]
    assert [len(m) for m in parts] == [4, 4, 4, 4]
    assert np.array_equal(np.concatenate(parts), batch)  # every row once, none dropped
    assert np.array_equal(rank_rows(batch, 0, 1, 1)[0], batch)


def test_accumulated_micro_batches_give_the_one_big_steps_update():
    cfg = _small_cfg()
    batch = np.random.default_rng(0).integers(0, 97, (8, 17))
    out = []
    for micro in ([batch], np.split(batch, 4)):
        model = build_model(cfg.model, 97, 16, seed=0)
        opt, sched = make_optimizer(model, cfg.main, total=10)
        loss = accumulated_step(model, opt, sched, micro)
        out.append((loss, torch.cat([p.detach().flatten() for p in model.parameters()])))
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-6)
    assert torch.allclose(out[0][1], out[1][1], atol=1e-6)


def test_every_ranks_resume_state_round_trips_and_another_world_size_is_refused(tmp_path):
    from safetensors.torch import save_file
    cfg = _small_cfg()
    rng = np.random.default_rng(0)
    train = {"a": rng.integers(0, 97, 400), "b": rng.integers(0, 97, 300)}
    model = build_model(cfg.model, 97, 16, seed=0)
    opt, sched = make_optimizer(model, cfg.main, total=20)
    mix = Mixture.from_dict({"a": 0.3, "b": 0.7})
    samplers = [MixtureSampler(train, mix, 16, seed=s) for s in (5, 6)]  # two ranks in different states
    for i, s in enumerate(samplers):
        for _ in range(3 + 4 * i):
            s.next_batch(4)
    train_step(model, opt, sched, samplers[0].next_batch(4)[0])
    ranks = []
    for r, s in enumerate(samplers):
        torch.manual_seed(100 + r)
        ranks.append(rank_state(s))
    meta, tensors = _train_state(opt, sched, samplers[0], {"step": 1}, ranks)
    save_file(tensors, tmp_path / STATE_TENSORS)
    (tmp_path / STATE_JSON).write_text(json.dumps(meta))
    want = [s.next_batch(8)[0] for s in samplers]
    for r in (0, 1):
        fresh = MixtureSampler(train, mix, 16, seed=99)
        model2 = build_model(cfg.model, 97, 16, seed=1)
        opt2, sched2 = make_optimizer(model2, cfg.main, total=20)
        load_train_state(str(tmp_path), opt2, sched2, fresh, rank=r, world=2)
        assert np.array_equal(fresh.next_batch(8)[0], want[r])
        torch.manual_seed(100 + r)
        expected_rng = torch.get_rng_state()
        load_train_state(str(tmp_path), opt2, sched2, fresh, rank=r, world=2)
        assert torch.equal(torch.get_rng_state(), expected_rng)
    with pytest.raises(RuntimeError, match="written by 2 workers, not 3.*main.num_workers: 2"):
        load_train_state(str(tmp_path), opt2, sched2, MixtureSampler(train, mix, 16), rank=0, world=3)


def _losses(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(Path(run_dir) / "tracking" / "main"))
    acc.Reload()
    return np.array([e.value for e in acc.Scalars("main/train_loss")])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(tmp, get): get(name) runs the 1- or 2-worker reference run once per module, on first use,
    so the kill test alone pays for the 2-worker run only."""
    from opmix_ray.engine.driver import run
    tmp = tmp_path_factory.mktemp("workers")
    out = {}

    def get(name):
        if name not in out:
            try:
                extra = TWO if name == "two" else {}
                out[name] = run(load_config(TINY, {"run": {"storage_path": str(tmp), "name": name}, **SETS, **extra}))
            finally:
                ray.shutdown()
        return out[name]
    return tmp, get


@pytest.mark.slow  # the default suite: the micro-batch split and accumulation above, and test_own_trainer's
# two-worker Ray Train loop (every rank trains its rows of the global batch and switches at one step)
def test_two_workers_follow_one_workers_loss_curve_and_draws_at_the_same_global_batch(runs):
    _, get = runs
    out = {"one": get("one"), "two": get("two")}
    one, two = _losses(out["one"]["run_dir"]), _losses(out["two"]["run_dir"])
    assert len(one) == len(two) == 60
    gap = float(np.abs(one - two).max())
    print(f"max per-step train-loss gap 1 vs 2 workers: {gap:.2e} nats")
    assert gap < LOSS_TOL
    r1, r2 = _rounds(out["one"]["run_dir"]), _rounds(out["two"]["run_dir"])
    assert len(r1) == len(r2) == 1
    for a, b in zip(r1, r2):
        assert a["weights"] == pytest.approx(b["weights"], abs=1e-9)  # the same decisions
        assert a["drawn_before"] == b["drawn_before"]  # identical global draws, token for token
    for a, b in zip(out["one"]["final_val_loss"].values(), out["two"]["final_val_loss"].values()):
        assert a == pytest.approx(b, abs=LOSS_TOL)
    hist = json.loads((Path(out["two"]["run_dir"]) / "history.json").read_text())
    final = hist["final"]
    pushed = r2[-1]["weights"]
    seg = final["drawn"]  # shares drawn since the last push: within two windows of the weights
    steps = final["total_steps"] - final["applied_step"]["0"]
    window_share = 2 * 64 / (steps * final["tokens_per_step"])
    assert all(abs(seg[d] - pushed[d]) <= window_share + 1e-9 for d in pushed), (seg, pushed)
    assert out["two"]["final_mixture"] == pytest.approx(pushed, abs=1e-9)


@pytest.mark.slow  # the default suite: every rank's resume state round-trips (above) and test_resume's round trip
def test_kill_9_of_a_two_worker_run_then_resume_equals_the_uninterrupted_run(runs):
    tmp, get = runs
    want = get("two")
    name = "two_killed"
    run_dir = tmp / name
    sets = [x for sec, kv in {**SETS, **TWO, "run": {"storage_path": tmp, "name": name}}.items()
            for k, v in kv.items() for x in ("--set", f"{sec}.{k}={v}")]
    with open(tmp / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "opmix_ray.cli", "run", TINY, *sets], cwd=ROOT,
                                process_group=0, stdout=log, stderr=subprocess.STDOUT, env=_env())
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / "history.json").is_file() and _rounds(run_dir):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "ended before round 0 was pushed: " + (tmp / f"{name}.log").read_text()[-3000:]
        time.sleep(random.Random(0).uniform(0, 5))  # in the last segment's training
        assert proc.poll() is None, "the run finished before the kill"
        _kill_group(proc)
    assert not (run_dir / "summary.json").exists()
    saved = json.loads((run_dir / "main" / "round_0" / STATE_JSON).read_text())
    assert saved["world_size"] == 2 and len(saved["rank_samplers"]) == 1
    res = _cli("resume", str(run_dir), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [{k: r[k] for k in KEYS} for r in _rounds(run_dir)] == [{k: r[k] for k in KEYS} for r in _rounds(want["run_dir"])]
    assert summary["final_val_loss"] == want["final_val_loss"]  # bit-equal
    assert summary["final_mixture"] == want["final_mixture"]
