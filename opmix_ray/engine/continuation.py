"""The exact continuation of a main run from one of its round checkpoints, on a chosen mixture.

    out = continue_main_run(cfg, shards, "runs/bench/main/round_0", weights, steps=80)

It restores everything the main run itself would carry past the boundary: the weights, AdamW's
moments and step counts, the lr schedule's position, the sampler's streams, window orders and
repetition counters (so caps bind as they would), and torch's RNG; then it switches the sampler
to `weights` exactly as a push does and trains `steps` steps with the main run's own step. For
the mixture the run really pushed, its loss at the next boundary is the main run's own (a test
checks it). This is `opmix-ray fidelity`'s truth: what a candidate mixture would really have done.

truth_seed > 0 keeps all of that but reshuffles the data order from the boundary on, so two truth
seeds measure how much of a difference between candidates is data-order noise: their agreement
is the ceiling any proxy can reach.
"""
from __future__ import annotations

import time

import numpy as np

from opmix_ray.compute import eval_flops, train_flops
from opmix_ray.config import Config
from opmix_ray.engine.main_run import make_sampler, load_train_state, steps_and_boundaries
from opmix_ray.evaluate import domain_losses
from opmix_ray.mixture import Mixture
from opmix_ray.model import load_checkpoint, n_params, set_threads
from opmix_ray.engine.ranks import rank_rows
from opmix_ray.training import accumulated_step, make_optimizer


def _reshuffle(sampler, truth_seed: int) -> None:
    """A different data order from here on, same windows, same counters."""
    for i, stream in enumerate(sampler.streams.values()):
        rng = np.random.default_rng([truth_seed, i])
        stream.starts = np.concatenate([stream.starts[: stream.pos], rng.permutation(stream.starts[stream.pos:])])
        stream.rng = np.random.default_rng([truth_seed, i, 1])


def continue_main_run(cfg: Config, shards, checkpoint: str, weights: dict[str, float], steps: int,
                      truth_seed: int = 0, threads: int | None = None) -> dict:
    """Train the checkpoint's run on `weights` for `steps` steps; return val loss per domain and FLOPs."""
    if threads:
        set_threads(threads)
    t0 = time.time()
    model = load_checkpoint(checkpoint)
    model.train()
    total, boundaries = steps_and_boundaries(cfg)
    opt, sched = make_optimizer(model, cfg.main, total, anneal_at=boundaries)
    target = Mixture.from_dict(weights)
    sampler = make_sampler(cfg, shards, target, checkpoint)
    load_train_state(checkpoint, opt, sched, sampler)
    sampler.set_mixture(target.over(sampler.domains))
    if truth_seed:
        _reshuffle(sampler, truth_seed)
    parts = cfg.main.num_workers * cfg.main.grad_accum_steps  # every rank's micro-batches, in one process
    for _ in range(steps):
        batch, _ = sampler.next_batch(cfg.main.batch_size)
        accumulated_step(model, opt, sched, rank_rows(batch, 0, 1, parts))
    val = domain_losses(model, shards.val, batch_size=32)
    n = n_params(model)
    tokens = steps * cfg.main.batch_size * shards.seq_len
    eval_tokens = sum(v.shape[0] * shards.seq_len for v in shards.val.values())
    return {"val_loss": val, "drawn": sampler.segment_fractions(), "tokens": tokens,
            "flops": train_flops(n, tokens) + eval_flops(n, eval_tokens), "wall_s": time.time() - t0}


def continue_many(cfg: Config, shards, checkpoint: str, jobs: list[dict], steps: int) -> list[dict]:
    """Run continuation jobs ({"weights", "truth_seed"}) as Ray tasks, one CPU each, in job order."""
    import ray

    task = ray.remote(num_cpus=1)(continue_main_run)
    ref = ray.put(shards)
    return ray.get([task.remote(cfg, ref, checkpoint, j["weights"], steps, j.get("truth_seed", 0), 1) for j in jobs])
