"""What each part of a run asks Ray for, from the config's placement: section, and the torch device a
process then uses.

The request is built here from the config alone: the machine the driver runs on decides nothing (a
CPU-only head node still places the main run on GPU workers). The device is decided inside the
worker, from what Ray granted it: a process given a GPU share computes there when torch sees a CUDA
device, every other process on the CPU. The main run's workers keep their Ray resources (and their
GPU memory) while a round runs, idle in rounds.mode: sync and training in async, so a round's
processes need shares that fit beside them (gpu_problem; docs/gpu.md).
"""
from __future__ import annotations

import math
import os

from typing import TYPE_CHECKING

import ray

from opmix_ray.config import Config

if TYPE_CHECKING:  # imported where used: the preflight's checks need neither torch nor Ray Train
    import torch
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

_EPS = 1e-6  # Ray counts shares to 4 decimals


def _per_worker(cpus: float, gpus: float) -> dict[str, float]:
    # no "GPU" key at 0: the CPU-only request is exactly the one the run always made
    return {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}


def main_scaling(cfg: Config) -> ScalingConfig:
    """The main run's Ray Train workers: main.num_workers of main.cpus_per_worker CPUs and placement.main_gpus."""
    from ray.train import ScalingConfig
    g = cfg.placement.main_gpus
    return ScalingConfig(num_workers=cfg.main.num_workers, use_gpu=g > 0,
                         resources_per_worker=_per_worker(cfg.main.cpus_per_worker, g))


def main_torch_config(cfg: Config) -> TorchConfig:
    """DDP's backend: nccl between GPU workers when this torch build has it, else gloo. One worker
    runs no collective, so it takes gloo, which starts anywhere (also where a GPU is only declared)."""
    import torch.distributed as dist
    from ray.train.torch import TorchConfig
    nccl = cfg.placement.main_gpus > 0 and cfg.main.num_workers > 1 and dist.is_nccl_available()
    return TorchConfig(backend="nccl" if nccl else "gloo")


def adapter_workers(cfg: Config, n_adapters: int, available: dict[str, float]) -> int:
    """adapters.num_workers, or as many workers as the resources free now hold (at most one per
    adapter, at least one): after a node loss a rerun fits on what is left."""
    if cfg.adapters.num_workers:
        return cfg.adapters.num_workers
    p = cfg.placement
    n = min(n_adapters, int(available.get("CPU", 1) // p.adapter_cpus))
    if p.adapter_gpus > 0:
        n = min(n, math.floor(available.get("GPU", 0.0) / p.adapter_gpus + _EPS))
    return max(1, n)


def adapter_scaling(cfg: Config, workers: int) -> ScalingConfig:
    from ray.train import ScalingConfig
    g = cfg.placement.adapter_gpus
    return ScalingConfig(num_workers=workers, use_gpu=g > 0,
                         resources_per_worker=_per_worker(cfg.placement.adapter_cpus, g))


def adapter_torch_config() -> TorchConfig:
    """Adapter workers train apart and never exchange a tensor: gloo, whatever they hold."""
    from ray.train.torch import TorchConfig
    return TorchConfig(backend="gloo")


def trial_resources(cfg: Config) -> dict[str, float]:
    """One search trial's request, in tune.with_resources' keys."""
    g = cfg.placement.trial_gpus
    return {"cpu": cfg.search.cpus_per_trial, **({"gpu": g} if g > 0 else {})}


def confirm_options(cfg: Config, available: dict[str, float]) -> dict[str, float]:
    """The confirmation task's ray.remote options: placement.confirm_cpus, or the CPUs free now (at
    most 8; the main run idles in a synchronous round), and placement.confirm_gpus."""
    cpus = cfg.placement.confirm_cpus or max(1, min(8, int(available.get("CPU", 1))))
    return {"num_cpus": cpus, "num_gpus": cfg.placement.confirm_gpus}


def worker_device(cfg: Config, share: float) -> torch.device:
    """This process's torch device, in a process whose role the placement gave `share` GPUs."""
    return granted_device(share, cfg.model.device)


def granted_device(share: float, pref: str = "auto") -> torch.device:
    """The GPU Ray granted this process when its role's share is > 0 and torch sees a CUDA device here,
    else the CPU (pref: model.device; cuda refuses the fallback, cpu never takes a GPU)."""
    import torch
    ids = [str(i) for i in ray.get_gpu_ids()] if share > 0 and pref != "cpu" and ray.is_initialized() else []
    if ids and torch.cuda.is_available():
        # Ray narrows CUDA_VISIBLE_DEVICES to the granted GPUs (Ray Train: to those of the node's
        # workers), so this process's own GPU is where its first granted id stands in that list
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        device = torch.device("cuda", visible.index(ids[0]) if ids[0] in visible else 0)
        torch.cuda.set_device(device)  # collectives and index-less "cuda" tensors go to the current device
        return device
    if pref == "cuda":
        raise RuntimeError(f"model.device: cuda, but this process (Ray GPU ids {ids}) sees no CUDA device (fix: "
                           "check the node's driver and that torch is a CUDA build, or model.device: auto)")
    return torch.device("cpu")


def _gpus_of(node: dict[str, float]) -> list[float]:
    """A node's GPUs as free shares, one per GPU (a declared fraction of a GPU is one partial GPU)."""
    g = float(node.get("GPU", 0.0))
    return [1.0] * int(g) + ([g - int(g)] if g - int(g) > _EPS else [])


def _place(nodes: list[list[float]], share: float, n: int) -> bool:
    """Take n processes of `share` GPUs from `nodes` (first fit, as Ray packs them: a fraction on one
    GPU, whole GPUs on one node); False when one does not fit."""
    if share <= 0:
        return True
    for _ in range(n):
        for gpus in nodes:
            if share < 1:
                i = next((i for i, f in enumerate(gpus) if f + _EPS >= share), None)
                if i is not None:
                    gpus[i] -= share
                    break
            else:
                whole = [i for i, f in enumerate(gpus) if f + _EPS >= 1][:int(share)]
                if len(whole) == int(share):
                    for i in whole:
                        gpus[i] = 0.0
                    break
        else:
            return False
    return True


def _gpus(x: float) -> str:
    return f"{x:g} GPU" + ("" if x == 1 else "s")


def gpu_problem(cfg: Config, nodes: list[dict[str, float]]) -> str | None:
    """Whether the placement's GPU requests fit the cluster (`nodes`: each alive node's resources):
    one line naming the field, with the fix, or None. Ray does not refuse a request no node can
    meet: it waits for it, so a run would hang at its start or its first round."""
    p = cfg.placement
    if not p.any_gpus():
        return None
    gpus = [_gpus_of(n) for n in nodes]
    total, largest = sum(map(sum, gpus)), max((sum(g) for g in gpus), default=0.0)
    has = (f"the cluster has {_gpus(total)}" + (f", at most {largest:g} on one node" if len(gpus) > 1 else "")
           if total else "the cluster has no GPUs")
    cpu_fix = "0 to run it on CPUs"
    if not _place(gpus, p.main_gpus, cfg.main.num_workers):
        return (f"config error at placement.main_gpus: {cfg.main.num_workers} main-run worker(s) x "
                f"{_gpus(p.main_gpus)}, but {has} (fix: {cpu_fix}, a share that fits, or start Ray where the GPUs are)")
    if cfg.run.baseline != "none" or cfg.rounds.num_rounds == 0:
        return None  # no rounds: the main run is all there is
    beside = f"the main run holds {cfg.main.num_workers * p.main_gpus:g} of them while a round runs" \
        if p.main_gpus else "the main run holds none"
    one_gpu = "on one GPU e.g. placement.main_gpus: 0.5 with 0.5 for each round role (docs/gpu.md)"
    roles = [("adapter_gpus", "adapters.num_workers", cfg.adapters.num_workers or 1, "an adapter worker"),
             ("trial_gpus", None, 1, "a search trial"),
             ("confirm_gpus", None, 1 if cfg.decision.rule == "safe" and cfg.decision.confirm else 0,
              "the confirmation task")]
    for field, count_field, n, what in roles:
        share = getattr(p, field)
        # a round's parts run one after another: each needs only what the main run leaves
        if _place([list(g) for g in gpus], share, n):
            continue
        if count_field and n > 1 and _place([list(g) for g in gpus], share, 1):
            return (f"config error at {count_field}: {n} adapter workers x {_gpus(share)}, but {has} and "
                    f"{beside} (fix: fewer workers, or null to use the GPUs free)")
        return (f"config error at placement.{field}: {what} asks for {_gpus(share)}, but {has} and {beside}, "
                f"so the round would wait forever (fix: {cpu_fix}, or shares that fit together: {one_gpu})")
    return None
