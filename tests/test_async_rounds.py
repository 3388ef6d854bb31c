"""Asynchronous rounds: the main run never waits for a round (slow: two real tiny runs, ~3 min).

    pytest -m slow tests/test_async_rounds.py
"""
import json
import os

import pytest
import ray

from opmix_ray.config import load_config
from opmix_ray.engine.driver import run

TINY = os.path.join(os.path.dirname(__file__), "..", "opmix_ray", "configs", "tiny.yaml")


@pytest.mark.slow
def test_async_main_run_does_not_stall_and_sync_does(tmp_path):
    out = {}
    for mode in ("sync", "async"):
        # 1200 steps: long enough that an async round lands inside the run on 2 cores
        cfg = load_config(TINY, {"run": {"storage_path": str(tmp_path), "name": f"t-{mode}"},
                                 "rounds": {"mode": mode}, "main": {"total_tokens": 1228800},
                                 "search": {"searcher": "random", "warm_start": False},
                                 "decision": {"rule": "argmin"}})
        out[mode] = run(cfg)
        ray.shutdown()
    assert out["sync"]["main_stall_s"] > 5.0
    assert out["async"]["main_stall_s"] == 0.0
    hist = json.loads(open(os.path.join(out["async"]["run_dir"], "history.json")).read())
    applied = hist["final"]["applied_step"]
    assert applied, "no async push landed inside the run"
    for k, step in applied.items():
        rec = next(r for r in hist["rounds"] if r["round"] == int(k))
        assert step > rec["step"]  # the winner applies after the snapshot it was searched on
