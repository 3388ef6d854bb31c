"""Training steps shared by the main run and every fixed-mixture run (baselines, oracle, proxies,
fidelity truths), so a baseline trains exactly as the main run would on its mixture.

    out = train_fixed(cfg.model, cfg.main, shards, mixture, tokens=409_600, seed=0)

Fixed-mixture runs go through Ray Tune as trials (`run_fixed_jobs`): a swarm of proxies, the
baselines' full runs and the oracle are all just lists of jobs.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import TypedDict

import numpy as np
import torch

from opmix_ray.compute import eval_flops, train_flops
from opmix_ray.config import MainSection, ModelSection
from opmix_ray.data.sampler import MixtureSampler
from opmix_ray.evaluate import domain_losses
from opmix_ray.mixture import Mixture
from opmix_ray.model import build_model, distill_loss, lm_loss, load_checkpoint, n_params, save_checkpoint


def lr_lambda(warmup: int, total: int, kind: str = "cosine", anneal_at: list[int] | tuple = (),
              decay_fraction: float = 0.1):
    """The lr multiplier per step. cosine: linear warmup, then cosine decay to 10% of the peak over
    `total` steps. wsd (warmup-stable-decay): the peak after warmup, except a linear anneal to 10%
    over the last `decay_fraction` of every segment ending at a step in `anneal_at` or at `total`,
    so every checkpoint a round decides on is annealed; after it the lr returns to the peak."""
    ends = sorted({int(b) for b in anneal_at if 0 < b < total} | {total})

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    def wsd(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        start = 0
        for end in ends:
            if step < end:
                n = max(1, int(round(decay_fraction * (end - start))))
                return 1.0 if step < end - n else 1.0 - 0.9 * (step - (end - n) + 1) / n
            start = end
        return 0.1

    return wsd if kind == "wsd" else cosine


def make_optimizer(model, main: MainSection, total: int, start_step: int = 0, anneal_at: list[int] | tuple = ()):
    """AdamW (betas 0.9/0.95) and the schedule; start_step resumes the schedule mid-run; anneal_at
    are the round boundaries a wsd schedule anneals before."""
    opt = torch.optim.AdamW(model.parameters(), lr=main.lr, weight_decay=main.weight_decay, betas=(0.9, 0.95))
    f = lr_lambda(main.warmup_steps, total, main.schedule, anneal_at, main.wsd_decay_fraction)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: f(s + start_step))
    return opt, sched


def main_lr_at(main: MainSection, step: int, total: int, anneal_at: list[int] | tuple = ()) -> float:
    """The main run's learning rate at `step` (what the next optimizer step would use)."""
    return main.lr * lr_lambda(main.warmup_steps, total, main.schedule, anneal_at, main.wsd_decay_fraction)(step)


def optimizer_step(model, opt, sched, loss: torch.Tensor) -> float:
    """Backward, clip to norm 1, step, advance the schedule (None: a constant lr). Every training
    loop (main run, adapters, baselines) steps through here."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if sched is not None:
        sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def train_step(model, opt, sched, batch: np.ndarray, device="cpu") -> float:
    """One optimizer step on the mean next-token loss of windows [B, seq_len + 1]."""
    return optimizer_step(model, opt, sched, lm_loss(model, torch.as_tensor(batch, device=device)))


def accumulated_step(model, opt, sched, micro: list[np.ndarray], device="cpu") -> float:
    """One optimizer step on the mean loss over equal micro-batches (gradient accumulation); the
    mean loss of this process's rows. Under DDP only the last micro-batch's backward all-reduces."""
    if len(micro) == 1:
        return train_step(model, opt, sched, micro[0], device)
    total = 0.0
    for mb in micro[:-1]:
        with model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext():
            loss = lm_loss(model, torch.as_tensor(mb, device=device)) / len(micro)
            loss.backward()
        total += float(loss.detach())
    return total + optimizer_step(model, opt, sched, lm_loss(model, torch.as_tensor(micro[-1], device=device)) / len(micro))


def train_fixed(model_cfg: ModelSection, main: MainSection, shards, mixture: Mixture, tokens: int,
                seed: int, caps: dict[str, float] | None = None, init_path: str | None = None,
                schedule: tuple[int, int] | None = None, eval_tokens: int | None = None,
                save_path: str | None = None, data_seed: int | None = None, distill: dict | None = None) -> dict:
    """Train on one fixed mixture for `tokens` tokens; return final per-domain val loss and FLOPs.

    From scratch (seeded exactly as the main run: model seed, sampler 1000 x data_seed, which
    defaults to seed) unless init_path names a checkpoint; schedule=(start_step, total_steps)
    continues a main run's lr schedule. distill={"teacher": checkpoint, "old": [domains],
    "kl_weight": w}: the rows drawn from the old domains train toward the teacher's predictions
    (model.distill_loss) instead of their tokens; the teacher's forward passes count as FLOPs.
    """
    t0 = time.time()
    model = load_checkpoint(init_path) if init_path else build_model(model_cfg, shards.vocab_size, shards.seq_len, seed)
    steps = max(1, tokens // (main.batch_size * shards.seq_len))
    start, total = schedule or (0, steps)
    opt, sched = make_optimizer(model, main, total, start)
    sampler = MixtureSampler(shards.train, mixture, shards.seq_len, caps,
                             seed=1000 * (seed if data_seed is None else data_seed))
    teacher, old_idx, teacher_tokens = None, set(), 0
    if distill:
        teacher = load_checkpoint(distill["teacher"]).eval()
        old_idx = {sampler.domains.index(d) for d in distill["old"] if d in sampler.domains}
    model.train()
    for _ in range(steps):
        batch, which = sampler.next_batch(main.batch_size)
        if teacher is None:
            train_step(model, opt, sched, batch)
            continue
        old_rows = torch.as_tensor(np.isin(which, list(old_idx)))
        teacher_tokens += int(old_rows.sum()) * shards.seq_len
        optimizer_step(model, opt, sched, distill_loss(model, teacher, torch.as_tensor(batch), old_rows,
                                                       distill.get("kl_weight", 1.0)))
    val = domain_losses(model, shards.val, max_tokens=eval_tokens)
    if save_path:
        save_checkpoint(model, save_path, shards.tokenizer_files)
    n, t = n_params(model), steps * main.batch_size * shards.seq_len
    eval_t = sum(min(v.shape[0], (eval_tokens or 10**12) // shards.seq_len) * shards.seq_len for v in shards.val.values())
    return {"val_loss": val, "drawn": {d: sampler.drawn_total[d] / t for d in sampler.domains},
            "n_params": n, "tokens": t, "flops": train_flops(n, t) + eval_flops(n, eval_t + teacher_tokens),
            "teacher_flops": eval_flops(n, teacher_tokens), "wall_s": time.time() - t0}


class FixedJob(TypedDict, total=False):
    """One fixed-mixture training run for run_fixed_jobs; made by fixed_job, the only builder."""
    weights: dict[str, float]  # the mixture, per domain
    model: dict  # a ModelSection's fields: the model trained from scratch (or from init_path)
    main: dict  # a MainSection's fields: lr, batch, schedule
    tokens: int  # the run's budget
    seed: int  # init and split seed
    data_seed: int | None  # the data order; None: the seed's own
    caps: dict[str, int] | None  # repetition caps, tokens per domain
    init_path: str | None  # start from this checkpoint instead of from scratch
    save_path: str | None  # write the final HF checkpoint here
    schedule: dict | None  # an lr schedule other than main's
    eval_tokens: int | None  # val tokens per domain scored at the end (default: all)
    distill: dict | None  # {"teacher": checkpoint, "old": [domains], "kl_weight": w}: see train_fixed
    # any other key is a label, copied into the job's row (label, order, method, stage, ...)


def fixed_job(cfg, seed: int, shards, weights, data_seed: int | None = None, tokens: int | None = None,
              model: ModelSection | None = None, **labels) -> FixedJob:
    """A run_fixed_jobs job: `model` (default cfg.model) trained for cfg's main budget (or `tokens`)
    on fixed `weights` (a dict per domain, or values in shards.domains order), init and split seed
    `seed`, data order `data_seed`, cfg's repetition caps; labels (init_path, save_path, schedule,
    eval_tokens, or names copied into the job's row) are passed through."""
    w = dict(weights) if isinstance(weights, dict) else dict(zip(shards.domains, map(float, weights)))
    return FixedJob(weights=w, model=(model or cfg.model).model_dump(), main=cfg.main.model_dump(),
                    tokens=tokens or cfg.main.total_tokens, seed=seed, data_seed=data_seed,
                    caps=shards.cap_tokens(cfg), **labels)


def _fixed_trainable(config: dict, jobs: list[FixedJob], shards) -> dict:
    from opmix_ray.model import set_threads
    set_threads(1)
    job = jobs[config["job"]]
    if isinstance(shards, dict):  # several seeds' data in one Tune run: the job's seed picks its shards
        shards = shards[job["seed"]]
    mixture = Mixture.from_dict(job["weights"], shards.domains)
    out = train_fixed(ModelSection(**job["model"]), MainSection(**job["main"]), shards, mixture, job["tokens"],
                      job["seed"], job.get("caps"), job.get("init_path"), job.get("schedule"), job.get("eval_tokens"),
                      job.get("save_path"), job.get("data_seed"), job.get("distill"))
    return {"job": config["job"], "flops": out["flops"], "wall_s": out["wall_s"], "n_params": out["n_params"],
            "teacher_flops": out["teacher_flops"],
            **{f"loss_{d}": v for d, v in out["val_loss"].items()},
            **{f"drawn_{d}": v for d, v in out["drawn"].items()}}


def run_fixed_jobs(jobs: list[FixedJob], shards, storage_path: str, name: str, max_concurrent: int = 2,
                   on_row=None) -> list[dict]:
    """Run fixed-mixture training jobs as Ray Tune trials; returns one row per job, in job order.

    `shards` is one TokenShards, or {seed: TokenShards} when the jobs span seeds.
    A job: {weights, model (ModelSection dict), main (MainSection dict), tokens, seed, caps?,
    init_path?, schedule?, eval_tokens?, save_path? (write the final HF checkpoint), data_seed? (the
    data order; default seed), ...labels}.
    Extra keys are copied into the row.
    on_row(index, row): called in this process as each job finishes, so a caller can keep the
    finished runs of a long batch that is stopped before its end.
    """
    from ray import tune
    trainable = tune.with_resources(tune.with_parameters(_fixed_trainable, jobs=jobs, shards=shards), {"cpu": 1})
    tuner = tune.Tuner(
        trainable, param_space={"job": tune.grid_search(list(range(len(jobs))))},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=storage_path, name=name, verbose=0,
                                  callbacks=[_row_callback(jobs, on_row)] if on_row else None))
    results = tuner.fit()
    rows: list[dict | None] = [None] * len(jobs)
    for r in results:
        if r.error or not r.metrics or "job" not in r.metrics:
            continue
        rows[r.metrics["job"]] = _row(jobs, r.metrics)
    missing = [i for i, r in enumerate(rows) if r is None]
    if missing:
        raise RuntimeError(f"fixed-mixture runs {missing} of '{name}' failed; see {storage_path}/{name}")
    return rows


def _row(jobs: list[dict], m: dict) -> dict:
    """A finished trial's metrics as its job's row."""
    return {**{k: v for k, v in jobs[m["job"]].items() if k not in ("model", "main", "caps")},
            "val_loss": {k[5:]: v for k, v in m.items() if k.startswith("loss_")},
            "drawn": {k[6:]: v for k, v in m.items() if k.startswith("drawn_")},
            "flops": m["flops"], "wall_s": m["wall_s"], "n_params": m["n_params"],
            "teacher_flops": m.get("teacher_flops", 0.0)}


def _row_callback(jobs: list[dict], on_row):
    """A Tune callback that hands each finished job's row to on_row (Tune runs callbacks in the driver).
    Built here so importing this module does not import Ray Tune."""
    from ray.tune import Callback

    class RowCallback(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            m = trial.last_result or {}
            if "job" in m:
                on_row(m["job"], _row(jobs, m))

    return RowCallback()
