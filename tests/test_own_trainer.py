"""OP-Mix for a trainer of your own, with real rounds (opmix_ray/own_trainer/, docs/own_trainer.md;
the sampler and loop alone: test_own_sampler.py).

- bad input, one line each before anything trains: a boundary past the end, a model whose modules
  miss adapters.target_modules, datasets for domains the run does not have, the callback on a
  Trainer that does not train on its sampler;
- slow: a real transformers.Trainer on the tiny model and a slice of the bundled data, with one real
  round forced to move (random searcher, decision.rule: argmin): the batches the model really
  received (read back from its inputs, by content) follow the pushed mixture from the step after
  the boundary; a Trainer resumed from its own checkpoint before the boundary and one resumed at the
  boundary get the same batches, the move at the same step and the same val loss; with no
  round the Trainer's val loss equals opmix-ray's own main run on the same seed and schedule;
- slow: a Ray Train loop on 2 workers with OpMixLoop and a forced move: every rank trains its rows
  of the global batch (engine/ranks.py) and switches at the same step.

One Ray start for the module; seconds by default, about 4 minutes with `-m slow` on an idle 2-core machine.
"""
import json
import math
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from opmix_ray import OpMix, OpMixCallback
from opmix_ray.config import load_config
from opmix_ray.data.shards import BUNDLED_DIR
from opmix_ray.errors import BadInput, TrainerSetupError
from opmix_ray.evaluate import domain_losses
from opmix_ray.mixture import Mixture
from opmix_ray.model import build_model
from opmix_ray.training import make_optimizer


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "fix:" in msg, msg
    return msg


# --- a shared OpMix: a slice of three bundled domains, the tiny model, one round forced to move ---

STEPS, BOUNDARY, BATCH = 12, 5, 16


def _cfg(tmp, name, **over):
    cfg = {"run": {"name": name, "storage_path": str(tmp / "runs"), "seed": 0},
           "data": {"path": str(tmp / "data"), "seq_len": 64, "val_tokens_per_domain": 1024,
                    "selection_tokens_per_domain": 512},
           "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128},
           "main": {"total_tokens": STEPS * BATCH * 64, "batch_size": BATCH, "lr": 3.0e-3, "warmup_steps": 3},
           "rounds": {"uniform_prefix": 0.4, "num_rounds": 1},
           "adapters": {"r": 4, "alpha": 8, "steps": 3, "batch_size": 8, "replicate_old": False},
           # random candidates and the argmin rule: the round surely moves, and the push is visible
           "search": {"searcher": "random", "num_samples": 2, "max_concurrent": 1, "warm_start": False},
           "decision": {"rule": "argmin"}, "ray": {"num_cpus": 4}}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own")
    (tmp / "data").mkdir()
    for name, n in (("bible", 40), ("fortunes", 40), ("python", 15)):
        pq.write_table(pq.read_table(BUNDLED_DIR / f"{name}.parquet", columns=["text"]).slice(0, n),
                       tmp / "data" / f"{name}.parquet")
    yield tmp
    ray.shutdown()


@pytest.fixture(scope="module")
def opmix(tmp):
    om = OpMix(_cfg(tmp, "hf"), total_steps=STEPS)
    assert om.boundaries == [BOUNDARY]  # rounds.uniform_prefix 0.4 of 12 steps
    return om


def _domain_of(shards):
    """A row's domain, found by where its tokens sit in the train data: what really was trained on."""
    blobs = {d: np.asarray(shards.train[d]).astype(np.uint16).tobytes() for d in shards.domains}

    def find(row) -> str:
        key = np.asarray(row, dtype=np.uint16).tobytes()
        for d, blob in blobs.items():
            i = blob.find(key)
            while i >= 0 and i % 2:
                i = blob.find(key, i + 1)
            if i >= 0:
                return d
        raise AssertionError("a row that is in no domain's train data")
    return find


def _trainer(opmix, tmp, name, resume=None, optimizers=None, model=None):
    """A real Trainer on the callback's sampler; returns (trainer, the input_ids of every training
    forward, in order: the batches the model really got)."""
    from transformers import Trainer, TrainingArguments
    sampler = opmix.sampler()
    model = model or build_model(opmix.cfg.model, opmix.shards.vocab_size, opmix.shards.seq_len, seed=0)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()) if m.training else None,
                                    with_kwargs=True)
    args = TrainingArguments(output_dir=str(tmp / name), max_steps=STEPS, per_device_train_batch_size=BATCH,
                             learning_rate=3e-3, warmup_steps=2, save_steps=BOUNDARY - 2, logging_steps=4,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    cb = OpMixCallback(opmix, sampler, say=None)
    trainer = Trainer(model=model, args=args, train_dataset=sampler, callbacks=[cb], optimizers=optimizers or (None, None))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, seen, cb


@pytest.fixture(scope="module")
def hf_run(opmix, tmp):
    trainer, seen, cb = _trainer(opmix, tmp, "trainer")
    return trainer, seen, cb


@pytest.mark.slow  # ~90 s with its Trainer run: the default suite keeps the bad wiring below and test_own_sampler.py
def test_the_trainers_batches_follow_the_pushed_mixture_from_the_step_after_the_boundary(opmix, hf_run):
    trainer, seen, cb = hf_run
    assert len(seen) == STEPS and all(x.shape == (BATCH, 65) for x in seen)
    (k, d), = cb.loop.decided.items()
    assert k == 0 and d["moved"] and d["at_step"] == BOUNDARY + 1  # accelerate had drawn step BOUNDARY already
    pushed = d["weights"]
    assert max(abs(v - 1 / 3) for v in pushed.values()) > 0.05  # a real move, not uniform again
    find = _domain_of(opmix.shards)
    doms = opmix.shards.domains
    count = lambda steps: np.array([[find(r) for x in steps for r in x.numpy()].count(d) for d in doms])
    before, after = count(seen[:BOUNDARY + 1]), count(seen[BOUNDARY + 1:])
    assert np.all(np.abs(before / before.sum() - 1 / 3) <= 2 / before.sum())  # uniform, within two rows
    assert np.all(np.abs(after / after.sum() - np.array([pushed[d] for d in doms])) <= 2 / after.sum()), (after, pushed)
    hist = json.loads((opmix_run_dir(opmix) / "history.json").read_text())
    assert hist["meta"]["client"] == "own_trainer" and hist["rounds"][0]["applied_step"] == BOUNDARY + 1
    assert hist["rounds"][0]["weights"] == pytest.approx(pushed)
    from opmix_ray.cli.check import check_run_dir
    assert check_run_dir(opmix.run_dir) == []  # `opmix-ray check` finds the round's files whole


def opmix_run_dir(opmix):
    from pathlib import Path
    return Path(opmix.run_dir)


@pytest.mark.slow  # shares the Trainer run above
@pytest.mark.parametrize("ckpt", [BOUNDARY - 2, BOUNDARY + 1])
def test_a_trainer_resumed_from_its_own_checkpoint_moves_at_the_same_step_on_the_same_batches(opmix, tmp, hf_run, ckpt):
    trainer, seen, cb = hf_run
    path = tmp / "trainer" / f"checkpoint-{ckpt}"
    # a new OpMix on the same run dir, as a restarted script builds it: it continues the run dir
    again = OpMix(_cfg(tmp, "hf"), total_steps=STEPS) if ckpt < BOUNDARY else opmix
    resumed, seen2, cb2 = _trainer(again, tmp, "trainer", resume=str(path))
    assert len(seen2) == STEPS - ckpt
    assert all(torch.equal(x, y) for x, y in zip(seen2, seen[ckpt:]))  # the very batches, the move included
    assert cb2.loop.decided[0]["at_step"] == BOUNDARY + 1
    assert cb2.loop.decided[0]["weights"] == pytest.approx(cb.loop.decided[0]["weights"])
    if ckpt < BOUNDARY:  # the round was asked again, with the same model: its recorded decision came back
        assert cb2.loop.decided[0]["reused"]
    val = lambda t: domain_losses(t.model, opmix.shards.val)
    assert val(resumed) == pytest.approx(val(trainer), abs=1e-6)


@pytest.mark.slow  # ~30 s
def test_with_no_round_the_trainer_equals_opmix_rays_main_run_on_the_same_seed(tmp, opmix):
    """Where both can be made equal: the same init, sampler seed, optimizer and schedule (opmix-ray's
    make_optimizer passed to the Trainer) and no push. After a push they differ by construction: the
    Trainer's loader holds a batch ahead, so its push lands one step after the main run's."""
    from opmix_ray.engine.driver import run
    cfg = _cfg(tmp, "main_eq", rounds={"num_rounds": 0})
    summary = run(load_config(cfg))
    same = OpMix(_cfg(tmp, "hf_eq", rounds={"num_rounds": 0}), total_steps=STEPS)
    assert same.boundaries == []
    model = build_model(same.cfg.model, same.shards.vocab_size, same.shards.seq_len, seed=0)
    trainer, seen, _ = _trainer(same, tmp, "trainer_eq", optimizers=make_optimizer(model, same.cfg.main, STEPS),
                                model=model)
    ours = domain_losses(trainer.model, same.shards.val, batch_size=32)
    print({d: (ours[d], summary["final_val_loss"][d]) for d in ours})
    for d in ours:  # the Trainer feeds seq_len + 1 positions and shifts itself: float sums in another order
        assert ours[d] == pytest.approx(summary["final_val_loss"][d], abs=1e-4)


# --- bad input: one line, before anything trains ---

def test_a_boundary_past_the_end_is_one_line_before_the_data_is_read(tmp):
    with pytest.raises(TrainerSetupError) as e:
        OpMix(_cfg(tmp, "bad"), total_steps=10, boundaries=[4, 10])
    assert "boundary step 10 is past the end" in _one_line(e)
    assert not (tmp / "runs" / "bad").exists()


def test_bad_wiring_is_one_line_before_a_step_trains(opmix, tmp):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=opmix.shards.vocab_size))
    with pytest.raises(TrainerSetupError) as e:
        opmix.check_model(gpt2)
    assert "target_modules" in _one_line(e) and "c_attn" in str(e.value)
    with pytest.raises(TrainerSetupError) as e:
        opmix.sampler(datasets={"bible": [1, 2], "python": [1, 2], "novels": [1, 2]})
    assert "fortunes" in _one_line(e)
    with pytest.raises(TrainerSetupError) as e:
        opmix.boundary(gpt2, STEPS + 3, opmix.sampler())
    assert "past the end" in _one_line(e)
    sampler = opmix.sampler()
    model = build_model(opmix.cfg.model, opmix.shards.vocab_size, opmix.shards.seq_len)
    args = TrainingArguments(output_dir=str(tmp / "wired"), max_steps=STEPS, per_device_train_batch_size=BATCH,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    other = opmix.sampler()  # the Trainer trains on one sampler, the callback was given another
    steps = []
    trainer = Trainer(model=model, args=args, train_dataset=other, callbacks=[OpMixCallback(opmix, sampler)])
    model.register_forward_pre_hook(lambda *a: steps.append(1))
    with pytest.raises(TrainerSetupError) as e:
        trainer.train()
    assert "not the callback's sampler" in _one_line(e) and not steps
    with pytest.raises(BadInput) as e:
        OpMixCallback(opmix, list(range(10)))
    _one_line(e)


def test_the_opmix_object_pickles_without_the_corpus(opmix):
    blob = pickle.dumps(opmix)
    assert len(blob) < 50_000
    assert pickle.loads(blob).domains == opmix.domains


# --- a Ray Train loop on 2 workers ---

def _ray_train_loop(config):
    """What a user's train_loop_per_worker adds for OP-Mix (examples/ray_train_loop.py in full)."""
    import tempfile
    from pathlib import Path

    import numpy as np
    import ray.train
    from ray.train import Checkpoint

    from opmix_ray import OpMixLoop
    from opmix_ray.model import build_model
    from opmix_ray.training import make_optimizer, train_step

    opmix = config["opmix"]
    rank = ray.train.get_context().get_world_rank()
    model = build_model(opmix.cfg.model, opmix.shards.vocab_size, opmix.shards.seq_len, seed=0)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
    opt, sched = make_optimizer(model, opmix.cfg.main, opmix.total_steps)
    sampler = opmix.sampler()
    loop = OpMixLoop(opmix, sampler, say=None)
    # Ray Train's own restore after a failure, else the checkpoint this run was asked to go on from
    # (Ray 2.60 deprecates TorchTrainer(resume_from_checkpoint=...) for this)
    start, ckpt = 0, ray.train.get_checkpoint() or config.get("resume_from")
    if ckpt:  # the user's own checkpoint carries the loop's state: the sampler and the rounds decided
        with ckpt.as_directory() as d:
            saved = json.loads(Path(d, "opmix.json").read_text())
        loop.load_state_dict(saved["loop"])
        start = saved["step"]
    rows, applied = [], {}
    for step in range(start, opmix.total_steps):
        for d in loop.before_step(step, model, lr=sched.get_last_lr()[0]):
            applied[d.round] = loop.decided[d.round]["at_step"]
        micro, = loop.rows()
        rows.append(micro)
        train_step(model, opt, sched, micro)
        if step + 1 == config.get("save_at"):
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    Path(d, "opmix.json").write_text(json.dumps({"loop": loop.state_dict(), "step": step + 1}))
                ray.train.report({"step": step + 1}, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)
    np.save(f"{config['out']}/rank{rank}.npy", np.stack(rows))
    with open(f"{config['out']}/rank{rank}.json", "w") as f:
        json.dump({"applied": applied, "weights": loop.decided[0]["weights"]}, f)


@pytest.mark.slow  # ~90 s: the default suite keeps the rank split (test_multiworker.py) and the one-worker Trainer above
def test_a_ray_train_loop_on_two_workers_splits_the_draws_and_switches_at_one_step(tmp):
    import sys

    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import a test module
    om = OpMix(_cfg(tmp, "ray2", main={"num_workers": 2}), total_steps=STEPS)
    out = tmp / "ray2_rows"
    out.mkdir()
    save_at = BOUNDARY + 3
    result = TorchTrainer(_ray_train_loop, train_loop_config={"opmix": om, "out": str(out), "save_at": save_at},
                          scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1})).fit()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # one decision, applied at one step, on both ranks
    applied, weights = ranks[0]["applied"], ranks[0]["weights"]
    assert applied == {"0": BOUNDARY}  # no loader ahead: the push lands at the boundary itself
    r0, r1 = np.load(out / "rank0.npy"), np.load(out / "rank1.npy")
    assert r0.shape == r1.shape == (STEPS, BATCH // 2, 65)
    # rank r trained rows [r * B/2, (r + 1) * B/2) of the global batch a single sampler draws (ranks.py)
    one = om.sampler()
    for step in range(STEPS):
        if step == BOUNDARY:
            assert one.push(Mixture.from_dict(weights, one.domains)) == BOUNDARY
        batch, _ = one.next_batch(BATCH)
        assert np.array_equal(np.concatenate([r0[step], r1[step]]), batch)
    find = _domain_of(om.shards)
    after = [find(r) for s in range(BOUNDARY, STEPS) for r in np.concatenate([r0[s], r1[s]])]
    for d in om.domains:
        assert abs(after.count(d) / len(after) - weights[d]) <= 2 / len(after)
    assert max(abs(v - 1 / 3) for v in weights.values()) > 0.05
    assert math.isfinite(sum(weights.values()))
    # resumed from the loop's own Ray Train checkpoint, after the push: every rank goes on with the
    # rows the uninterrupted run drew, on the pushed mixture, and no round is run again
    again = tmp / "ray2_resumed"
    again.mkdir()
    TorchTrainer(_ray_train_loop, train_loop_config={"opmix": om, "out": str(again), "resume_from": result.checkpoint},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1})).fit()
    for r, full in ((0, r0), (1, r1)):
        assert np.array_equal(np.load(again / f"rank{r}.npy"), full[save_at:])
        assert json.loads((again / f"rank{r}.json").read_text()) == {"applied": {}, "weights": weights}
