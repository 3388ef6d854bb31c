"""Aioli: the LearnParams solve, the exponentiated update and one real online run (bench_tiny)."""
import os

import numpy as np
import pytest

from opmix_ray.data.read import build_shards
from opmix_ray.experiments.baselines._aioli import (
    aioli_update,
    interaction_matrix,
    normalise_matrix,
    probe_mixtures,
    run_aioli,
)
from opmix_ray.experiments.experiment_config import load_experiment_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "opmix_ray", "configs")


def test_probe_mixtures_are_smoothed_one_hots():
    W = probe_mixtures(4, 0.625)
    np.testing.assert_allclose(W.sum(axis=1), 1.0)
    assert np.allclose(np.diag(W), 0.625) and np.allclose(W[0, 1:], 0.375 / 3)
    assert np.array_equal(probe_mixtures(3, 1.0), np.eye(3))


def test_the_linear_law_is_recovered_from_the_probe_loss_decreases():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(5, 5))
    W = probe_mixtures(5, 0.625)
    G = np.stack([A @ W[j] for j in range(5)], axis=1)  # column j: every domain's decrease after probe j
    np.testing.assert_allclose(interaction_matrix(G, W), A, atol=1e-12)


def test_the_update_is_the_exponentiated_step_on_the_column_sums():
    p = np.array([0.5, 0.3, 0.2])
    A = np.array([[0.2, 0.0, 0.1], [0.1, 0.3, 0.0], [0.0, 0.0, 0.1]])
    want = p * np.exp(0.2 * np.array([0.3, 0.3, 0.2]))
    np.testing.assert_allclose(aioli_update(p, A, 0.2), want / want.sum(), atol=1e-15)
    N = normalise_matrix(np.array([[-1.0, 1.0], [0.0, 2.0]]))
    np.testing.assert_allclose(N, np.array([[0.0, 2.0], [1.0, 3.0]]) / 6.0)
    # the domain whose weight lowers the losses most gains
    assert np.argmax(aioli_update(np.full(3, 1 / 3), A, 1.0)) in (0, 1)


@pytest.fixture(scope="module")
def aioli_run():
    cfg = load_experiment_config(os.path.join(CONFIGS, "bench_tiny.yaml"),
                                 {"bench": {"aioli_update_steps": 20, "aioli_lp_rounds": 1, "aioli_lp_steps": 1}})
    shards = build_shards(cfg)
    return cfg, shards, run_aioli(cfg, shards)


def test_one_aioli_run_probes_updates_and_trains_the_whole_budget(aioli_run):
    cfg, sh, out = aioli_run
    k = len(sh.domains)
    total = cfg.main.total_tokens // (cfg.main.batch_size * sh.seq_len)
    # 60 steps in rounds of 20, each with k probe steps; the last round has no learning part left after probing
    assert len(out["path"]) == 3 and out["probe_steps"] == 3 * k
    drawn = sum(out["drawn"].values()) // sh.seq_len
    assert drawn == total * cfg.main.batch_size  # every step of the budget trained, probes included
    for r in out["path"]:
        w, A = np.array(r["weights"]), np.array(r["A"])
        assert A.shape == (k, k) and np.isclose(w.sum(), 1) and np.all(w > 0)
        assert np.isclose(A.sum(), 1) and A.min() >= 0  # aioli_normalize
    assert not np.allclose(out["path"][0]["weights"], 1 / k)  # the probes moved it
    assert out["search_flops"] > 0 and out["main_flops"] > out["search_flops"] / 10
    assert set(out["val_loss"]) == set(sh.val) and all(np.isfinite(v) for v in out["val_loss"].values())
