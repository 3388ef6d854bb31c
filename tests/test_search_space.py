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
