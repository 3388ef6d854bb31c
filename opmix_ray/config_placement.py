"""The placement: config section (what each part of a run asks Ray for) and its checks against the
rest of the config. The request comes from here and only here, never from the hardware of the
machine the run is started on: a driver on a CPU-only head node places workers on GPU nodes, and on
a one-GPU machine the shares below decide who holds what. docs/gpu.md sizes them."""
from __future__ import annotations

from pydantic import Field, field_validator

from opmix_ray.config_base import Section

GPU_FIELDS = ("main_gpus", "adapter_gpus", "trial_gpus", "confirm_gpus")


class PlacementSection(Section):
    """GPUs per process of each role, and the CPUs that no older field gives (main.cpus_per_worker and
    search.cpus_per_trial stay the CPUs of the main run's workers and of a search trial)."""
    main_gpus: float = Field(0.0, ge=0, description="GPUs each main-run worker holds (Ray num_gpus); fractions "
                             "share a GPU (0.5: two processes on one). The main run holds them for the whole run, "
                             "rounds included. 0 = the main run trains on CPUs (its CPUs: main.cpus_per_worker).")
    adapter_gpus: float = Field(0.0, ge=0, description="GPUs each adapter worker holds while a round trains its "
                                "adapters; 0 = CPUs only.")
    adapter_cpus: float = Field(1.0, gt=0, description="Ray CPUs each adapter worker holds (and its torch threads).")
    trial_gpus: float = Field(0.0, ge=0, description="GPUs each search trial holds; its merged candidates are "
                              "built and scored on that GPU (CPUs: search.cpus_per_trial). 0 = CPUs only.")
    confirm_gpus: float = Field(0.0, ge=0, description="GPUs the confirmation adapter's task holds "
                                "(decision.confirm); 0 = CPUs only.")
    confirm_cpus: int | None = Field(None, gt=0, description="Ray CPUs of the confirmation task; null = the CPUs "
                                     "free when it starts, at most 8.")

    @field_validator(*GPU_FIELDS)
    @classmethod
    def _ray_gpu_share(cls, v):
        # Ray takes a fraction of one GPU or whole GPUs, to 4 decimals; anything else it refuses at
        # the first request of the role, minutes into the run
        if v > 1 and v != int(v):
            raise ValueError(f"{v:g} GPUs: more than one GPU must be a whole number (fix: a fraction such as 0.5, "
                             "or 1, 2, ...)")
        if v != round(v, 4):
            raise ValueError(f"{v!r} GPUs: Ray counts GPU shares to 4 decimals (fix: e.g. {round(v, 4):g})")
        return v

    def any_gpus(self) -> bool:
        return any(getattr(self, f) > 0 for f in GPU_FIELDS)


def placement_problem(cfg) -> str | None:
    """What in the rest of a Config `cfg` contradicts the placement (one line naming the field, with
    the fix), or None. Config's own validator raises it (this module sits below config.py)."""
    p, device = cfg.placement, cfg.model.device
    if device == "cpu" and p.any_gpus():
        field = next(f for f in GPU_FIELDS if getattr(p, f) > 0)
        return (f"placement.{field}={getattr(p, field):g} asks Ray for a GPU that model.device: cpu never uses "
                f"(fix: model.device: auto, or placement.{field}: 0)")
    if device == "cuda":
        idle = [f for f in GPU_FIELDS if getattr(p, f) == 0]
        if idle:
            return (f"model.device: cuda runs every part of a run on a GPU, but placement.{idle[0]} is 0 "
                    f"(fix: give {', '.join('placement.' + f for f in idle)} a GPU share such as 0.25, "
                    "or model.device: auto to run those parts on CPUs)")
    if cfg.main.num_workers > 1 and 0 < p.main_gpus < 1:
        # Ray packs fractions onto one GPU, and DDP's nccl refuses two ranks on one GPU
        return (f"placement.main_gpus={p.main_gpus:g} with main.num_workers: {cfg.main.num_workers} would put several "
                "DDP workers on one GPU, which nccl refuses (fix: placement.main_gpus: 1, or main.num_workers: 1)")
    if cfg.search.scorer_pool and p.trial_gpus > 0:
        # a pooled scorer is a separate process holding no Ray resources: it cannot use the trial's GPU
        return (f"search.scorer_pool: true scores in processes that hold no GPU, but placement.trial_gpus="
                f"{p.trial_gpus:g} (fix: search.scorer_pool: false to score on the trial's GPU, or "
                "placement.trial_gpus: 0)")
    return None
