"""Per-domain validation loss and the search objective."""
from __future__ import annotations

import math

import numpy as np
import torch

from opmix_ray.model import lm_loss


@torch.no_grad()
def window_losses(model, val: dict[str, np.ndarray], max_tokens: int | None = None, batch_size: int = 32,
                  device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Mean next-token loss of each held-out window per domain (the first max_tokens of them):
    the per-window values a paired comparison of two models needs."""
    was_training = model.training
    model.eval()
    out = {}
    for d, windows in val.items():
        seq_len = windows.shape[1] - 1
        n = windows.shape[0] if max_tokens is None else max(1, min(windows.shape[0], max_tokens // seq_len))
        parts = []
        for i in range(0, n, batch_size):
            x = torch.as_tensor(np.asarray(windows[i : min(n, i + batch_size)], dtype=np.int64), device=device)
            parts.append(lm_loss(model, x, reduction="none").double().cpu().numpy())
        out[d] = np.concatenate(parts)
    model.train(was_training)
    return out


def domain_losses(model, val: dict[str, np.ndarray], max_tokens: int | None = None,
                  batch_size: int = 32, device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean next-token loss on each domain's held-out windows (the first max_tokens of them).
    Summed per batch in float32, as every figure in benchmarks/results was computed."""
    was_training = model.training
    model.eval()
    out = {}
    with torch.no_grad():
        for d, windows in val.items():
            seq_len = windows.shape[1] - 1
            n = windows.shape[0] if max_tokens is None else max(1, min(windows.shape[0], max_tokens // seq_len))
            total = 0.0
            for i in range(0, n, batch_size):
                x = torch.as_tensor(np.asarray(windows[i : min(n, i + batch_size)], dtype=np.int64), device=device)
                total += float(lm_loss(model, x, reduction="none").sum())
            out[d] = total / n
    model.train(was_training)
    return out


def objective(losses: dict[str, float], weights: dict[str, float] | None = None) -> float:
    """sum_d v_d * loss_d with v normalised; v uniform over every domain when None."""
    if weights is None:
        weights = {d: 1.0 for d in losses}
    total = sum(weights.values())
    return sum(losses[d] * v for d, v in weights.items()) / total


def mean_perplexity(losses: dict[str, float]) -> float:
    """Mean over domains of per-domain perplexity exp(loss_d)."""
    return float(np.mean([math.exp(x) for x in losses.values()]))
