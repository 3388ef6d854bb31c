"""Where a run's metrics go while it trains (the `tracking:` section): TensorBoard, MLflow, W&B.

    tensorboard --logdir opmix_runs/NAME                                   # tracking.tensorboard
    mlflow ui --backend-store-uri sqlite:///opmix_runs/NAME/tracking/mlflow.db   # tracking.mlflow
    wandb sync opmix_runs/NAME/tracking/wandb/offline-run-*                # tracking.wandb (offline)

The main run's rank 0 writes its loss, the mixture it draws from and tokens per step, the val loss
at each boundary and each push it applies (MainRunLog). Search trials go through Tune's own logger
callbacks (trial_callbacks), one trial = one TensorBoard dir / MLflow run / W&B run. Every backend
gets the same metric names: main/train_loss, main/tokens, mixture/<domain>, val_loss/<domain>,
main/push_round.
"""
from __future__ import annotations

import os
import time

from opmix_ray import rundir

# MLflow writes per step would be one SQLite transaction each: buffer and flush at boundaries.
_MLFLOW_FLUSH_EVERY = 200


def mlflow_uri(tracking, run_dir: str) -> str:
    return tracking.mlflow_tracking_uri or "sqlite:///" + os.path.abspath(os.path.join(run_dir, rundir.MLFLOW_DB))


def wandb_dir(run_dir: str) -> str:
    """wandb.init(dir=...) writes its runs under <this>/wandb."""
    return os.path.abspath(os.path.join(run_dir, rundir.TRACKING))


def _wandb_env(tracking) -> None:
    # Tune's W&B callback asks for an API key in the driver unless WANDB_MODE says offline
    if tracking.wandb_mode == "offline":
        os.environ.setdefault("WANDB_MODE", "offline")


def trial_callbacks(cfg, run_dir: str, round_idx: int) -> list:
    """Tune logger callbacks for one round's search trials, one per enabled backend."""
    t, out = cfg.tracking, []
    if t.tensorboard:
        from ray.tune.logger import TBXLoggerCallback
        out.append(TBXLoggerCallback())
    if t.mlflow:
        from ray.air.integrations.mlflow import MLflowLoggerCallback
        out.append(MLflowLoggerCallback(tracking_uri=mlflow_uri(t, run_dir), experiment_name=cfg.run.name,
                                        tags={"opmix.role": "trial", "opmix.round": str(round_idx)}))
    if t.wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback
        _wandb_env(t)
        out.append(WandbLoggerCallback(project=t.wandb_project, group=f"{cfg.run.name}/{rundir.search_job(round_idx)}",
                                       mode=t.wandb_mode, dir=wandb_dir(run_dir), job_type="trial",
                                       settings=_wandb_settings()))
    return out


def _wandb_settings():
    import wandb
    # console="off": W&B does not wrap the process's stdout/stderr; silent: no banner in the user's output
    return wandb.Settings(silent=True, console="off", disable_git=True)


class MainRunLog:
    """The main run's metrics into every enabled backend; a no-op when none is (or on rank > 0).
    Each call is cheap next to a training step."""

    def __init__(self, cfg, run_dir: str, enabled: bool = True):
        self.tb = self.ml = self.wb = None
        self._ml_buf: list = []
        t = cfg.tracking if enabled else None
        if t is not None and t.tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, rundir.TRACKING_MAIN), flush_secs=10)
        if t is not None and t.mlflow:
            from mlflow.tracking import MlflowClient
            self.ml = MlflowClient(mlflow_uri(t, run_dir))
            exp = self.ml.get_experiment_by_name(cfg.run.name)
            exp_id = exp.experiment_id if exp else self.ml.create_experiment(cfg.run.name)
            self._ml_run = self.ml.create_run(exp_id, run_name="main", tags={"opmix.role": "main"}).info.run_id
        if t is not None and t.wandb:
            import wandb
            self.wb = wandb.init(project=t.wandb_project, group=cfg.run.name, name=f"{cfg.run.name}/main",
                                 job_type="main", mode=t.wandb_mode, dir=wandb_dir(run_dir), reinit="create_new",
                                 settings=_wandb_settings())

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.ml is not None:
            from mlflow.entities import Metric
            ms = int(time.time() * 1000)
            self._ml_buf += [Metric(k, float(v), ms, step) for k, v in values.items()]
            if len(self._ml_buf) >= _MLFLOW_FLUSH_EVERY:
                self._flush_mlflow()
        if self.wb is not None:
            self.wb.log(values, step=step)

    def _flush_mlflow(self) -> None:
        for i in range(0, len(self._ml_buf), 1000):  # MLflow's log_batch takes at most 1000 metrics
            self.ml.log_batch(self._ml_run, metrics=self._ml_buf[i:i + 1000])
        self._ml_buf = []

    def step(self, step: int, loss: float, weights: dict[str, float], tokens: int) -> None:
        self._scalars({"main/train_loss": loss, "main/tokens": tokens, **{f"mixture/{d}": w for d, w in weights.items()}},
                      step)

    def boundary(self, step: int, val_loss: dict[str, float]) -> None:
        self._scalars({f"val_loss/{d}": v for d, v in val_loss.items()}, step)
        if self.tb is not None:
            self.tb.flush()
        if self.ml is not None:
            self._flush_mlflow()

    def push(self, step: int, round_idx: int, weights: dict[str, float]) -> None:
        self._scalars({"main/push_round": round_idx}, step)
        text = f"round {round_idx}: " + ", ".join(f"{d}={w:.3f}" for d, w in weights.items())
        if self.tb is not None:
            self.tb.add_text("pushes", text, step)
        if self.ml is not None:
            self.ml.set_tag(self._ml_run, f"opmix.push_round_{round_idx}", text)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.ml is not None:
            self._flush_mlflow()
            self.ml.set_terminated(self._ml_run)
        if self.wb is not None:
            self.wb.finish()
