"""A conformance suite any searcher runs by supplying one fixture (as optuna/testing/pytest_samplers.py).

    # tests/test_my_searcher.py
    import pytest
    from opmix_ray.searchers.testing import SearcherConformance

    class TestMySearcher(SearcherConformance):
        @pytest.fixture
        def make_searcher(self):
            return lambda space, seed, points_to_evaluate=None: MySearcher(
                space=space, seed=seed, points_to_evaluate=points_to_evaluate)

The suite drives the searcher directly (suggest / on_trial_complete) with a synthetic objective
computed from the suggested weights, in the shape a real trial reports (objective, loss_<coord>,
a_<coord>; see opmix_ray.engine.scoring.score), so it needs no Ray cluster and runs in seconds. It checks:
suggestions on the simplex (plain, box-constrained, and cut by linear cap rows A_ub @ a <= b_ub),
NaN / inf / None / missing / errored results handled, FINISHED respected, same seed -> same
suggestions, save -> restore (plain JSON) -> same next suggestion, warm-start points first, and
correct under ConcurrencyLimiter(max_concurrent=2), and a trial reported complete twice counted once.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from ray.tune.search import ConcurrencyLimiter, Searcher

from search_spaces import ConstrainedSimplex, PolytopeSimplex, SimplexSpace, cap_constraints

PLAIN = SimplexSpace(("old", "python", "bible", "fortunes"))
CONSTRAINED = ConstrainedSimplex(("old", "python", "bible", "fortunes", "licenses"),
                                 lower={"python": 0.1}, upper={"bible": 0.2}, fixed={"licenses": 0.05})
# Caps on the mixture a_old * p + a that bind: a_old * 0.25 + a_fortunes <= 0.1 rules out most of the
# simplex (uniform weights included), so a searcher that ignores A_ub is caught within a few trials.
_P = {"python": 0.5, "bible": 0.25, "fortunes": 0.25}
POLYTOPE = PolytopeSimplex(PLAIN.coords, *cap_constraints(PLAIN.coords, _P, {"fortunes": 0.1, "bible": 0.3}))
FINISHED = Searcher.FINISHED


def synthetic_result(space, config: dict) -> dict:
    """A trial's report for the weights `config` stands for: per-coordinate losses that fall as a
    coordinate gains weight, at different rates, so the optimum is inside the simplex and not uniform."""
    w = space.weights(config)
    rates = np.linspace(1.0, 4.0, len(w))
    losses = 2.0 + np.exp(-rates * w) + 0.3 * w**2
    out = {"objective": float(losses.mean())}
    out.update({f"loss_{c}": float(x) for c, x in zip(space.coords, losses)})
    out.update({f"a_{c}": float(x) for c, x in zip(space.coords, w)})
    return out


def assert_on_space(space, config) -> np.ndarray:
    assert isinstance(config, dict), f"suggestion {config!r} is not a config dict"
    w = space.weights(config)
    assert w.shape == (len(space.coords),) and np.all(np.isfinite(w)), w
    assert abs(w.sum() - 1.0) <= 1e-6, f"weights {w} sum to {w.sum()}"
    assert np.all(w >= space.lower - 1e-6) and np.all(w <= space.upper + 1e-6), (w, space.lower, space.upper)
    A, b = getattr(space, "A_ub", None), getattr(space, "b_ub", None)
    if A is not None and len(A):  # a space without linear rows (or a user's own without A_ub) skips this
        assert np.all(A @ w <= b + 1e-6), f"weights {w} break A_ub @ w <= b_ub by {np.max(A @ w - b):.3g}"
    return w


def drive(searcher, space, n: int, prefix: str = "t", result_fn=synthetic_result) -> list:
    """Suggest and complete up to n trials one at a time; returns the weights (stops at FINISHED)."""
    out = []
    for i in range(n):
        cfg = searcher.suggest(f"{prefix}{i}")
        if cfg == FINISHED:
            break
        assert cfg is not None, "a searcher with no trial in flight returned None (it would stall Tune)"
        out.append(assert_on_space(space, cfg))
        searcher.on_trial_complete(f"{prefix}{i}", result_fn(space, cfg))
    return out


class SearcherConformance:
    """Subclass in a test file and supply `make_searcher(space, seed, points_to_evaluate=None)`."""

    n_trials = 14  # enough to leave a model-based searcher's random start-up phase

    @pytest.fixture
    def make_searcher(self):
        raise NotImplementedError("supply a make_searcher fixture")

    @pytest.mark.parametrize("space", [PLAIN, CONSTRAINED], ids=["plain", "constrained"])
    def test_suggestions_on_the_simplex(self, make_searcher, space):
        ws = drive(make_searcher(space, 0), space, self.n_trials)
        assert ws, "no suggestion at all"

    def test_suggestions_satisfy_linear_caps(self, make_searcher):
        """Every suggestion on a PolytopeSimplex satisfies its cap rows, also after a model phase."""
        ws = drive(make_searcher(POLYTOPE, 0), POLYTOPE, max(20, self.n_trials))
        assert ws, "no suggestion at all"
        W = np.array(ws)
        assert np.all(W @ POLYTOPE.A_ub.T <= POLYTOPE.b_ub + 1e-6), np.max(W @ POLYTOPE.A_ub.T - POLYTOPE.b_ub)
        assert np.all(np.abs(W.sum(axis=1) - 1) <= 1e-6) and np.all(W >= -1e-9)

    def test_failed_results_are_handled(self, make_searcher):
        s = make_searcher(PLAIN, 1)
        bad = [{"objective": math.nan}, {"objective": math.inf}, {"objective": -math.inf}, None, {},
               {"objective": None}, {"objective": "n/a"}, "error"]
        for i in range(self.n_trials):
            cfg = s.suggest(f"t{i}")
            if cfg == FINISHED:
                break
            assert_on_space(PLAIN, cfg)
            b = bad[i // 2] if i % 2 == 0 and i // 2 < len(bad) else None
            if b == "error":
                s.on_trial_complete(f"t{i}", None, error=True)
            elif i % 2 == 0 and i // 2 < len(bad):
                s.on_trial_complete(f"t{i}", b)
            else:
                s.on_trial_complete(f"t{i}", synthetic_result(PLAIN, cfg))
        drive(s, PLAIN, 3, prefix="after")  # still suggests valid points
        for h in getattr(s, "history", []):  # MixtureSearchers keep failures as None, never NaN
            assert h["value"] is None or math.isfinite(h["value"])

    def test_a_second_completion_of_one_trial_is_ignored(self, make_searcher):
        """Ray Tune's testOptunaReportTooOften, for any searcher: a result reported after a trial
        completed, and a second completion of it (with another value, or as an error), change
        nothing: the searcher goes on exactly as one that saw the trial complete once."""
        once, twice = make_searcher(PLAIN, 12), make_searcher(PLAIN, 12)
        n_done = len(drive(once, PLAIN, self.n_trials - 4))
        assert len(drive(twice, PLAIN, self.n_trials - 4)) == n_done
        for tid in ("x0", "x1"):
            x, y = once.suggest(tid), twice.suggest(tid)
            if x == FINISHED or y == FINISHED:
                assert x == y
                return
            res = synthetic_result(PLAIN, x)
            once.on_trial_complete(tid, res)
            twice.on_trial_result(tid, {**res, "training_iteration": 1})
            twice.on_trial_complete(tid, res)
            twice.on_trial_result(tid, {**res, "training_iteration": 3})  # a report after completion: no error
            if tid == "x0":  # again, with a far better value: counted, it would pull a model towards it
                twice.on_trial_complete(tid, {**res, "objective": 0.0, "training_iteration": 4})
            else:  # again, as an error
                twice.on_trial_complete(tid, None, error=True)
        if getattr(once, "history", None) is not None:
            assert [h["id"] for h in twice.history] == [h["id"] for h in once.history]
            assert [h["value"] for h in twice.history] == [h["value"] for h in once.history]
        self._same_next(once, twice, "next0", n_done + 2)

    def test_finished_is_respected(self, make_searcher):
        s = make_searcher(PLAIN, 2)
        for i in range(200):
            cfg = s.suggest(f"t{i}")
            if cfg == FINISHED:
                for j in range(3):
                    assert s.suggest(f"again{j}") == FINISHED, "a searcher suggested after FINISHED"
                break
            s.on_trial_complete(f"t{i}", synthetic_result(PLAIN, cfg))
            if i >= self.n_trials and not getattr(s, "_finished", False):
                break  # an unbounded searcher: nothing more to check here

    def test_same_seed_same_suggestions(self, make_searcher):
        a, b = drive(make_searcher(PLAIN, 5), PLAIN, self.n_trials), drive(make_searcher(PLAIN, 5), PLAIN, self.n_trials)
        assert len(a) == len(b)
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-9)

    def test_save_restore_gives_same_next_suggestion(self, make_searcher, tmp_path):
        s = make_searcher(PLAIN, 7, points_to_evaluate=[np.full(4, 0.25)])
        n_done = len(drive(s, PLAIN, self.n_trials - 3))
        pending = s.suggest("pending")  # one trial in flight across the save
        if pending == FINISHED:
            pytest.skip("searcher finished before the save point")
        path = tmp_path / "searcher_state.json"
        s.save(str(path))
        json.loads(path.read_text())  # plain JSON, no pickle
        r = make_searcher(PLAIN, 7, points_to_evaluate=[np.full(4, 0.25)])
        r.restore(str(path))
        x = self._same_next(s, r, "next0", n_done)
        if x is None:
            return
        for t in (s, r):  # the trial in flight at save time completes after the restore
            t.on_trial_complete("pending", synthetic_result(PLAIN, pending))
            t.on_trial_complete("next0", synthetic_result(PLAIN, x))
        self._same_next(s, r, "next1", n_done + 2)

    def test_restore_then_the_trial_in_flight_completes_first(self, make_searcher, tmp_path):
        """Ray's order after a restore: a trial that was in flight at save time reports before the
        next suggest (the restored searcher must not replay it twice)."""
        s = make_searcher(PLAIN, 8)
        n_done = len(drive(s, PLAIN, self.n_trials - 3))
        pending = s.suggest("pending")
        if pending == FINISHED:
            pytest.skip("searcher finished before the save point")
        path = tmp_path / "searcher_state.json"
        s.save(str(path))
        r = make_searcher(PLAIN, 8)
        r.restore(str(path))
        for t in (s, r):
            t.on_trial_complete("pending", synthetic_result(PLAIN, pending))
        self._same_next(s, r, "next0", n_done + 1)

    def test_restore_into_an_instance_built_with_another_seed_follows_the_saved_one(self, make_searcher, tmp_path):
        s = make_searcher(PLAIN, 11)
        n_done = len(drive(s, PLAIN, 4))
        path = tmp_path / "searcher_state.json"
        s.save(str(path))
        r = make_searcher(PLAIN, 0)
        r.restore(str(path))
        self._same_next(s, r, "next0", n_done)

    def test_mode_max_from_tune_config_is_honoured(self, make_searcher):
        """TuneConfig(metric=, mode="max") reaches the searcher through set_search_properties."""
        s = make_searcher(PLAIN, 9)
        assert s.set_search_properties("objective", "max", {}) is True, "mode='max' was refused or ignored"
        cfg = s.suggest("t0")
        s.on_trial_complete("t0", {**synthetic_result(PLAIN, cfg), "objective": 2.5})
        if getattr(s, "history", None):  # MixtureSearchers minimise the negated value
            assert s.history[-1]["value"] == -2.5
        drive(s, PLAIN, 3, prefix="after")

    def test_points_evaluated_elsewhere_can_be_added(self, make_searcher):
        """add_evaluated_point: a warm start from an earlier experiment, deterministic like the rest."""
        def fed():
            s = make_searcher(PLAIN, 10)
            for i, w in enumerate(([0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25] * 4)):
                s.add_evaluated_point(dict(zip(PLAIN.coords, w)), 1.0 + 0.1 * i)
            return s
        s = fed()
        if getattr(s, "history", None) is not None:
            assert len(s.history) == 3 and s.history[0]["value"] == 1.0
            np.testing.assert_allclose(s.history[0]["w"], [0.4, 0.3, 0.2, 0.1])
        a, b = drive(s, PLAIN, 4), drive(fed(), PLAIN, 4)
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-9)

    def test_through_a_real_tune_run_then_restored_from_its_dir(self, make_searcher, tmp_path):
        """Real Tune drives the searcher (a concurrency limit of 2, metric and mode from TuneConfig,
        mode "max") and saves it into the experiment dir; a searcher built with another seed and
        restored from that dir holds every finished trial, maximised, and suggests what the original
        would next."""
        import ray
        from ray import tune
        s = make_searcher(PLAIN, 3)

        def trainable(config):
            w = PLAIN.weights(config)
            tune.report({"objective": float(np.sum((w - 0.25) ** 2))})
        # Tune hands TuneConfig's metric and mode to the searcher (set_search_properties) only when
        # there is a param_space; a constant one is enough
        tuner = tune.Tuner(trainable, param_space={"fixed": 0}, tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(s, max_concurrent=2), metric="objective", mode="max", num_samples=6,
            reuse_actors=True), run_config=tune.RunConfig(storage_path=str(tmp_path), name="exp", verbose=0))
        try:
            grid = tuner.fit()
        finally:
            ray.shutdown()
        done = [r for r in grid if r.metrics and "objective" in r.metrics]
        assert done and s.mode == "max"
        r = make_searcher(PLAIN, 0)
        r.restore_from_dir(str(tmp_path / "exp"))
        if getattr(s, "history", None) is not None:
            assert len(r.history) == len(s.history) == len(done)
            assert all(h["value"] is None or h["value"] <= 0 for h in r.history)  # maximised: negated
        self._same_next(s, r, "next0", len(done))

    @staticmethod
    def _same_next(s, r, tid: str, n_done: int):
        x, y = s.suggest(tid), r.suggest(tid)
        assert (x == FINISHED) == (y == FINISHED)
        if x == FINISHED:
            return None
        np.testing.assert_allclose(PLAIN.weights(x), PLAIN.weights(y), atol=1e-9,
                                   err_msg=f"restored searcher diverged after {n_done} trials")
        return x

    def test_warm_start_points_come_first(self, make_searcher):
        pts = [np.array([0.7, 0.1, 0.1, 0.1]), np.full(4, 0.25)]
        s = make_searcher(PLAIN, 3, points_to_evaluate=pts)
        ws = drive(s, PLAIN, 3)
        for p, w in zip(pts, ws):
            np.testing.assert_allclose(w, p, atol=1e-6)

    def test_under_concurrency_limit_of_two(self, make_searcher):
        lim = ConcurrencyLimiter(make_searcher(PLAIN, 4), max_concurrent=2)
        live, done, i = {}, 0, 0
        while done < self.n_trials:
            cfg = lim.suggest(f"t{i}")
            if cfg == FINISHED:
                break
            if cfg is not None:
                live[f"t{i}"] = assert_on_space(PLAIN, cfg)
                i += 1
                assert len(live) <= 2
                if len(live) < 2:
                    continue
            assert live, "None with no trial in flight: the search would stall"
            tid = sorted(live)[-1] if done % 2 else sorted(live)[0]  # finish out of order half the time
            w = live.pop(tid)
            lim.on_trial_complete(tid, synthetic_result(PLAIN, PLAIN.params(w)))
            done += 1
        hist = getattr(lim.searcher, "history", None)
        if hist is not None:  # every completion reached the searcher, with the weights it suggested
            assert len(hist) == done
