"""The main training run: one Ray Train TorchTrainer that lives across every round.

Its workers read the live mixture from the MixtureController. At each round boundary rank 0
evaluates, writes a Hugging Face checkpoint through `ray.train.report` to
<run_dir>/main/round_<k>, tells the controller, and every rank waits for the pushed winner, then
trains on it: the run continues on the new mixture without a restart.
"""
from __future__ import annotations

import math
import os
import tempfile
import time

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from opmix_ray.config import Config
from opmix_ray.controller import controller_name
from opmix_ray.data.sampler import MixtureSampler
from opmix_ray.evaluate import domain_losses
from opmix_ray.mixture import Mixture
from opmix_ray.model import build_model, n_params, pick_device, set_threads
from opmix_ray.training import make_optimizer, train_step


def steps_and_boundaries(cfg: Config, world_size: int = 1) -> tuple[int, list[int]]:
    """Total optimizer steps and the steps at which rounds start (uniform prefix, then even)."""
    total = cfg.main.total_tokens // (cfg.main.batch_size * cfg.data.seq_len * world_size)
    if cfg.run.baseline != "none" or cfg.rounds.num_rounds == 0:
        return total, []
    prefix = int(round(cfg.rounds.uniform_prefix * total))
    span = (total - prefix) / cfg.rounds.num_rounds
    return total, [prefix + int(round(k * span)) for k in range(cfg.rounds.num_rounds)]


def checkpoint_path(run_dir: str, round_idx: int | str) -> str:
    return os.path.join(run_dir, "main", f"round_{round_idx}")


def _report_checkpoint(model, name: str, metrics: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        unwrapped = model.module if hasattr(model, "module") else model
        if ray.train.get_context().get_world_rank() == 0:
            unwrapped.save_pretrained(tmp, safe_serialization=True)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        else:
            ray.train.report(metrics)


def main_loop(loop_cfg: dict) -> None:
    """Ray Train worker loop (one per worker)."""
    cfg = Config.model_validate(loop_cfg["config"])
    shards = ray.get(loop_cfg["shards_ref"])
    ctl = ray.get_actor(controller_name(cfg.run.name), namespace=loop_cfg["namespace"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_threads(cfg.main.cpus_per_worker)
    device, dtype = pick_device(cfg.model.device)
    model = build_model(cfg.model, shards.vocab_size, shards.seq_len, seed=cfg.run.seed).to(device)
    if world > 1:
        model = ray.train.torch.prepare_model(model)
    total, boundaries = steps_and_boundaries(cfg, world)
    opt, sched = make_optimizer(model, cfg.main, total)
    _, weights = ray.get(ctl.get_mixture.remote())
    sampler = MixtureSampler(shards.train, Mixture.from_dict(weights, shards.domains), shards.seq_len,
                             shards.cap_tokens(cfg), seed=cfg.run.seed * 1000 + rank)
    tokens_per_step = cfg.main.batch_size * shards.seq_len * world
    n_par, t0, losses = n_params(model), time.time(), []
    push = _PushTracker(ctl, sampler, shards.domains, cfg.rounds.mode)
    for step in range(total + 1):
        push.poll(step)
        if step in boundaries or step == total:
            k = boundaries.index(step) if step in boundaries else "final"
            val = domain_losses(model, shards.val, batch_size=32, device=device)
            info = {"step": step, "tokens": step * tokens_per_step, "train_loss": float(np.mean(losses[-50:] or [math.nan])),
                    "val_loss": val, "drawn": sampler.segment_fractions(), "mixture": sampler.mixture.as_dict(),
                    "epochs": sampler.epochs(), "n_params": n_par, "flops": 6.0 * n_par * step * tokens_per_step,
                    "wall_s": time.time() - t0, "path": checkpoint_path(loop_cfg["run_dir"], k),
                    "stall_s": dict(push.stall_s), "applied_step": dict(push.applied_step)}
            _report_checkpoint(model, f"round_{k}", {"step": step, "mean_val_loss": float(np.mean(list(val.values())))})
            if rank == 0:
                ray.get(ctl.report_final.remote(info) if k == "final" else ctl.report_boundary.remote(k, info))
            if k == "final":
                break
            push.expect(k, step)
        batch, _ = sampler.next_batch(cfg.main.batch_size)
        losses.append(train_step(model, opt, sched, batch, device))
        if rank == 0 and step % 25 == 0:
            ctl.report_progress.remote({"step": step, "total": total, "loss": float(np.mean(losses[-25:])),
                                        "elapsed_s": time.time() - t0})


class _PushTracker:
    """Applies pushed winners to the sampler and records how long the main run stood still.

    sync: the main run waits at each boundary for that round's winner. async: it never waits; it
    keeps training on the current mixture and switches at the first step after a push arrives.
    A round still running at the next boundary just continues (the driver starts the next round on
    the newer checkpoint when it is free), and a round that ends after the main run is recorded
    but never applied."""

    def __init__(self, ctl, sampler, domains, mode: str):
        self.ctl, self.sampler, self.domains, self.mode = ctl, sampler, domains, mode
        self.pending: list[tuple[int, object]] = []  # (round, ObjectRef of its winner), oldest first
        self.stall_s: dict[str, float] = {}
        self.applied_step: dict[str, int] = {}

    def expect(self, k: int, step: int) -> None:
        self.pending.append((k, self.ctl.wait_push.remote(k)))
        self.stall_s[str(k)] = 0.0
        if self.mode == "sync":
            t = time.time()
            ray.wait([self.pending[-1][1]])
            self.stall_s[str(k)] = time.time() - t
            self.poll(step)

    def poll(self, step: int) -> None:
        if not self.pending:
            return
        ready, _ = ray.wait([ref for _, ref in self.pending], num_returns=len(self.pending), timeout=0)
        if ready:
            # the newest pushed round wins; older ones still pending were overtaken (never pushed)
            i = max(j for j, (_, ref) in enumerate(self.pending) if ref in ready)
            k, ref = self.pending[i]
            self.sampler.set_mixture(Mixture.from_dict(ray.get(ref), self.domains))
            self.applied_step[str(k)] = step
            self.pending = self.pending[i + 1:]


@ray.remote(num_cpus=0)
def _fit(trainer: TorchTrainer):
    result = trainer.fit()
    if result.error:
        raise result.error
    return result.metrics


def launch_main_run(cfg: Config, shards_ref, run_dir: str, namespace: str, num_workers: int = 1):
    """Start the main run in the background; returns the ObjectRef of its final metrics."""
    trainer = TorchTrainer(
        main_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "shards_ref": shards_ref,
                           "run_dir": run_dir, "namespace": namespace},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=torch.cuda.is_available(),
                                     resources_per_worker={"CPU": cfg.main.cpus_per_worker}),
        run_config=RunConfig(storage_path=run_dir, name="main"),
    )
    return _fit.remote(trainer)
