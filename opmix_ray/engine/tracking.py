"""The main run's live metrics for TensorBoard (tracking.tensorboard): rank 0 writes its loss, the
mixture it draws from and the val loss at each boundary, step by step, and each push it applies.

    tensorboard --logdir opmix_runs/NAME      # main run under tracking/main, trials under search_round_*

Search trials log through Tune's own TBX logger callback (engine/trials.py).
"""
from __future__ import annotations

import os

from opmix_ray import rundir


class MainRunLog:
    """No-op unless enabled; every call is cheap next to a training step."""

    def __init__(self, enabled: bool, run_dir: str):
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, rundir.TRACKING_MAIN), flush_secs=10)

    def step(self, step: int, loss: float, weights: dict[str, float], tokens: int) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("main/train_loss", loss, step)
        self.writer.add_scalar("main/tokens", tokens, step)
        for d, w in weights.items():
            self.writer.add_scalar(f"mixture/{d}", w, step)

    def boundary(self, step: int, val_loss: dict[str, float]) -> None:
        if self.writer is None:
            return
        for d, v in val_loss.items():
            self.writer.add_scalar(f"val_loss/{d}", v, step)
        self.writer.flush()

    def push(self, step: int, round_idx: int, weights: dict[str, float]) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("main/push_round", round_idx, step)
        self.writer.add_text("pushes", f"round {round_idx}: " + ", ".join(f"{d}={w:.3f}" for d, w in weights.items()),
                             step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
