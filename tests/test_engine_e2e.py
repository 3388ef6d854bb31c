"""End to end: 2 OP-Mix rounds of the tiny config through real Ray Train + Tune + Optuna + PEFT.

The main run must really train on each pushed mixture: that is checked from the sampler's own
draw counts (reported by the worker at the next boundary and at the end), not from what the
controller was asked to do.
"""
import json
import os

import numpy as np
import pytest
import ray

from opmix_ray.config import load_config
from opmix_ray.engine.driver import run
from opmix_ray.engine.main_run import steps_and_boundaries

# Deficit sampling keeps |drawn_d - w_d * T| within 2 windows (tests/test_sampler.py); a segment of
# the tiny run has >= 24 steps x 16 windows, so shares are within 2/384 of the weights.
DRAW_TOL = 0.01


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    # warm_start off, the random searcher and the argmin rule: the pushed mixtures are then surely not uniform,
    # so "the run trained on the pushed mixture" cannot pass by accident. Two candidates per trial and the
    # scorer pool: a whole run on both (the scores they give are tests/test_trial_batch.py's).
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "opmix_ray", "configs", "tiny.yaml"),
                      {"run": {"storage_path": str(storage)},
                       "search": {"warm_start": False, "searcher": "random", "candidates_per_trial": 2,
                                  "scorer_pool": True},
                       "decision": {"rule": "argmin"}})
    summary = run(cfg)
    yield cfg, summary
    ray.shutdown()


def _history(summary):
    with open(os.path.join(summary["run_dir"], "history.json")) as f:
        return json.load(f)


def test_history_is_complete(tiny_run):
    cfg, summary = tiny_run
    h = _history(summary)
    total, boundaries = steps_and_boundaries(cfg)
    assert h["meta"]["boundaries"] == boundaries and len(h["rounds"]) == cfg.rounds.num_rounds == 2
    for k, r in enumerate(h["rounds"]):
        assert r["round"] == k and r["step"] == boundaries[k]
        assert abs(sum(r["weights"].values()) - 1) < 1e-9
        assert np.isfinite(r["objective"]) and r["n_trials"] == cfg.search.num_samples
        assert set(r["merged_val_loss"]) == set(h["meta"]["domains"])
        assert r["flops"]["adapters"] > 0 and r["flops"]["search"] > 0 and r["tokens"] > 0
    assert h["final"]["step"] == total and set(h["final"]["val_loss"]) == set(h["meta"]["domains"])
    # step timing for tokens/s and MFU: inside the run's wall time, every trained token counted
    assert 0 < summary["main_train_s"] < summary["wall_s"] and summary["main_tokens"] == h["final"]["tokens"]
    assert summary["main_tokens_per_s"] == pytest.approx(summary["main_tokens"] / summary["main_train_s"])
    assert summary["candidates_per_s"] == pytest.approx([r["n_trials"] / r["wall_s"]["search"] for r in h["rounds"]])
    run_dir = summary["run_dir"]
    for name in ("history.parquet", "summary.json", "config.yaml", "data_manifest.json",
                 "rounds/round_0_trials.parquet", "main/round_0/model.safetensors",
                 "main/round_final/model.safetensors"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    import pyarrow.parquet as pq
    t = pq.read_table(os.path.join(run_dir, "history.parquet"))
    assert t.num_rows == 3 and "weights.python" in t.column_names and "objective" in t.column_names


def test_the_run_starts_its_scorers_once_and_its_first_trial_finds_them_ready(tiny_run):
    from opmix_ray.engine.trial_batch import POOL
    cfg, _ = tiny_run
    t = ray.get(ray.get_actor(POOL).timeline.remote())
    # one scorer per trial slot for the whole run: round 1 started none
    assert len(t["ready_at"]) == cfg.search.max_concurrent and None not in t["ready_at"]
    # 2 rounds x 3 trials of 2 candidates leased one each
    assert len(t["leased_at"]) == cfg.rounds.num_rounds * cfg.search.num_samples // 2
    # started with the main run, they were ready before round 0's first trial asked for one
    assert max(t["ready_at"]) < min(t["leased_at"])


def test_main_run_trained_on_pushed_mixture(tiny_run):
    _, summary = tiny_run
    h = _history(summary)
    pushed = [r["weights"] for r in h["rounds"]]
    # what the sampler really drew in the segment after each push
    drawn_after = [h["rounds"][1]["drawn_before"], h["final"]["drawn"]]
    uniform = 1 / len(h["meta"]["domains"])
    for w, drawn in zip(pushed, drawn_after):
        assert max(abs(w[d] - uniform) for d in w) > 5 * DRAW_TOL, "pushed mixture too close to uniform to tell"
        for d in w:
            assert abs(drawn[d] - w[d]) <= DRAW_TOL, (d, drawn[d], w[d])
    # and during the uniform prefix it drew uniform
    assert all(abs(x - uniform) <= DRAW_TOL for x in h["rounds"][0]["drawn_before"].values())


def test_adapters_are_peft_with_hashes(tiny_run):
    _, summary = tiny_run
    h = _history(summary)
    root = os.path.join(summary["run_dir"], "adapters_round_1", "adapters")
    names = sorted(os.listdir(root))
    assert names == sorted(["old", "old#2"] + h["meta"]["domains"])  # old#2: the adapter-noise replicate
    for n in names:
        meta = json.load(open(os.path.join(root, n, "opmix_meta.json")))
        assert meta["data_hash"] == h["meta"]["data_hash"] and meta["tokenizer_hash"] == h["meta"]["tokenizer_hash"]
        assert os.path.isfile(os.path.join(root, n, "adapter_model.safetensors"))
        assert meta["final_loss"] < meta["first_loss"] + 0.5


def test_every_round_leaves_a_manifest_that_check_verifies(tiny_run, tmp_path):
    """A flipped byte in a checkpoint is found by `opmix-ray check` (the sha256 manifest each round
    writes last); the untouched run passes."""
    import shutil

    from opmix_ray.cli.check import check_run_dir
    _, summary = tiny_run
    run_dir = tmp_path / "copy"
    shutil.copytree(summary["run_dir"], run_dir)
    for k in (0, 1, "final"):
        listed = json.loads((run_dir / "rounds" / f"round_{k}_manifest.json").read_text())
        assert f"main/round_{k}/model.safetensors" in listed
    assert check_run_dir(run_dir) == []
    weights = run_dir / "main" / "round_0" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # inside the last tensor: the file still parses
    weights.write_bytes(bytes(data))
    assert check_run_dir(run_dir) == ["main/round_0/model.safetensors: changed since it was written (sha256 "
                                      "differs from rounds/round_0_manifest.json)"]
    (run_dir / "main" / "round_1" / "train_state.json").unlink()
    assert any(p.startswith("main/round_1/train_state.json: missing (listed in rounds/round_1_manifest.json)")
               for p in check_run_dir(run_dir))


def test_tunes_own_readers_and_the_cli_read_the_run_back(tiny_run, capsys):
    """ExperimentAnalysis on a round's search dir returns its Tune trials (result.json per trial), and
    `opmix-ray results RUN --json` is one JSON document with the history and the summary."""
    from ray.tune import ExperimentAnalysis

    from opmix_ray.cli.main import main
    cfg, summary = tiny_run
    h = _history(summary)
    for r in h["rounds"]:
        df = ExperimentAnalysis(os.path.join(summary["run_dir"], f"search_round_{r['round']}")).dataframe()
        # one Tune trial per batch of candidates_per_trial, reporting its best candidate at the top
        assert len(df) * cfg.search.candidates_per_trial == r["n_trials"] == cfg.search.num_samples
        assert df["objective"].min() == pytest.approx(r["objective"])
    assert main(["results", summary["run_dir"], "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["history"] == h and doc["summary"]["final_val_ppl_mean"] == summary["final_val_ppl_mean"]
