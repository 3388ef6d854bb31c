"""Every built-in searcher through the conformance suite (opmix_ray.searchers.testing), plus the base class's
own guarantees and the registry's errors."""
import json

import numpy as np
import pytest
from ray.tune.search import Searcher

from opmix_ray.searchers import MixtureSearcher, SearcherError, create_searcher, registered
from opmix_ray.searchers.testing import PLAIN, SearcherConformance, drive, synthetic_result
from search_spaces import ConstrainedSimplex, SimplexSpace

# Small model-based settings so the suite reaches the model phase within its 14 trials.
_KW = {"optuna-tpe": {"n_startup_trials": 4}, "optuna-gp": {"n_startup_trials": 4},
       "mixing-law": {"n_init": 5, "restarts": 4}, "random": {}, "grid": {}}


def _factory(name):
    return lambda space, seed, points_to_evaluate=None: create_searcher(
        name, space=space, seed=seed, points_to_evaluate=points_to_evaluate, **_KW[name])


def test_every_registered_searcher_is_covered():
    assert set(registered()) == set(_KW)


class TestRandom(SearcherConformance):
    @pytest.fixture
    def make_searcher(self):
        return _factory("random")


class TestGrid(SearcherConformance):
    @pytest.fixture
    def make_searcher(self):
        return _factory("grid")


class TestOptunaTPE(SearcherConformance):
    @pytest.fixture
    def make_searcher(self):
        return _factory("optuna-tpe")


class TestOptunaGP(SearcherConformance):
    @pytest.fixture
    def make_searcher(self):
        return _factory("optuna-gp")


class TestMixingLaw(SearcherConformance):
    @pytest.fixture
    def make_searcher(self):
        return _factory("mixing-law")


# --- the suite catches broken searchers (so passing it means something) ---

class _Forgetful(MixtureSearcher):
    """Draws from a process-global RNG: not reproducible, and restore loses its place."""
    _g = np.random.default_rng(0)

    def propose(self, trial_id):
        return self._g.dirichlet(np.ones(len(self.space.coords)))


def test_suite_catches_a_searcher_that_does_not_restore(tmp_path):
    suite = SearcherConformance()
    make = lambda space, seed, points_to_evaluate=None: _Forgetful(space=space, seed=seed,
                                                                   points_to_evaluate=points_to_evaluate)
    with pytest.raises(AssertionError):
        suite.test_save_restore_gives_same_next_suggestion(make, tmp_path)
    with pytest.raises(AssertionError):
        suite.test_same_seed_same_suggestions(make)


# --- base-class guarantees ---

class _Fixed(MixtureSearcher):
    def __init__(self, out, **kw):
        super().__init__(**kw)
        self.out = out

    def propose(self, trial_id):
        return self.out


class _NoPropose(MixtureSearcher):
    pass


def test_a_searcher_without_propose_is_refused_naming_the_method():
    with pytest.raises(TypeError, match="propose"):
        _NoPropose(space=PLAIN)
    with pytest.raises(SearcherError, match=r"does not implement \['propose'\]"):
        create_searcher(f"{__name__}:_NoPropose", space=PLAIN)


@pytest.mark.parametrize("out", [[0.5, 0.6, 0.0, 0.0], [np.nan, 0.5, 0.5, 0.0], [-0.1, 0.5, 0.6, 0.0], [1.0, 0.0]])
def test_off_space_suggestion_is_an_error_naming_the_searcher(out):
    with pytest.raises(SearcherError, match="_Fixed suggested"):
        _Fixed(out, space=PLAIN).suggest("t0")


def test_bounds_are_enforced_on_suggestions():
    space = ConstrainedSimplex(("a", "b", "c"), upper={"a": 0.2})
    with pytest.raises(SearcherError, match="off the space"):
        _Fixed([0.5, 0.25, 0.25], space=space).suggest("t0")


def test_finished_is_sticky_and_failures_are_none():
    s = _Fixed(Searcher.FINISHED, space=PLAIN)
    assert s.suggest("a") == Searcher.FINISHED
    s.out = [0.25] * 4
    assert s.suggest("b") == Searcher.FINISHED  # never un-finishes, also across save/restore
    r = _Fixed([0.25] * 4, space=PLAIN)
    r.set_state(json.loads(json.dumps(s.get_state())))
    assert r.suggest("c") == Searcher.FINISHED
    s = _Fixed([0.25] * 4, space=PLAIN)
    for i, res in enumerate([{"objective": float("nan")}, None, {"objective": 1.5, "loss_x": float("inf")}]):
        s.suggest(str(i))
        s.on_trial_complete(str(i), res)
    assert [h["value"] for h in s.history] == [None, None, 1.5] and s.history[2]["losses"] == {}


def test_state_from_another_searcher_is_refused():
    s = create_searcher("random", space=PLAIN, seed=0)
    with pytest.raises(SearcherError, match="restore with the same search.searcher"):
        create_searcher("grid", space=PLAIN, seed=0).set_state(s.get_state())


def test_grid_covers_its_lattice_then_finishes():
    space = SimplexSpace(("a", "b", "c"))
    s = create_searcher("grid", space=space, resolution=4)
    ws = drive(s, space, 100)
    assert len(ws) == 15 and len({tuple(np.round(w, 6)) for w in ws}) == 15  # C(6, 2)
    assert s.suggest("more") == Searcher.FINISHED


# --- registry ---

def test_registry_errors_name_the_field_and_fix():
    with pytest.raises(SearcherError, match=r"search.searcher: 'nope' is neither.*fix:"):
        create_searcher("nope", space=PLAIN)
    with pytest.raises(SearcherError, match=r"cannot import 'no_such_mod' \(ModuleNotFoundError.*fix:"):
        create_searcher("no_such_mod:X", space=PLAIN)
    with pytest.raises(SearcherError, match="not a ray.tune.search.Searcher"):
        create_searcher("builtins:dict", space=PLAIN)


def test_dotted_path_and_context_kwargs():
    # a searcher that does not take objective_weights still builds when engine/search.py offers it
    s = create_searcher("opmix_ray.searchers._random:RandomSimplexSearcher", space=PLAIN, seed=0,
                        objective_weights={"python": 1.0})
    assert type(s).__name__ == "RandomSimplexSearcher"
    m = create_searcher("mixing-law", space=PLAIN, objective_weights={"python": 1.0})
    assert m.objective_weights == {"python": 1.0}


# --- the mixing law itself ---

def test_mixing_law_fit_recovers_a_known_law_and_proposes_its_optimum():
    from opmix_ray.searchers import fit_laws, propose_mixture

    rng = np.random.default_rng(0)
    A = rng.dirichlet(np.ones(4), 16)
    T = np.array([[-2.0, 0.5, 0.3, 0.1], [0.4, -1.5, 0.2, 0.3]])
    Y = np.log([1.5, 2.0]) + 0 * A[:, :2]
    Y = np.exp(Y) + np.exp(A @ T.T)
    fits = fit_laws(A, Y, np.random.default_rng(1), restarts=8)
    for (c, t, _), j in zip(fits, range(2)):
        np.testing.assert_allclose(np.exp(c) + np.exp(A @ t), Y[:, j], atol=2e-3)
    w = propose_mixture(np.stack([t for _, t, _ in fits]), np.array([0.5, 0.5]), np.full(4, 0.25),
                        np.zeros(4), np.ones(4), lam=0.0)
    true = lambda w: np.mean(np.exp(T @ w))
    grid = rng.dirichlet(np.ones(4), 20000)
    assert abs(w.sum() - 1) < 1e-6 and true(w) <= min(true(g) for g in grid) + 1e-3


def test_mixing_law_proposal_respects_caps_and_beats_random():
    space = ConstrainedSimplex(PLAIN.coords, upper={"fortunes": 0.3})
    res = lambda w: synthetic_result(space, space.params(w))["objective"]
    law = create_searcher("mixing-law", space=space, seed=0, n_init=8, restarts=8)
    ws = drive(law, space, 10)
    assert len(law.proposals) >= 1 and all(w[3] <= 0.3 + 1e-9 for w in ws)
    rand = drive(create_searcher("random", space=space, seed=0), space, 10)
    assert min(res(w) for w in ws[8:]) < min(res(w) for w in rand)


@pytest.mark.parametrize("name, options", [("optuna-tpe", {"n_startup_trials": 3}), ("grid", {"resolution": 3}),
                                           ("mixing-law", {"n_init": 4, "kl_lambda": 0.5})])
def test_restore_into_a_default_built_instance_keeps_the_constructor_options(name, options, tmp_path):
    """The saved state carries the constructor options: a restore into an instance built with the
    defaults (as Tune's restore does) continues exactly as the saved searcher would."""
    s = create_searcher(name, space=PLAIN, seed=4, **options)
    drive(s, PLAIN, 6)
    s.save(str(tmp_path / "state.json"))
    assert options.items() <= json.loads((tmp_path / "state.json").read_text())["options"].items()
    r = create_searcher(name, space=PLAIN, seed=0)
    r.restore(str(tmp_path / "state.json"))
    np.testing.assert_allclose(np.array(drive(s, PLAIN, 5, prefix="n")), np.array(drive(r, PLAIN, 5, prefix="n")),
                               atol=1e-9)


@pytest.mark.parametrize("name", registered())
def test_every_built_in_takes_metric_and_mode_at_construction(name):
    # objective_weights as the engine offers it: taken or dropped, never an error
    s = create_searcher(name, space=PLAIN, metric="objective", mode="max", objective_weights={"a": 1.0})
    assert s.metric == "objective" and s.mode == "max"
    with pytest.raises(SearcherError, match="mode 'best'"):
        create_searcher(name, space=PLAIN, mode="best")


@pytest.mark.parametrize("name", ["optuna-tpe", "optuna-gp"])
def test_an_optuna_searcher_on_a_journal_goes_on_from_its_finished_trials(name, tmp_path):
    """What a round redone on resume does: a new searcher on the interrupted search's journal makes
    the suggestions the uninterrupted searcher makes after the same trials (warm point included)."""
    from opmix_ray.searchers import journal
    space = SimplexSpace(("a", "b", "c"))
    start = [[1 / 3, 1 / 3, 1 / 3]]
    opts = dict(space=space, seed=5, points_to_evaluate=start, n_startup_trials=3)
    whole = drive(create_searcher(name, **opts), space, 7)
    path = str(tmp_path / "optuna_journal.log")
    first = drive(create_searcher(name, journal_path=path, **opts), space, 4)
    assert len(journal.finished_trials(path)) == 4
    assert journal.reusable(path, "") == [] and not (tmp_path / "optuna_journal.log").exists()  # unstamped: stale
    (tmp_path / "optuna_journal.log.stale").rename(path)
    journal.stamp(path, "fp")
    rows = journal.reusable(path, "fp")
    assert [r["state"] for r in rows] == ["complete"] * 4 and all("loss_a" in r["metrics"] for r in rows)
    rest = drive(create_searcher(name, journal_path=path, **opts), space, 3, prefix="r")
    np.testing.assert_allclose(np.array(first + rest), np.array(whole), atol=1e-12)
    assert len(journal.finished_trials(path)) == 7
