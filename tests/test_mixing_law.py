"""The mixing-law searcher as the OP-Mix reference runs it: its KL prior, linear cap rows on the
proposal, leave-one-out fit quality, and law_proposal() for the engine."""
import json
import time

import numpy as np
import pytest
from scipy.optimize import minimize

from opmix_ray.searchers import SearcherError, create_searcher
from opmix_ray.searchers._mixing_law import KL_LAMBDA, MixingLawSearcher, fit_laws, propose_mixture
from opmix_ray.searchers.testing import drive, synthetic_result
from search_spaces import SimplexSpace

COORDS = ("old", "python", "bible", "fortunes")
DOMS = ("x", "y", "z")
T_TRUE = np.array([[-1.5, 0.4, 0.2, 0.3], [0.3, -1.2, 0.5, 0.1], [0.2, 0.3, 0.4, -2.0]])
C_TRUE = np.log([1.2, 1.6, 0.9])
LAW_KEYS = {"w", "predicted", "loo_rmse", "loo_spearman", "r2", "n_fit"}


class _CappedSimplex:
    """The plain simplex cut by rows A_ub @ w <= b_ub, with SimplexSpace's contract (the shape of
    search_spaces.PolytopeSimplex, kept here so the searcher is checked against the contract alone)."""

    def __init__(self, coords, A_ub, b_ub):
        self._base = SimplexSpace(coords)
        self.coords, self.param_names = self._base.coords, self._base.param_names
        self.lower, self.upper = np.zeros(len(coords)), np.ones(len(coords))
        self.A_ub, self.b_ub = np.atleast_2d(np.asarray(A_ub, float)), np.asarray(b_ub, float)

    def contains(self, w, tol=1e-9):
        return self._base.contains(w, tol) and bool(np.all(self.A_ub @ np.asarray(w) <= self.b_ub + tol))

    def project(self, w):
        w = np.nan_to_num(np.asarray(w, dtype=np.float64))
        cons = [{"type": "eq", "fun": lambda x: x.sum() - 1.0},
                {"type": "ineq", "fun": lambda x: self.b_ub - self.A_ub @ x - 1e-12}]
        res = minimize(lambda x: np.sum((x - w) ** 2), np.full(len(w), 1.0 / len(w)), method="SLSQP",
                       bounds=[(0.0, 1.0)] * len(w), constraints=cons, options={"ftol": 1e-14, "maxiter": 500})
        x = np.clip(res.x, 0.0, None)
        return x / x.sum()

    def weights(self, config):
        w = self._base.weights(config)
        return w if self.contains(w) else self.project(w)

    def params(self, w):
        return self._base.params(w)

    def sample(self, rng):
        return self._base.sample(rng)


# a_old * 0.5 + a_python <= 0.2: python's share of the trained mixture capped at 20%, with old half python
CAPPED = _CappedSimplex(COORDS, [[0.5, 1.0, 0.0, 0.0]], [0.2])


def law_result(a, rng, noise=0.003, pure_noise=False) -> dict:
    """A trial's report under the exact law L_d(a) = exp(c_d) + exp(t_d . a), plus noise."""
    losses = (2.0 if pure_noise else np.exp(C_TRUE) + np.exp(T_TRUE @ a)) + rng.normal(0.0, noise, len(DOMS))
    return {"objective": float(losses.mean()), **{f"loss_{d}": float(x) for d, x in zip(DOMS, losses)},
            **{f"a_{c}": float(x) for c, x in zip(COORDS, a)}}


def fed(n=20, seed=0, space=None, **kw) -> MixingLawSearcher:
    """A searcher fed n finished trials (reported with a_ keys, as the engine refeeds them)."""
    space = space or SimplexSpace(COORDS)
    s = MixingLawSearcher(space=space, seed=3, n_init=8, objective_weights={d: 1.0 for d in DOMS})
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = space.weights(space.sample(rng))
        s.on_trial_complete(f"t{i}", law_result(a, rng, **kw))
    return s


def test_prior_is_the_references_with_old_and_uniform_without():
    s = MixingLawSearcher(space=SimplexSpace(COORDS))
    np.testing.assert_allclose(s.prior, [0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3])
    assert s.lam == KL_LAMBDA == 0.05
    s = MixingLawSearcher(space=SimplexSpace(("old", "python")))
    np.testing.assert_allclose(s.prior, [0.5, 0.5])
    s = MixingLawSearcher(space=SimplexSpace(("python", "bible", "fortunes")))
    np.testing.assert_allclose(s.prior, np.full(3, 1 / 3))


def test_explicit_prior_overrides_and_a_bad_one_is_refused():
    s = MixingLawSearcher(space=SimplexSpace(COORDS), prior=[2.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(s.prior, [0.5, 0.25, 0.25, 0.0])
    s = MixingLawSearcher(space=SimplexSpace(COORDS), prior={"old": 1.0, "bible": 1.0})
    np.testing.assert_allclose(s.prior, [0.5, 0.0, 0.5, 0.0])
    for bad in ([1.0, 1.0], [1.0, -1.0, 1.0, 1.0], [0.0] * 4, [np.nan, 1.0, 1.0, 1.0]):
        with pytest.raises(SearcherError, match=r"mixing-law prior .*fix:"):
            MixingLawSearcher(space=SimplexSpace(COORDS), prior=bad)


def test_proposal_respects_a_linear_cap_that_binds():
    # unconstrained, python would take most of the mass; the cap row must stop it at 0.2 exactly
    T = np.array([[0.0, -3.0, 0.0, 0.0], [0.5, -2.0, 0.5, 0.5]])
    v, q, lo, hi = np.full(2, 0.5), np.full(4, 0.25), np.zeros(4), np.ones(4)
    free = propose_mixture(T, v, q, lo, hi)
    assert CAPPED.A_ub @ free > CAPPED.b_ub + 0.1
    w = propose_mixture(T, v, q, lo, hi, A_ub=CAPPED.A_ub, b_ub=CAPPED.b_ub)
    assert abs(w.sum() - 1) < 1e-6 and np.all(w >= -1e-9)
    np.testing.assert_allclose(CAPPED.A_ub @ w, CAPPED.b_ub, atol=1e-6)  # active, and not crossed


def test_searcher_on_a_capped_space_keeps_every_proposal_and_draw_feasible():
    s = create_searcher("mixing-law", space=CAPPED, seed=0, n_init=6, restarts=6)
    ws = drive(s, CAPPED, 10)  # drive checks A_ub @ w <= b_ub on every suggestion
    assert s.proposals and all(CAPPED.contains(np.array(p["w"]), tol=1e-6) for p in s.proposals)
    law = s.law_proposal()
    assert CAPPED.contains(np.array(law["w"]), tol=1e-6) and len(ws) == 10
    if hasattr(__import__("search_spaces"), "PolytopeSimplex"):  # the library's own capped space too
        from search_spaces import PolytopeSimplex
        space = PolytopeSimplex(COORDS, CAPPED.A_ub, CAPPED.b_ub)
        s = create_searcher("mixing-law", space=space, seed=0, n_init=6, restarts=6)
        drive(s, space, 9)
        assert space.contains(np.array(s.law_proposal()["w"]), tol=1e-6)


def test_leave_one_out_is_good_on_an_exact_law_and_poor_on_noise():
    law = fed(n=20).law_proposal()
    assert set(law) == LAW_KEYS and law["n_fit"] == 20
    assert law["loo_spearman"] > 0.9 and law["r2"] > 0.95 and law["loo_rmse"] < 0.02, law
    for seed in range(3):
        noise = fed(n=20, seed=seed, noise=0.02, pure_noise=True).law_proposal()
        assert noise["loo_spearman"] is None or noise["loo_spearman"] < 0.5, noise


def test_every_proposal_carries_its_fit_quality():
    s = MixingLawSearcher(space=SimplexSpace(COORDS), seed=0, n_init=6, restarts=6)
    drive(s, SimplexSpace(COORDS), 9)
    assert len(s.proposals) == 3
    for p in s.proposals:
        assert LAW_KEYS <= set(p) and p["n_fit"] >= 6 and isinstance(p["used"], bool)
        assert p["loo_rmse"] >= 0 and (p["loo_spearman"] is None or -1 <= p["loo_spearman"] <= 1)
    json.dumps(s.get_state())  # still plain JSON


def test_law_proposal_is_none_before_n_init_then_deterministic_and_restorable():
    assert fed(n=7).law_proposal() is None  # n_init=8
    s = fed(n=12)
    first = s.law_proposal()
    assert first == s.law_proposal() == fed(n=12).law_proposal()  # same history -> same dict
    json.dumps(first)
    r = MixingLawSearcher(space=SimplexSpace(COORDS), seed=3, n_init=8, objective_weights={d: 1.0 for d in DOMS})
    r.set_state(json.loads(json.dumps(s.get_state())))
    assert r.law_proposal() == first
    s.on_trial_complete("extra", synthetic_result(SimplexSpace(COORDS), SimplexSpace(COORDS).params(np.full(4, .25))))
    assert s.law_proposal()["n_fit"] == 13  # every completed trial counts, also unsuggested ones


def test_leave_one_out_at_the_largest_size_is_fast():
    """n = 24 trials, 7 coordinates, 7 eval domains, 24 restarts: the fit plus 24 refits (8 restarts
    each) take ~0.2 s of CPU; 3 s is the budget the engine calls it under."""
    rng = np.random.default_rng(0)
    A = rng.dirichlet(np.ones(7), 24)
    Y = 1.5 + np.exp(A @ rng.normal(0, 1, (7, 7)).T) + rng.normal(0, 0.01, (24, 7))
    fit_laws(A[:4], Y[:4, :1], rng, 2)  # warm the imports
    t0 = time.process_time()
    fit_laws(A, Y, rng, 24)
    fit_laws(A, Y, rng, 8, masks=1.0 - np.eye(24))
    assert time.process_time() - t0 < 3.0
