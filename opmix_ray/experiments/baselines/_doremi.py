"""DoReMi-style Group DRO (Xie et al. 2023) at proxy scale.

1. A reference model trains on the natural mixture for bench.proxy_tokens.
2. A proxy of the same size trains on batches that hold every domain (the deficit sampler on
   uniform weights puts every domain in every batch once batch_size >= domains). Each step:
   lambda_i = mean over domain i's tokens of max(loss_proxy - loss_ref, 0);
   alpha' = softmax(log alpha + eta * lambda); alpha = (1 - c) alpha' + c / k;
   the proxy's loss is sum_i alpha_i * (its mean token loss on domain i).
3. The output is the time average of alpha over the proxy's steps.

The whole procedure is one Ray task (one CPU), so seeds run side by side.
"""
from __future__ import annotations

import time

import numpy as np
import ray
import torch

from opmix_ray.compute import eval_flops, train_flops
from opmix_ray.experiments.experiment_config import ExperimentConfig
from opmix_ray.data.sampler import MixtureSampler
from opmix_ray.experiments.baselines.base import BaselineContext, BaselineResult
from opmix_ray.mixture import Mixture
from opmix_ray.model import build_model, n_params, set_threads
from opmix_ray.training import make_optimizer, optimizer_step, train_step


def group_dro_update(alpha: np.ndarray, excess: np.ndarray, eta: float, smoothing: float) -> np.ndarray:
    """One DoReMi weight update from per-domain clipped excess losses."""
    z = np.log(alpha) + eta * excess
    a = np.exp(z - z.max())
    a /= a.sum()
    return (1.0 - smoothing) * a + smoothing / len(alpha)


def _token_ce(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x[:, :-1]).logits.float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="none")
    return ce.view(x.size(0), -1)


def run_doremi(cfg: ExperimentConfig, shards) -> dict:
    """Reference, then Group DRO proxy; returns the averaged weights, FLOPs and the weight path."""
    set_threads(1)
    t0, b, seed = time.time(), cfg.bench, cfg.run.seed
    steps = max(1, b.proxy_tokens // (cfg.main.batch_size * shards.seq_len))
    caps = shards.cap_tokens(cfg)
    ref = build_model(b.proxy_model, shards.vocab_size, shards.seq_len, seed)
    opt, sched = make_optimizer(ref, cfg.main, steps)
    sampler = MixtureSampler(shards.train, shards.natural(), shards.seq_len, caps, seed=seed * 1000)
    for _ in range(steps):
        train_step(ref, opt, sched, sampler.next_batch(cfg.main.batch_size)[0])
    ref.eval()
    proxy = build_model(b.proxy_model, shards.vocab_size, shards.seq_len, seed)
    opt, sched = make_optimizer(proxy, cfg.main, steps)
    sampler = MixtureSampler(shards.train, shards.uniform(), shards.seq_len, caps, seed=seed * 1000 + 1)
    k = len(shards.domains)
    alpha, total, path = np.full(k, 1.0 / k), np.zeros(k), []
    for step in range(steps):
        batch, which = sampler.next_batch(cfg.main.batch_size)
        x = torch.as_tensor(batch)
        with torch.no_grad():
            ref_ce = _token_ce(ref, x)
        ce = _token_ce(proxy, x)
        excess = (ce.detach() - ref_ce).clamp_min(0.0).mean(dim=1).numpy()  # per row; rows are equal length
        lam = np.array([excess[which == i].mean() if np.any(which == i) else 0.0 for i in range(k)])
        alpha = group_dro_update(alpha, lam, b.doremi_eta, b.doremi_smoothing)
        total += alpha
        counts = np.bincount(which, minlength=k)
        row_w = torch.as_tensor(alpha[which] / counts[which], dtype=torch.float32)
        optimizer_step(proxy, opt, sched, (ce.mean(dim=1) * row_w).sum())
        if step % max(1, steps // 10) == 0:
            path.append(alpha.tolist())
    n, t = n_params(proxy), steps * cfg.main.batch_size * shards.seq_len
    # reference training + proxy training + the reference's forward pass on the proxy's tokens
    flops = 2 * train_flops(n, t) + eval_flops(n, t)
    return {"weights": (total / steps).tolist(), "flops": flops, "wall_s": time.time() - t0, "path": path}


_remote_doremi = ray.remote(num_cpus=1)(run_doremi)


def doremi(ctx: BaselineContext, objective) -> BaselineResult:
    """DoReMi optimises worst-case excess loss over the training domains; `objective` is unused."""
    out = ray.get(_remote_doremi.remote(ctx.cfg, ctx.shards)) if ray.is_initialized() else run_doremi(ctx.cfg, ctx.shards)
    mix = Mixture.normalised(ctx.shards.domains, out["weights"], ctx.shards.data_hash)
    return BaselineResult("doremi", mix, out["flops"], out["wall_s"], {"weight_path": out["path"]})
