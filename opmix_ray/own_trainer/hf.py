"""OpMixCallback: OP-Mix for a Hugging Face `Trainer`. Add the callback, train on the sampler.

    opmix = OpMix("mine.yaml", total_steps=400, batch_size=16)
    sampler = opmix.sampler()
    trainer = Trainer(model=model, args=TrainingArguments(..., max_steps=400, per_device_train_batch_size=16),
                      train_dataset=sampler, callbacks=[OpMixCallback(opmix, sampler)])
    trainer.train()                                  # or trainer.train(resume_from_checkpoint=True)

The sampler is a torch IterableDataset (one {"input_ids", "labels"} row per item), so the Trainer
builds no sampler of its own. After each optimizer step the callback runs OpMixLoop.before_step:
at a boundary a round runs on Ray on the model as it is then, and its decision is pushed into the
sampler. The Trainer's loader (accelerate) has drawn the next batch already, so a push lands one
step after the boundary: batches drawn are never redrawn. At each save the callback writes the
loop's state into the Trainer's checkpoint dir, and a Trainer resumed from that checkpoint draws
the very rows it would have drawn; the Trainer's own fast-forward over the data is turned off
(ignore_data_skip), since the sampler resumes from its state instead.
"""
from __future__ import annotations

import json
import os

from transformers import TrainerCallback

from opmix_ray.errors import TrainerSetupError
from opmix_ray.own_trainer.loop import OpMixLoop
from opmix_ray.storage import atomic_write_bytes

STATE_FILE = "opmix_state.json"  # in each of the Trainer's checkpoint dirs
WHO = "OpMixCallback"


def _lr(lr_scheduler, optimizer) -> float | None:
    if lr_scheduler is not None and hasattr(lr_scheduler, "get_last_lr"):
        return float(lr_scheduler.get_last_lr()[0])
    if optimizer is not None and optimizer.param_groups:
        return float(optimizer.param_groups[0]["lr"])
    return None


def checkpoint_dir(args, step: int) -> str:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


class OpMixCallback(TrainerCallback):
    """background: rounds run while the Trainer trains on (default: rounds.mode async)."""

    def __init__(self, opmix, sampler, background: bool | None = None, say=print):
        self.opmix, self.sampler = opmix, sampler
        self.loop = OpMixLoop(opmix, sampler, background=background, rank=0, world=1, say=say)
        self._resume_dir: str | None = None

    def resume_from(self, checkpoint: str) -> None:
        """Take the state from `checkpoint` (a Trainer checkpoint dir) when the Trainer resumes from
        one outside its output_dir; by default it is <output_dir>/checkpoint-<step>."""
        self._resume_dir = str(checkpoint)

    def on_init_end(self, args, state, control, **kwargs):
        self._check_args(args)
        args.ignore_data_skip = True  # the sampler resumes from its own state (see the module doc)

    def _check_args(self, args) -> None:
        if args.dataloader_num_workers:
            raise TrainerSetupError(f"{WHO}: dataloader_num_workers={args.dataloader_num_workers}; pushes must reach the "
                                    "sampler in the Trainer's own process (fix: dataloader_num_workers=0; drawing a row "
                                    "costs microseconds)")
        if args.world_size > 1:
            raise TrainerSetupError(f"{WHO}: the Trainer runs on {args.world_size} processes; the callback follows one "
                                    "(fix: one process, or a Ray Train loop with OpMixLoop, which splits the draws over "
                                    "ranks)")

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, optimizer=None,
                       lr_scheduler=None, **kwargs):
        self._check_args(args)
        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is not self.sampler:
            raise TrainerSetupError(f"{WHO}: the Trainer trains on a {type(dataset).__name__}, not the callback's "
                                    "sampler (fix: Trainer(train_dataset=sampler, callbacks=[OpMixCallback(opmix, "
                                    "sampler)]) with sampler = opmix.sampler())")
        rows = args.per_device_train_batch_size * args.gradient_accumulation_steps
        if rows != self.opmix.batch_size:
            raise TrainerSetupError(f"{WHO}: the Trainer takes {rows} rows per optimizer step (per_device_train_batch_size "
                                    f"x gradient_accumulation_steps), OpMix was told batch_size={self.opmix.batch_size} "
                                    f"(fix: OpMix(..., batch_size={rows}))")
        if state.max_steps != self.opmix.total_steps:
            raise TrainerSetupError(f"{WHO}: the Trainer runs {state.max_steps} steps, OpMix was told total_steps="
                                    f"{self.opmix.total_steps} (fix: max_steps={self.opmix.total_steps} in "
                                    "TrainingArguments, or OpMix(..., total_steps=max_steps))")
        self.opmix.check_model(model)
        self.sampler.rows_per_step = rows
        if state.global_step > 0:
            self._load(args, state.global_step)
        self.loop.before_step(state.global_step, model, _lr(lr_scheduler, optimizer))

    def _load(self, args, step: int) -> None:
        if not args.ignore_data_skip:
            raise TrainerSetupError(f"{WHO}: resuming with ignore_data_skip=False would skip {step} batches the sampler "
                                    "already restores (fix: pass the callback to Trainer(callbacks=...), which sets it, "
                                    "or set ignore_data_skip=True)")
        where = self._resume_dir or checkpoint_dir(args, step)
        path = os.path.join(where, STATE_FILE)
        if not os.path.isfile(path):
            raise TrainerSetupError(f"{WHO}: the Trainer resumes at step {step} but {path} does not exist (fix: resume "
                                    "from a checkpoint saved with this callback; callback.resume_from(dir) names one "
                                    "outside output_dir)")
        with open(path) as f:
            self.loop.load_state_dict(json.load(f))

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self.loop.before_step(state.global_step, model, _lr(lr_scheduler, optimizer))

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            state_json = json.dumps(self.loop.state_dict(step=state.global_step)).encode()
            atomic_write_bytes(os.path.join(checkpoint_dir(args, state.global_step), STATE_FILE), state_json)

    def on_train_end(self, args, state, control, **kwargs):
        self.loop.finish()
