"""SimplexSpace: every point of the u-box is a mixture, params() inverts weights(), and uniform u
is uniform (Dirichlet(1)) on the simplex."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from search_spaces import SimplexSpace

u_value = st.one_of(st.floats(min_value=0.0, max_value=1.0, exclude_min=True), st.just(1.0), st.just(1e-300))


def _space(k):
    return SimplexSpace(tuple(f"c{i}" for i in range(k)))


@st.composite
def simplex_points(draw, k_min=2, k_max=8):
    k = draw(st.integers(k_min, k_max))
    raw = draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-12, 1.0)), min_size=k, max_size=k)
               .filter(lambda r: sum(r) > 0))
    w = np.asarray(raw) / sum(raw)
    return w


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 8).flatmap(lambda k: st.lists(u_value, min_size=k, max_size=k)))
def test_any_u_in_box_is_on_the_simplex(u):
    space = _space(len(u))
    w = space.weights(dict(zip(space.param_names, u)))
    assert w.shape == (len(u),)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    assert abs(w.sum() - 1.0) <= 1e-9


@settings(max_examples=300, deadline=None)
@given(simplex_points())
def test_params_then_weights_round_trips(w):
    space = _space(len(w))
    p = space.params(w)
    assert list(p) == space.param_names
    assert all(0 < v <= 1 for v in p.values())  # a valid point of the searched box
    np.testing.assert_allclose(space.weights(p), w, atol=1e-6)


def test_uniform_weights_map_to_one_over_e():
    p = _space(4).params([0.25] * 4)
    assert all(v == pytest.approx(1 / math.e) for v in p.values())
    assert _space(3).weights({"u_c0": 1.0, "u_c1": 1.0, "u_c2": 1.0}).tolist() == [1 / 3] * 3


@settings(max_examples=100, deadline=None)
@given(simplex_points(), st.floats(1e-3, 1e3))
def test_direct_w_keys_are_accepted_and_normalised(w, scale):
    space = _space(len(w))
    cfg = {f"w_{c}": float(x * scale) for c, x in zip(space.coords, w)}
    cfg.update({p: 0.5 for p in space.param_names})  # w_ keys win over u_ keys
    np.testing.assert_allclose(space.weights(cfg), w, atol=1e-12)


@pytest.mark.parametrize("bad", [[0.5, -0.1, 0.6], [0.0, 0.0, 0.0], [math.nan, 0.5, 0.5],
                                 [math.inf, 0.5, 0.5], [0.2, -math.inf, 1.0]])
def test_invalid_direct_weights_raise(bad):
    space = _space(3)
    with pytest.raises(ValueError, match="not a mixture"):
        space.weights({f"w_{c}": x for c, x in zip(space.coords, bad)})


def test_invalid_coords():
    for coords in [("a",), ("a", "a"), ()]:
        with pytest.raises(ValueError):
            SimplexSpace(coords)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_uniform_u_gives_dirichlet_one(k):
    """Seeded: w from uniform u is Dirichlet(1), so E[w_i] = 1/k, E[w_i^2] = 2/(k(k+1)),
    and w_0 ~ Beta(1, k-1), i.e. P(w_0 > t) = (1-t)^(k-1). With n = 20000 the standard errors
    are <= 0.0025 (means), so tolerances of 0.01 / 0.015 are 4+ standard errors, and the seed
    makes the test deterministic anyway."""
    space = _space(k)
    rng = np.random.default_rng(12345)
    n = 20_000
    W = np.stack([space.weights(space.sample(rng)) for _ in range(n)])
    assert np.all(np.abs(W.mean(axis=0) - 1 / k) <= 0.01)
    assert np.all(np.abs((W**2).mean(axis=0) - 2 / (k * (k + 1))) <= 0.01)
    for t in (0.1, 0.3, 0.5):
        assert abs((W[:, 0] > t).mean() - (1 - t) ** (k - 1)) <= 0.015
    # the naive alternative (normalising uniform u directly) crowds the centre; this one does not
    naive = rng.uniform(size=(n, k))
    naive /= naive.sum(axis=1, keepdims=True)
    if k >= 3:
        assert W.var(axis=0).mean() > 1.3 * naive.var(axis=0).mean()


def test_sample_and_tune_space_cover_the_box():
    space = _space(3)
    s = space.sample(np.random.default_rng(0))
    assert list(s) == space.param_names and all(0 < v <= 1 for v in s.values())
    tune_space = space.tune_param_space()
    assert set(tune_space) == set(space.param_names)


def test_optuna_define_by_run_gives_mixtures():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = _space(4)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        space.optuna_define_by_run(trial)
        assert set(trial.params) == set(space.param_names)
        w = space.weights(trial.params)
        assert abs(w.sum() - 1) <= 1e-9 and np.all(w >= 0)
        study.tell(trial, float(w[0]))


# --- constrained spaces: bounds, repetition caps, fixed coordinates, the collapsed coordinate ---

from search_spaces import CollapsedSpace, ConstrainedSimplex, capped_proportional, repetition_caps  # noqa: E402


@st.composite
def constrained_spaces(draw, k_max=9):
    """Random feasible bound sets: lower sum < 1 < upper sum by construction, some fixed coords."""
    k = draw(st.integers(3, k_max))
    coords = tuple(f"c{i}" for i in range(k))
    lo_share = draw(st.floats(0.0, 0.9))
    lo_raw = draw(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k))
    lo = np.asarray(lo_raw) / max(sum(lo_raw), 1e-12) * lo_share
    room = draw(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k))
    hi = np.minimum(1.0, lo + np.asarray(room) * (1 - lo_share) * draw(st.floats(1.0, 3.0)))
    if hi.sum() < 1.0:  # make it feasible: spread the shortfall over the coordinates with room
        hi = np.minimum(1.0, hi + (1.0 - hi.sum()) / k + 1e-9)
    if hi.sum() < 1.0:
        hi = np.ones(k)
    n_fixed = draw(st.integers(0, k - 2))
    fixed = {}
    for c in coords[:n_fixed]:  # fix at its lower bound: keeps the rest feasible
        fixed[c] = float(lo[coords.index(c)])
    lower = {c: float(x) for c, x in zip(coords, lo) if c not in fixed}
    upper = {c: float(x) for c, x in zip(coords, hi) if c not in fixed}
    try:
        return ConstrainedSimplex(coords, lower=lower, upper=upper, fixed=fixed)
    except ValueError:  # fixing a coordinate at its lower bound can still strand the upper bounds
        from hypothesis import assume
        assume(False)


@settings(max_examples=300, deadline=None)
@given(constrained_spaces(), st.integers(0, 2**32 - 1))
def test_every_constrained_sample_is_on_the_constrained_simplex(space, seed):
    """Bounded sampling without rejection: whatever the box point, the mixture is feasible."""
    rng = np.random.default_rng(seed)
    for _ in range(5):
        w = space.weights(space.sample(rng))
        assert space.contains(w, tol=1e-9), (w, space.bounds())
        for c, x in space.fixed.items():
            assert w[space.coords.index(c)] == pytest.approx(x, abs=1e-12)
        np.testing.assert_allclose(space.weights(space.params(w)), w, atol=1e-6)  # exact inverse


@settings(max_examples=200, deadline=None)
@given(constrained_spaces(), st.lists(u_value, min_size=9, max_size=9))
def test_box_edges_map_inside_too(space, u):
    w = space.weights(dict(zip(space.param_names, u)))
    assert space.contains(w, tol=1e-9)


@settings(max_examples=200, deadline=None)
@given(constrained_spaces(), st.lists(st.floats(-2, 2), min_size=9, max_size=9))
def test_project_lands_on_the_space(space, raw):
    assert space.contains(space.project(np.asarray(raw[: len(space.coords)])), tol=1e-8)


@settings(max_examples=200, deadline=None)
@given(simplex_points(3, 8), st.lists(st.floats(0.05, 1.0), min_size=8, max_size=8))
def test_capped_proportional_respects_caps_and_ratios(v, caps):
    caps = np.asarray(caps[: len(v)])
    if caps.sum() < 1:
        caps = caps / caps.sum()
    w = capped_proportional(v, caps)
    assert abs(w.sum() - 1) < 1e-9 and np.all(w <= caps + 1e-9) and np.all(w >= 0)
    free = w < caps - 1e-9  # unclipped coordinates keep v's ratios
    if free.sum() >= 2 and v[free].sum() > 0:
        np.testing.assert_allclose(w[free] / w[free].sum(), v[free] / v[free].sum(), atol=1e-9)


def test_repetition_caps():
    caps = repetition_caps({"small": 1000, "big": 10**9}, {"small": 4, "big": 1}, tokens_to_train=100_000)
    assert caps == {"small": 0.04, "big": 1.0}
    with pytest.raises(ValueError, match="fix:"):
        repetition_caps({"a": 10}, 0, 100)


def test_infeasible_bounds_say_what_to_fix():
    with pytest.raises(ValueError, match="no mixture fits.*fix:"):
        ConstrainedSimplex(("a", "b", "c"), upper={"a": 0.2, "b": 0.2, "c": 0.2})
    with pytest.raises(ValueError, match="unknown coordinates"):
        ConstrainedSimplex(("a", "b"), lower={"z": 0.1})
    with pytest.raises(ValueError, match="free coordinate"):
        ConstrainedSimplex(("a", "b", "c"), fixed={"a": 0.5, "b": 0.2})


def _optuna_draws(space, n: int):
    """The weights of n trials an Optuna study asks for through the space's define-by-run hook."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n):
        t = study.ask()
        space.optuna_define_by_run(t)
        w = space.weights(t.params)
        yield w
        study.tell(t, float(w[-1]))


def test_constrained_space_maps_to_optuna_and_tune():

    space = ConstrainedSimplex(("a", "b", "c", "d"), lower={"a": 0.3}, upper={"b": 0.1}, fixed={"d": 0.2})
    assert space.param_names == ["u_a", "u_b", "u_c"] and set(space.tune_param_space()) == set(space.param_names)
    assert set(space.optuna_distributions()) == set(space.param_names)
    for w in _optuna_draws(space, 20):
        assert space.contains(w) and w[0] >= 0.3 - 1e-12 and w[1] <= 0.1 + 1e-12 and w[3] == pytest.approx(0.2)


def test_direct_w_outside_bounds_is_rejected():
    space = ConstrainedSimplex(("a", "b", "c"), upper={"a": 0.2})
    with pytest.raises(ValueError, match="outside the bounds"):
        space.weights({"w_a": 0.5, "w_b": 0.25, "w_c": 0.25})


def test_collapsed_space_expands_to_old_times_current_plus_a_within_the_caps():
    current = {"python": 0.5, "bible": 0.3, "fortunes": 0.2, "news": 0.0}  # news is new
    caps = {"news": 0.3, "python": 0.4}
    space = CollapsedSpace(current, ("news", "old", "bible"), caps)  # coordinates in any order
    assert space.coords == ("news", "old", "bible")
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = space.weights(space.sample(rng))
        mix = space.expand(a)
        assert list(mix) == list(current) and sum(mix.values()) == pytest.approx(1)
        assert mix["news"] <= 0.3 + 1e-9 and mix["python"] <= 0.4 + 1e-9
        assert mix["news"] == pytest.approx(a[0]) and mix["python"] == pytest.approx(a[1] * 0.5)
        assert mix["bible"] == pytest.approx(a[1] * 0.3 + a[2])
        assert mix["python"] / mix["fortunes"] == pytest.approx(0.5 / 0.2)  # no coordinate: through old only
    with pytest.raises(ValueError, match="coords include 'old'"):
        CollapsedSpace(current, ("news", "bible"))


# --- polytopes: linear caps on the mixture a_old * p + a (the "old" coordinate couples them) ---

from search_spaces import PolytopeSimplex, cap_constraints  # noqa: E402

_DOMAINS = ("python", "bible", "fortunes", "news", "licenses", "code", "math", "wiki")


@st.composite
def tight_polytopes(draw, n_coords=7):
    """old + 6 searched domains of 8 (2 reached only through old), caps set from a drawn feasible
    point: some exactly binding there (zero margin), so the polytope is thin but never empty."""
    p = np.asarray(draw(st.lists(st.floats(0.01, 1.0), min_size=8, max_size=8)))
    current = dict(zip(_DOMAINS, p / p.sum()))
    coords = ("old", *_DOMAINS[: n_coords - 1])
    a = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).dirichlet(np.ones(n_coords))
    mix = {d: a[0] * current[d] + (a[coords.index(d)] if d in coords else 0.0) for d in _DOMAINS}
    margins = draw(st.lists(st.one_of(st.just(0.0), st.floats(0.0, 0.2)), min_size=8, max_size=8))
    caps = {d: mix[d] + m for d, m in zip(_DOMAINS, margins)}
    return PolytopeSimplex(coords, *cap_constraints(coords, current, caps)), a


@settings(max_examples=150, deadline=None)
@given(tight_polytopes(), st.integers(0, 2**32 - 1))
def test_every_polytope_sample_is_feasible(case, seed):
    space, _ = case
    rng = np.random.default_rng(seed)
    assert space.contains(space.centre, tol=1e-9)
    for _ in range(20):
        w = space.weights(space.sample(rng))
        assert space.contains(w, tol=1e-9), (w, space.A_ub @ w - space.b_ub)
        assert np.all(space.A_ub @ w <= space.b_ub + 1e-9) and np.all(w >= -1e-12)


@settings(max_examples=150, deadline=None)
@given(tight_polytopes(), st.lists(u_value, min_size=7, max_size=7))
def test_polytope_box_edges_map_inside_too(case, u):
    space, _ = case
    assert space.contains(space.weights(dict(zip(space.param_names, u))), tol=1e-9)


@settings(max_examples=150, deadline=None)
@given(tight_polytopes())
def test_polytope_map_is_onto(case):
    """A feasible point, interior or on a binding cap, is the image of its own params."""
    space, a = case
    for w in (a, space.centre, 0.5 * (a + space.centre)):
        assert space.contains(w, tol=1e-9)
        p = space.params(w)
        assert list(p) == space.param_names and all(0 < x <= 1 for x in p.values())
        np.testing.assert_allclose(space.weights(p), w, atol=1e-6)
        np.testing.assert_allclose(space.from_free(w), w, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(tight_polytopes(), st.lists(st.floats(-2, 2), min_size=7, max_size=7))
def test_polytope_project_lands_feasible(case, raw):
    space, a = case
    x = space.project(np.asarray(raw))
    assert space.contains(x, tol=1e-9), (x, space.A_ub @ x - space.b_ub)
    assert np.linalg.norm(x - raw) <= np.linalg.norm(a - raw) + 1e-6  # no farther than a feasible point


def test_polytope_project_is_the_nearest_point():
    """Against brute force: every feasible point of a fine lattice is at least as far as project's."""
    coords = ("old", "python", "fortunes")
    A, b = cap_constraints(coords, {"python": 0.6, "fortunes": 0.4}, {"fortunes": 0.2})
    space = PolytopeSimplex(coords, A, b, upper={"python": 0.7})
    m = 400
    i, j = np.meshgrid(np.arange(m + 1), np.arange(m + 1), indexing="ij")
    keep = i + j <= m
    grid = np.stack([i[keep], j[keep], m - i[keep] - j[keep]], axis=1) / m
    grid = grid[np.all(grid @ A.T <= b + 1e-12, axis=1) & (grid[:, 1] <= 0.7)]
    for w in ([1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.1, 0.9, 0.0], [0.5, 0.5, 0.5], [-1.0, 0.2, 2.0]):
        w = np.asarray(w)
        x = space.project(w)
        assert space.contains(x, tol=1e-9)
        best = np.linalg.norm(grid - w, axis=1).min()
        assert np.linalg.norm(x - w) <= best + 1e-7  # never beaten by a feasible lattice point
        assert np.linalg.norm(x - w) >= best - 2.0 / m  # and the lattice gets within its spacing
    feasible = np.array([0.3, 0.65, 0.05])  # 0.3 * 0.4 + 0.05 <= 0.2
    np.testing.assert_allclose(space.project(feasible), feasible, atol=1e-7)


def test_infeasible_caps_say_what_to_relax():
    coords = ("old", "python", "bible")
    current = {"python": 0.5, "bible": 0.5}
    with pytest.raises(ValueError, match=r"no mixture fits.*fix: relax the tightest repetition cap"):
        PolytopeSimplex(coords, *cap_constraints(coords, current, {"python": 0.3, "bible": 0.3}))
    with pytest.raises(ValueError, match=r"no mixture fits.*fix:"):  # feasible caps, infeasible with a lower bound
        PolytopeSimplex(coords, *cap_constraints(coords, current, {"python": 0.3}), lower={"old": 0.9})
    with pytest.raises(ValueError, match=r"A_ub.*fix:"):
        PolytopeSimplex(coords, np.ones((2, 3)), np.ones(3))
    with pytest.raises(ValueError, match="unknown coordinates"):
        PolytopeSimplex(coords, np.zeros((0, 3)), np.zeros(0), upper={"z": 0.5})


def test_cap_constraints_rows():
    coords = ("old", "python", "fortunes")
    current = {"python": 0.4, "bible": 0.2, "fortunes": 0.4}  # bible is untouched: reached through old only
    A, b = cap_constraints(coords, current, {"python": 1.0, "bible": 0.1, "fortunes": 0.25, "news": 0.05})
    # python's cap >= 1 binds nothing; news has neither weight in old nor a coordinate
    np.testing.assert_allclose(A, [[0.2, 0.0, 0.0], [0.4, 0.0, 1.0]])
    np.testing.assert_allclose(b, [0.1, 0.25])
    A2, _ = cap_constraints(coords, {d: 2 * x for d, x in current.items()}, {"bible": 0.1})  # p is normalised
    np.testing.assert_allclose(A2, [[0.2, 0.0, 0.0]])
    a = np.array([0.5, 0.3, 0.2])
    mix = {d: a[0] * current[d] + (a[coords.index(d)] if d in coords else 0) for d in current}
    np.testing.assert_allclose(A @ a, [mix["bible"], mix["fortunes"]])  # the rows are the mixture's shares
    with pytest.raises(ValueError, match="fix:"):
        cap_constraints(coords, current, {"old": 0.5})
    assert cap_constraints(coords, current, {})[0].shape == (0, 3)


def test_every_space_has_linear_rows_and_polytope_maps_to_optuna():

    for s in (_space(3), ConstrainedSimplex(("a", "b", "c"), upper={"a": 0.5})):
        assert s.A_ub.shape == (0, 3) and s.b_ub.shape == (0,)
    coords = ("old", "python", "bible", "fortunes")
    space = PolytopeSimplex(coords, *cap_constraints(coords, {"python": .5, "bible": .25, "fortunes": .25},
                                                     {"fortunes": 0.1}))
    assert space.A_ub.shape == (1, 4) and set(space.tune_param_space()) == set(space.param_names)
    for w in _optuna_draws(space, 20):
        assert space.contains(w) and 0.25 * w[0] + w[3] <= 0.1 + 1e-12
    with pytest.raises(ValueError, match="break the constraints"):
        space.weights({f"w_{c}": 0.25 for c in coords})


def test_tight_caps_do_not_pull_every_draw_to_one_domain():
    """With one cap nearly spent (a 1.4% share left for licenses, 12.8% for fortunes), draws still
    spread over the uncapped domains: none gets more than half the weight on average, and each of
    them leads in some draws (pulling infeasible draws towards one interior point put 92% on one)."""
    from search_spaces import CollapsedSpace
    current = {"python": .2, "bible_ot": .2, "dictionary": .2, "fortunes": .2, "licenses": .2}
    caps = {"fortunes": 0.128, "licenses": 0.014}
    space = CollapsedSpace(current, ("old", *current), caps)
    rng = np.random.default_rng(0)
    E = np.array([list(space.expand(space.weights(space.sample(rng))).values()) for _ in range(400)])
    assert np.all(E[:, 3] <= 0.128 + 1e-9) and np.all(E[:, 4] <= 0.014 + 1e-9)
    free = E[:, :3]
    assert free.mean(axis=0).max() < 0.5
    assert set(np.argmax(free, axis=1)) == {0, 1, 2}
    assert all(free[:, j].max() > 0.6 for j in range(3))
