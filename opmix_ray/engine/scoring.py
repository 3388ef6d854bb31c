"""What a trial process runs: build the round's merged model once, then merge and evaluate candidates.

engine/search.py (the search) and engine/trial_batch.py (batches, the scorer pool) both score through
here; this module knows nothing of either, so neither import goes in a circle.
"""
from __future__ import annotations

import numpy as np
import ray
import torch
from ray import tune
from transformers import AutoConfig, AutoModelForCausalLM

from opmix_ray.engine.merge import MergedModel
from opmix_ray.engine.placement import granted_device
from opmix_ray.evaluate import domain_losses, objective
from opmix_ray.mixture import Mixture, expand_collapsed
from opmix_ray.model import autocast_for, set_threads
from opmix_ray.searchers import TrialResult
from search_spaces import SimplexSpace

_CACHE: dict = {}  # per trial-actor process: (round key, device) -> MergedModel (reuse_actors=True keeps it)


def candidate_mixture(c, a: np.ndarray) -> Mixture:
    """The mixture over domains that adapter weights `a` stand for (c: trials.Candidates)."""
    return expand_collapsed(c.coords, a, c.current)


def merged_model(c, device: torch.device = torch.device("cpu")) -> MergedModel:
    """The round's base model with its adapters' deltas, on `device` (built once per process and device)."""
    key = (c.key, str(device))
    if key not in _CACHE:
        _CACHE.clear()
        conf = AutoConfig.for_model(**c.model_config)
        model = AutoModelForCausalLM.from_config(conf)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in c.base_state.items()}, strict=True)
        # moved before the merge holds the base weights: dense deltas then merge on the device too
        model = model.to(device).eval()
        model._opmix_autocast = autocast_for(device, c.precision)  # lm_loss autocasts as the main run does
        _CACHE[key] = MergedModel(model, c.stacked, c.norm_to)
    return _CACHE[key]


def score(c, a: np.ndarray, device: torch.device = torch.device("cpu")) -> dict:
    """Merge with weights a, evaluate on `device`, return the trial's metrics."""
    mm = merged_model(c, device)
    mm.apply(c.full(a))
    losses = domain_losses(mm.model, c.val, max_tokens=c.max_tokens, device=device)
    mix = candidate_mixture(c, a)
    return TrialResult(objective(losses, c.objective_weights), losses, mix.as_dict(),
                       {k: float(x) for k, x in zip(c.coords, a)}).as_row()


def score_all(c, params: list[dict], cpus: float, gpus: float = 0.0, device_pref: str = "auto") -> list[dict]:
    """Trial configs (the space's params) scored in order with one torch thread per CPU held, on the
    GPU the trial was granted (placement.trial_gpus = gpus > 0; device_pref: model.device), else the CPU."""
    set_threads(cpus)
    device = granted_device(gpus, device_pref)
    space = c.space or SimplexSpace(c.coords)
    return [score(c, space.weights(p), device) for p in params]


def merged_trial(config: dict, candidates, cpus: float, gpus: float = 0.0, device_pref: str = "auto") -> None:
    """The Tune trainable: one candidate, one merge, one evaluation."""
    (row,) = score_all(candidates, [config], cpus, gpus, device_pref)
    tune.report({**row, "node_id": ray.get_runtime_context().get_node_id()})
