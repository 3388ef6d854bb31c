"""Aioli (Chen et al. 2024, arXiv 2411.05735): mixing-law parameters estimated during the one
training run, and the proportions moved by an exponentiated step on them.

One run of the main model on the main budget, in update rounds of bench.aioli_update_steps steps:
1. LearnParams: bench.aioli_lp_rounds sweeps over the k training domains in a random order; for
   domain j, bench.aioli_lp_steps training steps on the smoothed one-hot mixture
   p_j = f on j, (1 - f)/(k - 1) elsewhere (f = bench.aioli_one_hot_factor), then every domain's
   val loss; column j of the loss-decrease matrix G gains (loss before - loss after). G is averaged
   over sweeps, and each row i solved for A_i in G_i = A_i W, W the probe mixtures (row j = p_j), so
   A_ij is domain i's loss decrease per unit of domain j's weight (the linear mixing law).
2. A is optionally made non-negative and normalised to sum 1, then smoothed by an EMA (weight
   bench.aioli_ema on the previous one); the proportions move by p <- p * exp(eta * A^T 1),
   normalised: a domain gains in proportion to how much it lowers every domain's loss.
3. The rest of the round trains on p.
The probe steps are training steps of the same run (they count toward the main budget, as in the
reference implementation); their FLOPs and the probe evaluations are counted as search FLOPs.
The defaults are the reference README's example (lp_rounds 4, lp_steps 4, eta 0.2, EMA 0.1, one-hot
factor 0.625, normalised A, update_steps 250); bench.yaml scales the step counts to its 200-step run.

Aioli optimises the average training-domain loss; `objective` is unused (one row per seed).
"""
from __future__ import annotations

import time

import numpy as np
import ray

from opmix_ray.compute import eval_flops, train_flops
from opmix_ray.data.sampler import MixtureSampler
from opmix_ray.evaluate import domain_losses
from opmix_ray.experiments.baselines.base import BaselineContext, BaselineResult
from opmix_ray.mixture import Mixture
from opmix_ray.model import build_model, n_params, set_threads
from opmix_ray.training import make_optimizer, train_step


def probe_mixtures(k: int, one_hot_factor: float) -> np.ndarray:
    """W [k, k]: row j is the smoothed one-hot mixture on domain j."""
    if k == 1:
        return np.ones((1, 1))
    W = np.full((k, k), (1.0 - one_hot_factor) / (k - 1))
    np.fill_diagonal(W, one_hot_factor)
    return W


def interaction_matrix(G: np.ndarray, W: np.ndarray) -> np.ndarray:
    """A with G = A W: G[i, j] = domain i's loss decrease over probe j, W[j] = probe j's mixture."""
    return np.linalg.solve(W.T, G.T).T


def normalise_matrix(A: np.ndarray) -> np.ndarray:
    """Shifted to be non-negative, then scaled to sum 1 (the reference's aioli_normalize)."""
    A = A - min(A.min(), 0.0)
    s = A.sum()
    return A / s if s > 0 else np.full_like(A, 1.0 / A.size)


def aioli_update(p: np.ndarray, A: np.ndarray, eta: float) -> np.ndarray:
    """p <- p * exp(eta * A^T 1), normalised."""
    z = np.log(np.maximum(p, 1e-300)) + eta * A.sum(axis=0)
    w = np.exp(z - z.max())
    return w / w.sum()


def run_aioli(cfg, shards) -> dict:
    """The whole Aioli run; returns its final val losses, the mixture per round and the FLOPs."""
    set_threads(1)
    t0, b, seed = time.time(), cfg.bench, cfg.run.seed
    domains, k = list(shards.domains), len(shards.domains)
    tokens_per_step = cfg.main.batch_size * shards.seq_len
    total = max(1, cfg.main.total_tokens // tokens_per_step)
    model = build_model(cfg.model, shards.vocab_size, shards.seq_len, seed)
    opt, sched = make_optimizer(model, cfg.main, total)
    rng = np.random.default_rng([seed, 7])
    p = np.full(k, 1.0 / k)
    sampler = MixtureSampler(shards.train, Mixture.normalised(domains, p, shards.data_hash), shards.seq_len,
                             shards.cap_tokens(cfg), seed=seed * 1000)
    W, ema_A, step, probe_steps, n_evals, path = probe_mixtures(k, b.aioli_one_hot_factor), None, 0, 0, 0, []

    def train(mixture: np.ndarray, n: int) -> int:
        nonlocal step
        sampler.set_mixture(Mixture.normalised(domains, mixture, shards.data_hash))
        n = min(n, total - step)
        for _ in range(n):
            train_step(model, opt, sched, sampler.next_batch(cfg.main.batch_size)[0])
            step += 1
        return n

    def losses() -> np.ndarray:
        nonlocal n_evals
        n_evals += 1
        val = domain_losses(model, {d: shards.val[d] for d in domains})
        model.train()
        return np.array([val[d] for d in domains])

    lp_duration = b.aioli_lp_rounds * b.aioli_lp_steps * k
    while step < total:
        if total - step > lp_duration:  # LearnParams only when a learning part is left after it
            G, before = np.zeros((k, k)), losses()
            for j in np.concatenate([rng.permutation(k) for _ in range(b.aioli_lp_rounds)]):
                probe_steps += train(W[j], b.aioli_lp_steps)
                after = losses()
                G[:, j] += before - after
                before = after
            A = interaction_matrix(G / b.aioli_lp_rounds, W)
            if b.aioli_normalize:
                A = normalise_matrix(A)
            ema_A = A if ema_A is None or b.aioli_ema is None else (1 - b.aioli_ema) * A + b.aioli_ema * ema_A
            p = aioli_update(p, ema_A, b.aioli_eta)
            path.append({"step": step, "weights": p.tolist(), "A": ema_A.tolist()})
        train(p, max(b.aioli_update_steps - lp_duration, 1))
    val = domain_losses(model, shards.val)
    n = n_params(model)
    val_tokens = sum(v.size for d, v in shards.val.items() if d in domains)
    search = train_flops(n, probe_steps * tokens_per_step) + eval_flops(n, n_evals * val_tokens)
    return {"val_loss": val, "weights": p.tolist(), "path": path, "search_flops": search,
            "main_flops": train_flops(n, total * tokens_per_step), "wall_s": time.time() - t0,
            "probe_steps": probe_steps, "drawn": dict(sampler.drawn_total)}


_remote_aioli = ray.remote(num_cpus=1)(run_aioli)


def aioli(ctx: BaselineContext, objective) -> BaselineResult:
    out = ray.get(_remote_aioli.remote(ctx.cfg, ctx.shards)) if ray.is_initialized() else run_aioli(ctx.cfg, ctx.shards)
    mix = Mixture.normalised(ctx.shards.domains, out["weights"], ctx.shards.data_hash)
    return BaselineResult("aioli", mix, out["search_flops"], out["wall_s"], {**out, "online": True})
