"""What a round boundary reports and what a round records, as types.

BoundaryInfo travels main run -> MixtureController -> driver (and is saved in each round's
train_state.json, so a resumed run reports the same one). RoundRecord is one entry of
history.json's "rounds"; the controller adds "round" and "mixture_version" when it is pushed.
Mixtures stay Mixture objects until a record is written (`as_dict`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from opmix_ray.mixture import Mixture


@dataclass
class BoundaryInfo:
    step: int
    tokens: int
    path: str  # the boundary's checkpoint dir
    val_loss: dict[str, float]
    drawn: dict[str, float]  # the segment's drawn fractions
    mixture: dict[str, float]  # the mixture the main run trained on
    n_params: int
    flops: float  # main-run FLOPs so far
    train_loss: float | None = None
    epochs: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    # absent in checkpoints written before the caps and lr_schedule existed
    lr: float | None = None
    drawn_tokens: dict[str, int] | None = None
    total_steps: int | None = None
    tokens_per_step: int | None = None
    stall_s: dict = field(default_factory=dict)
    applied_step: dict = field(default_factory=dict)
    train_s: float = 0.0  # seconds inside training steps (batch draw + forward/backward/step): tokens/s, MFU

    @classmethod
    def from_dict(cls, d: dict) -> BoundaryInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def has_caps_state(self) -> bool:
        """Whether the repetition caps can be applied from this report (drawn tokens and budget)."""
        return None not in (self.drawn_tokens, self.total_steps, self.tokens_per_step)


@dataclass
class RoundRecord:
    step: int
    tokens: int
    weights: Mixture  # what the round pushed (the current mixture when it stayed)
    base_val_loss: dict[str, float]
    drawn_before: dict[str, float]
    mixture_before: dict[str, float]
    flops: dict[str, float]  # main_so_far, adapters, search
    wall_s: dict[str, float]
    searcher: str
    adapter_weights: dict[str, float] = field(default_factory=dict)
    objective: float | None = None
    merged_val_loss: dict[str, float] = field(default_factory=dict)
    n_trials: int = 0
    n_failed: int = 0
    decision: dict | None = None  # Decision.as_dict(): stay, leader, standard error, reason
    delta_scale: float | None = None
    search_space: str | None = None
    cap_shares: dict[str, float] | None = None
    domain_changes: list[str] | None = None
    budget: dict | None = None  # search.budget_fraction: the adapter steps and candidates the round was sized to

    @classmethod
    def reuse(cls, info: BoundaryInfo, current: Mixture) -> RoundRecord:
        """A round with nothing to search (only removals): the renormalised mixture is reused."""
        return cls(step=info.step, tokens=info.tokens, weights=current, base_val_loss=info.val_loss,
                   drawn_before=info.drawn, mixture_before=info.mixture,
                   flops={"main_so_far": info.flops, "adapters": 0.0, "search": 0.0},
                   wall_s={"adapters": 0.0, "search": 0.0}, searcher="reuse")

    def as_dict(self) -> dict:
        """The history.json entry; optional fields a round did not have are left out."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["weights"] = self.weights.as_dict()
        optional = ("decision", "delta_scale", "search_space", "cap_shares", "domain_changes", "budget")
        return {k: v for k, v in out.items() if not (k in optional and v is None)}
