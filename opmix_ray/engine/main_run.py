"""The main training run: one Ray Train TorchTrainer that lives across every round.

Its main.num_workers workers (DDP; engine/ranks.py says how they share a global step) read the
live mixture from the MixtureController. At each round boundary rank 0 evaluates, writes a Hugging
Face checkpoint through `ray.train.report` to <run_dir>/main/round_<k> with every rank's resume
state, tells the controller, and every rank waits for the pushed winner, then trains on it: the run
continues on the new mixture without a restart.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, RunConfig
from ray.train.torch import TorchTrainer

from opmix_ray import rundir
from opmix_ray.compute import train_flops
from opmix_ray.config import Config, sampler_seed
from opmix_ray.data.feed import OpMixSampler
from opmix_ray.data.tokenizer import write_checkpoint_files
from opmix_ray.engine.controller import controller_name
from opmix_ray.engine.faults import on_driver_node
from opmix_ray.engine.placement import main_scaling, main_torch_config, worker_device
from opmix_ray.engine.ranks import from_rank0, gather_on_rank0, mean_over_ranks, rank_rows
from opmix_ray.engine.records import BoundaryInfo
from opmix_ray.engine.tracking import MainRunLog
from opmix_ray.evaluate import domain_losses
from opmix_ray.mixture import Mixture
from opmix_ray.model import build_model, load_checkpoint, n_params, on_device, set_threads
from opmix_ray.rundir import STATE_JSON, STATE_TENSORS
from opmix_ray.storage import atomic_write_bytes
from opmix_ray.training import accumulated_step, make_optimizer


def steps_and_boundaries(cfg: Config) -> tuple[int, list[int]]:
    """Total optimizer steps and the steps at which rounds start (uniform prefix, then even).
    main.batch_size is the global batch, so neither depends on the number of workers."""
    total = cfg.main.total_tokens // (cfg.main.batch_size * cfg.data.seq_len)
    if cfg.run.baseline != "none":
        return total, []
    return total, round_steps(total, cfg.rounds.uniform_prefix, cfg.rounds.num_rounds)


def round_steps(total: int, uniform_prefix: float, num_rounds: int) -> list[int]:
    """The steps of `total` at which rounds start: after the prefix, then evenly spaced (rounds.*);
    a trainer of your own places its boundaries with the same rule (opmix_ray/own_trainer/)."""
    if num_rounds == 0:
        return []
    prefix = int(round(uniform_prefix * total))
    span = (total - prefix) / num_rounds
    return [prefix + int(round(k * span)) for k in range(num_rounds)]


def checkpoint_path(run_dir: str, round_idx: int | str) -> str:
    return os.path.join(run_dir, rundir.checkpoint(round_idx))


def _report_checkpoint(model, name: str, metrics: dict, tokenizer_files: dict[str, bytes],
                       state: tuple[dict, dict] | None = None, final_dir: str | None = None) -> None:
    """Rank 0 reports the HF checkpoint (plus the resume tensors) and, once Ray Train has persisted
    it, writes the resume JSON into it atomically: that file's presence means the dir is whole."""
    with tempfile.TemporaryDirectory() as tmp:
        unwrapped = model.module if hasattr(model, "module") else model
        if ray.train.get_context().get_world_rank() == 0:
            unwrapped.save_pretrained(tmp, safe_serialization=True)
            write_checkpoint_files(tokenizer_files, tmp)  # AutoTokenizer loads the checkpoint too
            if state is not None:
                from safetensors.torch import save_file
                save_file(state[1], os.path.join(tmp, STATE_TENSORS))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
            if state is not None and final_dir:
                atomic_write_bytes(os.path.join(final_dir, STATE_JSON), json.dumps(state[0]).encode())
        else:
            ray.train.report(metrics)


def rank_state(sampler) -> tuple[dict, dict]:
    """One rank's own resume state: its sampler streams and its torch RNG."""
    meta, arrays = sampler.get_state()
    return meta, {**{k: torch.from_numpy(v) for k, v in arrays.items()}, "torch_rng": torch.get_rng_state()}


def _train_state(opt, sched, sampler, extra: dict, ranks: list[tuple[dict, dict]] | None = None) -> tuple[dict, dict]:
    """Everything beyond the weights that the next steps depend on, as (JSON, tensors): AdamW
    moments and step counts, the LR schedule position, and every rank's sampler streams and torch
    RNG (`ranks`, rank 0 first; None = this process alone). Rank 0's keys are unprefixed, as a
    one-worker run writes them; rank r's carry a 'rank<r>.' prefix. The optimizer is rank 0's:
    DDP keeps it identical on every rank."""
    tensors, scalars = {}, {}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{key}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = v
    ranks = ranks or [rank_state(sampler)]
    metas = []
    for r, (meta, rank_tensors) in enumerate(ranks):
        metas.append(meta)
        tensors.update({(f"rank{r}." if r else "") + k: v for k, v in rank_tensors.items()})
    sched_sd = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}  # the lambda is rebuilt
    return {"optimizer": {"param_groups": sd["param_groups"], "scalars": scalars}, "scheduler": sched_sd,
            "sampler": metas[0], "world_size": len(ranks), "rank_samplers": metas[1:], **extra}, tensors


def load_train_state(path: str, opt, sched, sampler, rank: int = 0, world: int = 1) -> dict:
    """Restore what _train_state saved in checkpoint dir `path` (rank `rank`'s sampler and RNG);
    returns its JSON (step, info...). A process that reads the run's state to continue it alone
    (the exact continuation) takes rank 0's."""
    from safetensors.torch import load_file
    with open(os.path.join(path, STATE_JSON)) as f:
        meta = json.load(f)
    saved_world = int(meta.get("world_size", 1))
    if world > 1 and saved_world != world:
        raise RuntimeError(f"main.num_workers: the checkpoint {path} was written by {saved_world} workers, not "
                           f"{world} (fix: resume with main.num_workers: {saved_world})")
    tensors = load_file(os.path.join(path, STATE_TENSORS))
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = t
    for key, v in meta["optimizer"]["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    sched.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(opt.param_groups)})
    prefix = f"rank{rank}." if rank else ""
    mine = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)} if rank else tensors
    sampler.set_state(meta["rank_samplers"][rank - 1] if rank else meta["sampler"],
                      {k: t.numpy() for k, t in mine.items() if k.startswith("sampler.")})
    torch.set_rng_state(mine["torch_rng"])
    return meta


def main_loop(loop_cfg: dict) -> None:
    """Ray Train worker loop (one per worker). loop_cfg["resume"] = {"round": k, "weights": pushed
    winner or None} restarts from main/round_k with its saved state (opmix_ray/engine/resume.py)."""
    cfg: Config = loop_cfg["config"]
    shards = ray.get(loop_cfg["shards_ref"])
    ctl = ray.get_actor(controller_name(cfg.run.name), namespace=loop_cfg["namespace"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_threads(cfg.main.cpus_per_worker)
    device = worker_device(cfg, cfg.placement.main_gpus)  # this worker's own GPU, or the CPU
    resume = loop_cfg.get("resume")
    ckpt = checkpoint_path(loop_cfg["run_dir"], resume["round"]) if resume else None
    if resume:
        model = on_device(load_checkpoint(ckpt), cfg.model, device)
        model.train()
    else:
        model = on_device(build_model(cfg.model, shards.vocab_size, shards.seq_len, seed=cfg.run.seed), cfg.model, device)
    plain = model  # rank 0 evaluates and saves the module itself, never through DDP's collectives
    if world > 1:
        # the only buffers are rotary frequencies, equal on every rank: no broadcast per forward
        model = ray.train.torch.prepare_model(model, move_to_device=False,
                                              parallel_strategy_kwargs={"broadcast_buffers": False})
    total, boundaries = steps_and_boundaries(cfg)
    opt, sched = make_optimizer(model, cfg.main, total, anneal_at=boundaries)
    _, live = ray.get(ctl.get_mixture.remote())
    sampler = make_sampler(cfg, shards, live, ckpt)
    tokens_per_step = cfg.main.batch_size * shards.seq_len
    n_par, t0, losses = n_params(plain), time.time(), []
    log = MainRunLog(cfg, loop_cfg["run_dir"], enabled=rank == 0)
    push = _PushTracker(ctl, sampler, shards, cfg, log, world)
    start, saved, train_s = 0, None, 0.0
    if resume:
        saved = load_train_state(ckpt, opt, sched, sampler, rank, world)
        start, losses = saved["step"], list(saved["losses"])
        sampler.rows_drawn = start * cfg.main.batch_size  # one global batch per step: where the push rule counts from
        push.stall_s, push.applied_step = dict(saved["stall_s"]), dict(saved["applied_step"])
        saved_info = BoundaryInfo.from_dict(saved["info"])  # train_state.json holds it as JSON
        train_s = saved_info.train_s
        if resume["weights"] is not None:  # the round was pushed: train on its winner, as the run did
            caps = shards.cap_tokens(cfg)
            for d in resume.get("revised", []):  # revised live after this checkpoint was written
                sampler.replace_domain(d, shards.train[d], caps[d])
            sampler.set_mixture(Mixture.from_dict({d: resume["weights"].get(d, 0.0) for d in sampler.domains}))
            push.stall_s[str(resume["round"])], push.applied_step[str(resume["round"])] = 0.0, start
    for step in range(start, total + 1):
        push.poll(step)
        if step in boundaries or step == total:
            k = boundaries.index(step) if step in boundaries else "final"
            if saved is not None and step == start:
                # evaluated and checkpointed before the driver died: report the same info again
                # (mid-round resume) or go straight on (the round was pushed)
                if resume["weights"] is None:
                    if rank == 0:
                        ray.get(ctl.report_boundary.remote(k, saved_info))
                    push.expect(k, step)
            else:
                ranks = gather_on_rank0(rank_state(sampler), world) if k != "final" else None
                info, state, metrics = None, None, {"step": step}
                if rank == 0:
                    val = domain_losses(plain, push.shards.val, batch_size=32, device=device)  # + domains added live
                    info = BoundaryInfo(
                        step=step, tokens=step * tokens_per_step, train_loss=float(np.mean(losses[-50:] or [math.nan])),
                        val_loss=val, drawn=sampler.segment_fractions(), mixture=sampler.mixture.as_dict(),
                        epochs=sampler.epochs(), n_params=n_par, flops=train_flops(n_par, step * tokens_per_step),
                        wall_s=time.time() - t0, path=checkpoint_path(loop_cfg["run_dir"], k),
                        lr=float(sched.get_last_lr()[0]), drawn_tokens=dict(sampler.drawn_total),
                        total_steps=total, tokens_per_step=tokens_per_step,
                        stall_s=dict(push.stall_s), applied_step=dict(push.applied_step), train_s=train_s)
                    if ranks is not None:
                        state = _train_state(opt, sched, sampler, {
                            "round": k, "step": step, "losses": losses[-50:], "info": info.as_dict(),
                            "stall_s": push.stall_s, "applied_step": push.applied_step}, ranks)
                    log.boundary(step, val)
                    metrics["mean_val_loss"] = float(np.mean(list(val.values())))
                _report_checkpoint(plain, f"round_{k}", metrics, push.shards.tokenizer_files, state,
                                   info and info.path)
                if rank == 0:
                    ray.get(ctl.report_final.remote(info) if k == "final" else ctl.report_boundary.remote(k, info))
                if k == "final":
                    break
                push.expect(k, step)
        t_step = time.perf_counter()
        batch, _ = sampler.next_batch(cfg.main.batch_size)
        micro = rank_rows(batch, rank, world, cfg.main.grad_accum_steps)
        loss = accumulated_step(model, opt, sched, micro, device)  # float(loss): synchronises a GPU
        losses.append(mean_over_ranks(loss, world))
        train_s += time.perf_counter() - t_step
        log.step(step, losses[-1], sampler.mixture.as_dict(), (step + 1) * tokens_per_step)
        if rank == 0 and step % 25 == 0:
            ctl.report_progress.remote({"step": step, "total": total, "loss": float(np.mean(losses[-25:])),
                                        "elapsed_s": time.time() - t0})
    log.close()


def make_sampler(cfg: Config, shards, live: Mixture, resume_ckpt: str | None) -> OpMixSampler:
    """The main run's sampler, the same on every rank (engine/ranks.py). A resumed run lists its
    domains in the order its saved state has them (domains removed live stay in it at weight 0),
    then those added since."""
    domains = list(shards.domains)
    if resume_ckpt:
        with open(os.path.join(resume_ckpt, STATE_JSON)) as f:
            saved = json.load(f)["sampler"]["domains"]
        domains = saved + [d for d in domains if d not in saved]
    return OpMixSampler({**shards.retired, **shards.train}, live.over(domains), shards.seq_len, shards.cap_tokens(cfg),
                        seed=sampler_seed(cfg.run), rows_per_step=cfg.main.batch_size)


class _PushTracker:
    """Applies pushed winners to the sampler and records how long the main run stood still.

    sync: the main run waits at each boundary for that round's winner. async: it never waits; it
    keeps training on the current mixture and switches at the first step after a push arrives.
    A round still running at the next boundary just continues (the driver starts the next round on
    the newer checkpoint when it is free), and a round that ends after the main run is recorded
    but never applied. With several workers rank 0's view of which pushes have arrived decides,
    so every rank switches at the same step."""

    def __init__(self, ctl, sampler, shards, cfg: Config, log: MainRunLog | None = None, world: int = 1):
        self.ctl, self.sampler, self.shards, self.cfg, self.mode = ctl, sampler, shards, cfg, cfg.rounds.mode
        self.world = world
        self.log = log or MainRunLog(cfg, "", enabled=False)
        self.shards_version = 0  # the controller's shards version this run trains on (engine/domains.py)
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
        # the newest pushed round wins; older ones still pending were overtaken (never pushed)
        i = max((j for j, (_, ref) in enumerate(self.pending) if ref in ready), default=-1)
        i = from_rank0(i, self.world)  # every rank has the same pending rounds, in the same order
        if i >= 0:
            k, ref = self.pending[i]
            winner = ray.get(ref)  # on rank > 0 this rank's own future of the same push
            self._refresh_shards()
            # a removed domain is absent from the push: it stays in the sampler at weight 0. The
            # push-at-step rule is the sampler's (data/feed.py): here no row of `step` is drawn yet,
            # so it applies at `step`, as it does for a trainer of your own without a loader ahead.
            self.applied_step[str(k)] = self.sampler.push(winner.over(self.sampler.domains), key=k)
            self.log.push(step, k, winner.as_dict())
            self.pending = self.pending[i + 1:]

    def _refresh_shards(self) -> None:
        """After a domain-set change (engine/domains.py) the controller holds new shards: take them, give the
        sampler streams for added domains and fresh ones for revised domains."""
        got = ray.get(self.ctl.get_shards.remote())
        if got is None or got[1] == self.shards_version:
            return
        old, self.shards, self.shards_version = self.shards, ray.get(got[0]), got[1]
        caps = self.shards.cap_tokens(self.cfg)
        for d in self.shards.domains:
            if d not in self.sampler.domains:
                self.sampler.add_domain(d, self.shards.train[d], caps[d])
            elif self.shards.source_hashes.get(d) != old.source_hashes.get(d):
                self.sampler.replace_domain(d, self.shards.train[d], caps[d])


@ray.remote(num_cpus=0)
def _fit(trainer: TorchTrainer):
    result = trainer.fit()
    if result.error:
        raise result.error
    return result.metrics


def launch_main_run(cfg: Config, shards_ref, run_dir: str, namespace: str, resume: dict | None = None):
    """Start the main run on main.num_workers workers in the background; returns the ObjectRef of
    its final metrics. resume={"round": k, "weights": ...|None} continues from main/round_k (see main_loop)."""
    trainer = TorchTrainer(
        main_loop,
        train_loop_config={"config": cfg, "shards_ref": shards_ref,
                           "run_dir": run_dir, "namespace": namespace, "resume": resume},
        scaling_config=main_scaling(cfg), torch_config=main_torch_config(cfg),
        run_config=RunConfig(storage_path=run_dir, name=rundir.MAIN),
    )
    # pinned to the driver's node: Train puts its controller where fit() is called (engine/faults.py)
    return _fit.options(scheduling_strategy=on_driver_node()).remote(trainer)
