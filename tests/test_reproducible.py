"""Same config + seed + one trial in flight -> the same pushed mixtures and final losses.

With more than one trial in flight, completion order steers the searcher, so only
max_concurrent=1 promises repeatability (README). Two tiny runs: ~2.5 min, hence slow.
"""
import json

import pytest
import ray

from opmix_ray.config import load_config
from opmix_ray.engine.driver import run


@pytest.mark.slow
def test_two_runs_push_the_same_mixtures(tmp_path):
    results = []
    for i in range(2):
        cfg = load_config("opmix_ray/configs/tiny.yaml", {"run": {"storage_path": str(tmp_path), "name": f"r{i}"},
                                                          "search": {"max_concurrent": 1}})
        summary = run(cfg)
        with open(f"{summary['run_dir']}/history.json") as f:
            results.append(([r["weights"] for r in json.load(f)["rounds"]], summary["final_val_loss"]))
    ray.shutdown()
    assert results[0] == results[1]
