"""Ray started (or joined) the way every opmix-ray entry point needs it, whichever starts it first.

    from opmix_ray.config import load_config
    from opmix_ray.ray_init import init_ray
    init_ray(load_config("opmix_ray/configs/tiny.yaml"))  # local Ray, or ray.address / RAY_ADDRESS

It sits below data/ and engine/ so that a reader that needs Ray (data.reader: ray_data) and the
run's driver start it with the same settings.
"""
from __future__ import annotations

import math
import os
import signal
import threading

import ray

from opmix_ray.config import Config
from opmix_ray.console import colour, hide_ray_noise, verbosity


def init_ray(cfg: Config) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no tensorboard/csv per trial
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C stops the run (cli/main.py), not a round
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0, Tune prints nothing per round
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if verbosity() != "verbose":
        # Ray Data prints three INFO lines per dataset (start, plan, finished) to the console; it
        # reads this variable each time it sets up a dataset's logging (data.reader: ray_data)
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    if not colour():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's "(raylet)" prefixes without ANSI codes
    if verbosity() != "verbose":
        # this process imported transformers before the variables above were set (preflight loads models)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    # Inside a Ray job (opmix-ray submit) the job supervisor sets RAY_ADDRESS: join that cluster.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # ray.init installs a C++ failure-signal handler that also takes SIGTERM and aborts (SIGABRT, a
    # stack dump); whoever set a Python SIGTERM handler (the CLI's stop) gets it back afterwards.
    term = signal.getsignal(signal.SIGTERM)
    hide_ray_noise()
    try:
        if address:
            ray.init(address=address, log_to_driver=verbosity() == "verbose")
            return
        _init_local(cfg)
    finally:
        if callable(term) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, term)


def joins_cluster(cfg: Config) -> bool:
    """Whether init_ray joins a running cluster (ray.address, or RAY_ADDRESS inside a Ray job)
    rather than starting Ray on this machine."""
    return bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def local_cpus(cfg: Config) -> int:
    """The logical CPUs a local Ray is started with: ray.num_cpus, or the cores plus the main run's.
    The main run's workers idle while a synchronous round runs, so their CPUs are counted on top of
    the cores: otherwise the round's adapter workers and trials would wait for sleeping workers."""
    return cfg.ray.num_cpus or (os.cpu_count() or 1) + int(math.ceil(cfg.main.num_workers * cfg.main.cpus_per_worker))


def _init_local(cfg: Config) -> None:
    cpus = local_cpus(cfg)
    # No dashboard. Ray cannot be kept on loopback: ray.init turns 127.0.0.1 into the machine's
    # routable address and its servers bind every interface (cluster/README.md, tests/test_security.py).
    ray.init(num_cpus=cpus, num_gpus=cfg.ray.num_gpus, include_dashboard=False,
             log_to_driver=verbosity() == "verbose", logging_level="INFO" if verbosity() == "verbose" else "ERROR")
