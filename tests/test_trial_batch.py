"""Several candidates per Tune trial (search.candidates_per_trial) and the scorer pool (search.scorer_pool):
the same candidates get the same scores as one per trial, and each stays one record downstream.

The Tune runs use test_faults.py's synthetic candidates (a small Llama, random LoRA-shaped deltas).
"""

import pytest

from opmix_ray.engine.trial_batch import BATCH, ROWS, BatchSearcher
from opmix_ray.engine.search import run_search
from opmix_ray.searchers import create_searcher, journal
from search_spaces import SimplexSpace
from tests.test_faults import COORDS, _candidates, _cfg, kill_when_busy, local_ray  # noqa: F401 (local_ray: autouse)


def _by_weights(out) -> dict:
    return {tuple(round(t[f"a_{c}"], 9) for c in COORDS): t for t in out.trials}


# --- the searcher wrapper alone (no Ray) ---

def test_batches_of_k_with_the_rest_last_and_one_record_per_candidate():
    space = SimplexSpace(COORDS)
    inner = create_searcher("random", space=space, seed=3)
    ref = create_searcher("random", space=space, seed=3)
    s = BatchSearcher(inner, per_trial=3, total=7)
    sizes, seen = [], []
    for i in range(5):
        cfg = s.suggest(f"t{i}")
        if cfg == "FINISHED":
            break
        sizes.append(len(cfg[BATCH]))
        seen += cfg[BATCH]
        rows = [{"objective": float(j), **{f"a_{c}": w for c, w in zip(COORDS, space.weights(p))}}
                for j, p in enumerate(cfg[BATCH])]
        s.on_trial_complete(f"t{i}", {"objective": 0.0, ROWS: rows}, error=i == 1)  # trial 1 errored
    assert sizes == [3, 3, 1] and s.suggest("t9") == "FINISHED"
    assert seen == [ref.suggest(f"r{i}") for i in range(7)]  # the inner searcher's own sequence
    assert [h["id"] for h in inner.history] == [f"t{i}_c{j}" for i, n in enumerate(sizes) for j in range(n)]
    assert [h["value"] is None for h in inner.history] == [False] * 3 + [True] * 3 + [False]
    assert len(s.records) == 7 and [m is None for _, m in s.records].count(True) == 3


# --- through the real Tune search ---

@pytest.fixture(scope="module")
def cands():
    return _candidates("batch", n_val=8)


@pytest.fixture(scope="module")
def unbatched(cands, tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("k1"), searcher="grid", searcher_options={"resolution": 2}, num_samples=6)
    return run_search(cfg, cands, 0, str(tmp_path_factory.mktemp("k1run")))


# the scorer pool's whole run is test_engine_e2e.py's; its scores against unbatched ones: slow
@pytest.mark.parametrize("pool", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["in-trial", "scorer-pool"])
def test_batched_scores_equal_unbatched_and_each_candidate_is_a_record(cands, unbatched, pool, tmp_path):
    # 6 lattice points in trials of 4: one of 4 and one of 2
    cfg = _cfg(tmp_path, searcher="grid", searcher_options={"resolution": 2}, num_samples=6,
               candidates_per_trial=4, scorer_pool=pool)
    out = run_search(cfg, cands, 0, str(tmp_path))
    assert out.n_trials == 6 and out.n_failed == 0 and len(out.trials) == 6
    one, many = _by_weights(unbatched), _by_weights(out)
    assert set(one) == set(many) and len(many) == 6
    for w, t in many.items():
        assert abs(t["objective"] - one[w]["objective"]) <= 1e-6
        assert all(abs(t[k] - one[w][k]) <= 1e-6 for k in one[w] if k.startswith(("loss_", "mix_")))
        assert {k for k in t if k.startswith("mix_")} == {"mix_a", "mix_b"} and t["node_id"]
    assert out.objective == pytest.approx(unbatched.objective, abs=1e-6)


def test_a_round_redone_on_its_journal_runs_only_the_missing_candidates(cands, tmp_path):
    cfg = _cfg(tmp_path, searcher="optuna-tpe", num_samples=3, candidates_per_trial=2)
    first = run_search(cfg, cands, 0, str(tmp_path))
    path = str(tmp_path / "search_round_0" / "optuna_journal.log")
    assert first.n_trials == 3 and len(journal.finished_trials(path)) == 3
    cfg = _cfg(tmp_path, searcher="optuna-tpe", num_samples=5, candidates_per_trial=2)
    again = run_search(cfg, cands, 0, str(tmp_path))
    assert again.n_trials == 5 and len(again.trials) == 5 and len(journal.finished_trials(path)) == 5
    assert _by_weights(first).keys() <= _by_weights(again).keys()


def test_a_killed_scorer_costs_a_rerun_and_no_candidate(tmp_path):
    cfg = _cfg(tmp_path, searcher="random", num_samples=4, candidates_per_trial=2, scorer_pool=True)
    cands = _candidates("kill-scorer", n_val=4000, hidden=64)  # a candidate scores for ~1.6 s
    t, killed = kill_when_busy("ray::_Scorer", after=1.5)  # both trials' scorers are busy by then
    out = run_search(cfg, cands, 0, str(tmp_path))
    t.join(timeout=5)
    assert killed and out.n_retried >= 1
    assert out.n_trials == 4 and out.n_failed == 0 and len(_by_weights(out)) == 4


@pytest.mark.slow  # ~25 s: the default suite keeps the killed trial's rerun (test_faults.py) and the killed scorer above
def test_a_batch_whose_trial_tune_gives_up_on_is_scored_again_whole(tmp_path, monkeypatch):
    """k = 2 with no retries in Tune: the killed trial's two candidates are scored by the rerun,
    each still one record, and none is lost."""
    from opmix_ray.engine import search
    from tests.test_faults import _kill_one_trial_worker
    monkeypatch.setattr(search, "TRIAL_RETRIES", 0)
    cfg = _cfg(tmp_path, searcher="random", num_samples=6, candidates_per_trial=2)
    t, killed = _kill_one_trial_worker()
    out = run_search(cfg, _candidates("batch-give-up", n_val=2000, hidden=64), 0, str(tmp_path))
    t.join(timeout=5)
    assert killed and out.n_rescored == 1 and out.n_retried == 0
    assert out.n_trials == 6 and out.n_failed == 0 and len(_by_weights(out)) == 6
