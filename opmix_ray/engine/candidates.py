"""A round's candidates: what every search trial merges and scores.

A candidate is a weight vector a over the adapters ({old, d_1..d_k}); a trial sets the model's
adapted weights to W0 + c * sum_i a_i * delta_i (engine/merge.py; c = search.delta_scale), measures
per-domain validation loss on the selection windows and reports the objective plus the mixture a
stands for, E(a)[d] = a_old * p_d + a_d (engine/scoring.py). The space holds only mixtures within the
repetition caps left (search.caps). The base weights, the stacked deltas and the windows go into the
object store once, as one `Candidates`.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from opmix_ray.config import Config
from opmix_ray.console import say
from opmix_ray.engine.adapters import REPLICATE, adapter_tokens
from opmix_ray.engine.merge import (MergedModel, delta_norm, load_dense_deltas, load_full_delta, load_lora_factors,
                                   moved_by, stack_deltas, stack_factors)
from opmix_ray.engine.records import BoundaryInfo
from opmix_ray.engine.trial_batch import start_scorers
from opmix_ray.evaluate import domain_losses, objective
from opmix_ray.mixture import Mixture
from opmix_ray.model import autocast_for, load_checkpoint
from opmix_ray.searchers import TrialResult
from opmix_ray.storage import sha256_file
from search_spaces import SimplexSpace


@dataclass
class Candidates:
    """Everything a trial needs, shared through the object store."""
    key: str
    coords: tuple[str, ...]
    model_config: dict
    base_state: dict[str, np.ndarray]
    stacked: dict  # module -> LowRankStack (LoRA) or dense [k, out, in] (full components)
    val: dict[str, np.ndarray]
    current: Mixture
    objective_weights: dict[str, float] | None
    max_tokens: int | None
    space: object = None  # the search space (plain simplex, or the cap polytope)
    extra: tuple[str, ...] = ()  # stacked after coords but never searched: the 'old' replicate
    scale: float = 1.0  # c, already applied to `stacked`
    driver_evals: int = 0  # evaluations outside the trials (choosing c, the decision): counted as search
    norm_to: float | None = None  # search.delta_norm: matched -> every merge has the 'old' delta's norm
    fingerprint: str = ""  # what trials are scored on (adapters, base, scale, space): a journal is reused only on it
    caps_share: dict[str, float] | None = None  # per domain, the share of the rest of the run its cap allows
    stay: dict[str, float] | None = None  # what staying stands for when not `current`: new data at a prior share
    precision: str = "auto"  # model.precision: candidates are scored under the main run's autocast

    def full(self, a) -> np.ndarray:
        """Weights over coords + extra (the extra adapters at 0)."""
        return np.concatenate([np.asarray(a, dtype=np.float64), np.zeros(len(self.extra))])

    def unit(self, name: str) -> np.ndarray:
        """Weights with only adapter `name` at 1."""
        w = np.zeros(len(self.coords) + len(self.extra))
        w[(self.coords + self.extra).index(name)] = 1.0
        return w


def build_candidates(cfg: Config, key: str, base_path: str, adapter_dirs: dict[str, str], shards,
                     current: Mixture, info: BoundaryInfo | None = None, segment_tokens: int | None = None,
                     stay: dict[str, float] | None = None) -> Candidates:
    """info: the boundary's report (caps need drawn_tokens, total_steps, tokens_per_step, step);
    segment_tokens: the main-run tokens until the next decision (delta_scale: auto); stay: the
    mixture staying stands for, when new data gets a prior share (engine/rule.py prior_stay)."""
    if cfg.search.scorer_pool and ray.is_initialized():
        start_scorers(cfg)  # a no-op once the run started them; else their imports overlap the loading below
    model = load_checkpoint(base_path)
    model._opmix_autocast = autocast_for(torch.device("cpu"), cfg.model.precision)  # the driver's own scoring
    coords = tuple(c for c in adapter_dirs if c != REPLICATE)
    extra = (REPLICATE,) if REPLICATE in adapter_dirs else ()
    if cfg.adapters.kind == "full":  # full components are dense by nature
        stacked = stack_deltas([load_full_delta(adapter_dirs[c], model) for c in coords + extra])
    else:  # LoRA stays factored: O(sum of ranks x (in + out)) per module, never k dense deltas
        stacked = stack_factors([load_lora_factors(adapter_dirs[c]) for c in coords + extra])
        dense = [load_dense_deltas(adapter_dirs[c], model) for c in coords + extra]
        if any(dense):  # adapters.embedding: the embedding's delta, merged in place (a tied head with it)
            stacked = {m: D for m, D in stacked.items() if not moved_by(model, m, dense[0])}
            stacked.update(stack_deltas(dense))
    base_state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    space = search_space(cfg, coords, current, shards, info)
    caps = cap_shares(cfg, shards, info) if cfg.search.caps and info is not None and info.has_caps_state else None
    # the key names this build only: a process that drives two runs of the same name (or the same
    # round twice) must never score one build's candidates on another's cached merged model
    key = f"{key}/{uuid.uuid4().hex}"
    cands = Candidates(key, coords, model.config.to_dict(), base_state, stacked, shards.selection(), current,
                       objective_weights(cfg, shards), cfg.search.eval_tokens_per_domain, space, extra, caps_share=caps,
                       stay=dict(stay) if stay else None, precision=cfg.model.precision)
    ratio = segment_tokens / adapter_tokens(cfg, shards.seq_len) if segment_tokens else None
    scale = delta_scale(cfg, cands, model, ratio)
    if scale != 1.0:
        cands.stacked = {m: (scale * D).astype(np.float32) for m, D in stacked.items()}
        cands.scale = scale
    if cfg.search.delta_norm == "matched" and "old" in coords:
        cands.norm_to = delta_norm(cands.stacked, coords.index("old"))
    cands.fingerprint = _fingerprint(cands, base_path, adapter_dirs)
    return cands


def _fingerprint(cands: Candidates, base_path: str, adapter_dirs: dict[str, str]) -> str:
    """sha256 over the adapters' weights, the base checkpoint, the scale and the space's caps: two
    builds with one fingerprint score every candidate alike (adapter training is deterministic, so
    a round redone on resume gets the fingerprint of the interrupted one)."""
    h = hashlib.sha256()
    for name in sorted(adapter_dirs):
        h.update(name.encode())
        for f in sorted(Path(adapter_dirs[name]).glob("*.safetensors")):
            h.update(sha256_file(f).encode())
    for f in sorted(Path(base_path).glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    h.update(json.dumps([cands.coords, cands.extra, cands.scale, cands.current.as_dict(), cands.max_tokens,
                         type(cands.space).__name__, getattr(cands.space, "caps_share", None)], sort_keys=True,
                        default=str).encode())
    return h.hexdigest()


def cap_shares(cfg: Config, shards, info: BoundaryInfo) -> dict[str, float]:
    """Per domain, the share of the tokens left that its repetition cap still allows."""
    left = (info.total_steps - info.step) * info.tokens_per_step
    caps = shards.cap_tokens(cfg)
    return {d: float(max(0.0, caps[d] - info.drawn_tokens.get(d, 0)) / left) if left > 0 else 1.0
            for d in shards.domains}


def search_space(cfg: Config, coords: tuple[str, ...], current: Mixture, shards, info: BoundaryInfo | None):
    """The plain simplex, or (search.caps) the polytope a_old * p_d + a_d <= cap share left."""
    plain = SimplexSpace(coords)
    if not cfg.search.caps or info is None or not info.has_caps_state:
        return plain
    from search_spaces import OLD, CollapsedSpace, PolytopeSimplex, cap_constraints
    shares = cap_shares(cfg, shards, info)
    try:
        if OLD in coords:
            space = CollapsedSpace(current.as_dict(), coords, shares)
        else:
            space = PolytopeSimplex(coords, *cap_constraints(coords, current.as_dict(), shares))
        return space if len(space.b_ub) else plain
    except ValueError as exc:  # the caps cannot all hold: the sampler will redistribute anyway
        say(f"repetition caps leave no feasible mixture ({exc}); searching the plain simplex")
        return plain


SCALE_GRID = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


def delta_scale(cfg: Config, cands: Candidates, model, token_ratio: float | None) -> float:
    """c for the merged delta. auto: the segment-to-adapter token ratio, but no larger than the c at
    which the 'old' adapter alone (stay) stops lowering the mean loss of the training domains on the
    selection windows: past it the merged model overshoots and every candidate's score is off."""
    if cfg.search.delta_scale != "auto":
        return float(cfg.search.delta_scale)
    if token_ratio is None or "old" not in cands.coords:
        return 1.0
    mm = MergedModel(model.eval(), cands.stacked)
    train = {d: cands.val[d] for d in cands.current.domains}
    grid = sorted({c for c in SCALE_GRID if c < token_ratio} | {max(1.0, token_ratio)})
    losses = []
    for c in grid:
        mm.apply(c * cands.unit("old"))
        losses.append(objective(domain_losses(mm.model, train, max_tokens=cands.max_tokens)))
        if len(losses) > 1 and losses[-1] > losses[-2]:
            break  # past the minimum along the stay direction
    mm.close()
    cands.driver_evals += len(losses)
    return float(grid[int(np.argmin(losses))])


def objective_weights(cfg: Config, shards) -> dict[str, float]:
    """The configured objective, or the mean over the training domains (never eval-only ones)."""
    return dict(cfg.search.objective_weights or {d: 1.0 for d in shards.domains})


def trial_weights(c: Candidates, metrics: dict) -> np.ndarray:
    """The adapter weights a trial scored, in coordinate order (its mixture is only the record)."""
    w = TrialResult.from_row(metrics).weights
    return np.array([w[k] for k in c.coords], dtype=np.float64)
