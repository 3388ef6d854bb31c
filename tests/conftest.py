"""Fixtures shared by several test modules."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from opmix_ray.data.read import build_shards
from opmix_ray.data.shards import BUNDLED_DIR
from opmix_ray.experiments.experiment_config import load_experiment_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "opmix_ray", "configs")


@pytest.fixture(scope="module")
def tiny():
    """The tiny benchmark config (bench_tiny.yaml) and its token shards."""
    cfg = load_experiment_config(os.path.join(CONFIGS, "bench_tiny.yaml"))
    return cfg, build_shards(cfg)


@pytest.fixture
def experiment_results(tmp_path):
    """Runs `opmix-ray COMMAND CONFIGS/CONFIG --out TMP/out ARGS...` as a user would; its results.json."""
    def run(command: str, config: str, *args: str, timeout: int = 1800) -> dict:
        out = tmp_path / "out"
        p = subprocess.run([sys.executable, "-m", "opmix_ray.cli", command, os.path.join(CONFIGS, config),
                            "--out", str(out), *args], capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads((out / "results.json").read_text())
    return run


@pytest.fixture(scope="module")
def good_data(tmp_path_factory) -> Path:
    """Two small real-text domains (a slice of the bundled corpus): enough for the base config."""
    d = tmp_path_factory.mktemp("data")
    for name in ("python", "bible"):
        rows = pq.read_table(BUNDLED_DIR / f"{name}.parquet", columns=["text"]).slice(0, 60)
        pq.write_table(rows, d / f"{name}.parquet")
    return d
