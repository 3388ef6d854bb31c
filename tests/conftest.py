"""Fixtures shared by several test modules."""
import os

import pytest

from opmix_ray.data.read import build_shards
from opmix_ray.experiments.experiment_config import load_experiment_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "opmix_ray", "configs")


@pytest.fixture(scope="module")
def tiny():
    """The tiny benchmark config (bench_tiny.yaml) and its token shards."""
    cfg = load_experiment_config(os.path.join(CONFIGS, "bench_tiny.yaml"))
    return cfg, build_shards(cfg)
