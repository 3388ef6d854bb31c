"""The Mixture type: validation, constructors, compatibility, and OP-Mix's collapse/expand."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opmix_ray.mixture import Mixture, MixtureError, content_hash, expand_collapsed

D3 = ("a", "b", "c")


@pytest.mark.parametrize("domains, weights", [
    (D3, (0.5, 0.6, -0.1)),            # negative
    (D3, (0.5, math.nan, 0.5)),        # NaN
    (D3, (math.inf, 0.0, 0.0)),        # inf
    (D3, (0.2, 0.2, 0.2)),             # sums to 0.6
    (D3, (0.5, 0.5, 0.1)),             # sums to 1.1
    (("a", "b", "a"), (0.2, 0.3, 0.5)),  # duplicate domain
    (D3, (0.5, 0.5)),                  # length mismatch
    (("a", "b"), (0.2, 0.3, 0.5)),     # length mismatch
])
def test_invalid_mixtures_raise_with_fix(domains, weights):
    with pytest.raises(MixtureError, match="fix:"):
        Mixture(domains, weights)


def test_valid_mixture_and_accessors():
    m = Mixture(D3, (0.5, 0.3, 0.2), data_hash="h")
    assert m.as_dict() == {"a": 0.5, "b": 0.3, "c": 0.2}
    np.testing.assert_array_equal(m.as_array(), [0.5, 0.3, 0.2])
    assert str(m) == "a=0.500 b=0.300 c=0.200"
    assert m == Mixture(D3, (0.5, 0.3, 0.2), data_hash="other")  # hash is not part of equality
    Mixture(D3, (1.0, 0.0, 0.0))  # zeros are fine
    Mixture(D3, (0.5, 0.3, 0.2 + 5e-7))  # within the 1e-6 tolerance


def test_normalised():
    m = Mixture.normalised(D3, [2, 1, 1], data_hash="h")
    assert m.weights == (0.5, 0.25, 0.25) and m.data_hash == "h"
    assert Mixture.uniform(D3).weights == pytest.approx((1 / 3,) * 3, abs=1e-15)
    for bad in ([0, 0, 0], [1, -1, 1], [1, math.nan, 1], [1, math.inf, 1], [1, 1]):
        with pytest.raises(MixtureError, match="fix:"):
            Mixture.normalised(D3, bad)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e6)), min_size=2, max_size=10)
       .filter(lambda w: sum(w) > 0))
def test_normalised_property(raw):
    doms = tuple(f"d{i}" for i in range(len(raw)))
    m = Mixture.normalised(doms, raw)
    w = m.as_array()
    assert abs(w.sum() - 1.0) <= 1e-12 and np.all(w >= 0)
    np.testing.assert_allclose(w, np.asarray(raw) / sum(raw), atol=1e-12)
    assert all((x == 0) == (r == 0) for x, r in zip(w, raw))  # a zero weight stays exactly zero


def test_normalised_keeps_zero_last_weight_exactly_zero():
    # normalised used to put the rounding error on the last weight: 2.2e-16 here, drawable by the sampler
    m = Mixture.normalised(("a", "b", "c", "d"), [0.51, 0.95, 0.14, 0.0])
    assert m.weights[-1] == 0.0


def test_natural_is_token_proportional():
    counts = {"a": 1000, "b": 3000, "c": 6000, "unused": 99}
    m = Mixture.natural(counts, D3)
    assert m.domains == D3
    assert m.weights == pytest.approx((0.1, 0.3, 0.6), abs=1e-15)
    with pytest.raises(KeyError):
        Mixture.natural(counts, ("a", "zzz"))


def test_from_dict():
    m = Mixture.from_dict({"b": 0.25, "a": 0.75})
    assert m.domains == ("b", "a")  # dict order when no domains given
    m = Mixture.from_dict({"b": 0.25, "a": 0.75, "c": 0.0}, domains=D3, data_hash="h")
    assert m.domains == D3 and m.weights == (0.75, 0.25, 0.0) and m.data_hash == "h"
    with pytest.raises(MixtureError, match=r"missing \['c'\].*fix:"):
        Mixture.from_dict({"a": 0.5, "b": 0.5}, domains=D3)
    with pytest.raises(MixtureError, match=r"unknown \['z'\].*fix:"):
        Mixture.from_dict({"a": 0.5, "b": 0.5, "c": 0.0, "z": 0.0}, domains=D3)
    with pytest.raises(MixtureError, match="fix:"):
        Mixture.from_dict({"a": 0.5, "b": 0.6, "c": 0.0}, domains=D3)


def test_check_compatible():
    m = Mixture(D3, (0.5, 0.3, 0.2), data_hash="abc")
    m.check_compatible(D3, "abc")
    m.check_compatible(list(D3))
    m.check_compatible(D3, "")  # unknown run hash: domain check only
    Mixture(D3, (0.5, 0.3, 0.2)).check_compatible(D3, "xyz")  # mixture without a hash
    with pytest.raises(MixtureError, match="domain order.*fix:|fix:.*domain order"):
        m.check_compatible(("b", "a", "c"), "abc")
    with pytest.raises(MixtureError, match="fix:"):
        m.check_compatible(("a", "b"), "abc")
    with pytest.raises(MixtureError, match="hash.*fix:"):
        m.check_compatible(D3, "abd")


def test_expand_collapsed_by_hand():
    p = Mixture(D3, (0.5, 0.25, 0.25), data_hash="h")
    coords = ("old", *D3)
    e = expand_collapsed(coords, [0.4, 0.3, 0.2, 0.1], p)
    # E = 0.4 * (0.5, 0.25, 0.25) + (0.3, 0.2, 0.1) = (0.5, 0.3, 0.2)
    assert e.domains == D3 and e.data_hash == "h"
    assert e.weights == pytest.approx((0.5, 0.3, 0.2), abs=1e-12)
    assert expand_collapsed(coords, [1.0, 0, 0, 0], p).weights == pytest.approx(p.weights, abs=1e-15)
    assert expand_collapsed(coords, [0.0, 0, 1, 0], p).weights == (0.0, 1.0, 0.0)
    # coordinates in any order, a domain without one is reached only through old
    e = expand_collapsed((D3[2], "old"), [0.5, 0.5], p)
    assert e.weights == pytest.approx((0.25, 0.125, 0.625), abs=1e-12)
    with pytest.raises(MixtureError, match="not domains of the current mixture"):
        expand_collapsed(("old", "nope"), [0.5, 0.5], p)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 8).flatmap(lambda k: st.tuples(
    st.lists(st.floats(0, 1), min_size=k + 1, max_size=k + 1).filter(lambda a: sum(a) > 1e-3),
    st.lists(st.floats(0, 1), min_size=k, max_size=k).filter(lambda p: sum(p) > 1e-3))))
def test_expand_collapsed_property(args):
    a, p_raw = args
    a = np.asarray(a) / sum(a)  # a candidate on the {old, d_1..d_k} simplex
    doms = tuple(f"d{i}" for i in range(len(p_raw)))
    p = Mixture.normalised(doms, p_raw)
    e = expand_collapsed(("old", *doms), a, p).as_array()
    assert abs(e.sum() - 1.0) <= 1e-9 and np.all(e >= 0)
    np.testing.assert_allclose(e, a[0] * p.as_array() + a[1:], atol=1e-9)


def test_content_hash():
    h = content_hash("a", b"b", 3)
    assert h == content_hash("a", b"b", 3) and len(h) == 64
    assert h != content_hash("a", b"b", 4)
    assert content_hash("ab", "c") != content_hash("a", "bc")  # parts are delimited


def test_over_reindexes_with_zero_for_a_missing_domain_and_never_drops_weight():
    m = Mixture(("a", "b"), (0.25, 0.75), data_hash="h")
    o = m.over(("c", "b", "a"))  # a domain removed live stays in the sampler at weight 0
    assert o.domains == ("c", "b", "a") and o.weights == (0.0, 0.75, 0.25) and o.data_hash == "h"
    assert Mixture(("a", "b"), (1.0, 0.0)).over(("a",)).weights == (1.0,)
    with pytest.raises(MixtureError, match="fix:"):
        m.over(("a",))
