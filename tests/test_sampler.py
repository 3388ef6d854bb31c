"""MixtureSampler on synthetic token streams of very different sizes: real draws follow the weights,
caps hold, windows are real slices, and runs are reproducible.

Tolerance used throughout: the sampler picks the domain with the largest token deficit, so after
T drawn tokens every domain d has drawn w_d * T tokens to within a window or so (exhaustive
simulation of the rule shows <= 1.09 windows for k <= 12). Tests assert
|drawn_d - w_d * T| <= TOL_WINDOWS * seq_len, i.e. |frac_d - w_d| <= TOL_WINDOWS * seq_len / T.
"""
import numpy as np
import pytest

from opmix_ray.data.sampler import MixtureSampler
from opmix_ray.mixture import Mixture, MixtureError

L = 16
TOL_WINDOWS = 2
DOMS = ("big", "mid", "small", "tiny")
# Token value = domain offset + position, so every row tells which domain and start it came from.
OFFSET = {"big": 0, "mid": 1_000_000, "small": 2_000_000, "tiny": 3_000_000}
SIZE = {"big": 200_000, "mid": 20_000, "small": 2_000, "tiny": 300}


def _train(sizes=SIZE):
    return {d: OFFSET[d] + np.arange(n, dtype=np.int64) for d, n in sizes.items()}


def _check_tracking(sampler, weights, domains=DOMS):
    seg = np.array([sampler.drawn_segment[d] for d in domains], dtype=float)
    T = seg.sum()
    assert np.all(np.abs(seg - np.asarray(weights) * T) <= TOL_WINDOWS * L), (seg / L, np.asarray(weights) * T / L)
    frac = sampler.segment_fractions()
    for d, w in zip(domains, weights):
        assert abs(frac[d] - w) <= TOL_WINDOWS * L / T


def _draw(sampler, n_batches, batch_size, weights=None):
    counts = np.zeros(len(sampler.domains), dtype=int)
    for _ in range(n_batches):
        x, which = sampler.next_batch(batch_size)
        assert x.shape == (batch_size, L + 1) and x.dtype == np.int64 and which.shape == (batch_size,)
        counts += np.bincount(which, minlength=len(sampler.domains))
        if weights is not None:
            _check_tracking(sampler, weights)
    return counts


def test_draws_follow_weights_every_batch():
    w = (0.1, 0.2, 0.3, 0.4)  # the smallest domains get the largest weights
    s = MixtureSampler(_train(), Mixture(DOMS, w), L, seed=0)
    counts = _draw(s, 100, 7, weights=w)  # checked after every batch, from the first one on
    # counting the returned domain indices gives the same totals as the sampler's own counters
    assert [c * L for c in counts] == [s.drawn_segment[d] for d in DOMS]
    assert np.all(np.abs(counts / counts.sum() - w) <= TOL_WINDOWS / counts.sum())
    # tiny (300 tokens) was drawn ~0.4 * 700 * 16 tokens: many epochs, and counted as such
    assert s.epochs()["tiny"] == pytest.approx(counts[3] * L / 300)


def test_every_domain_with_weight_at_least_one_over_batch_in_every_batch():
    w = (0.25, 0.25, 0.25, 0.25)
    s = MixtureSampler(_train(), Mixture(DOMS, w), L, seed=1)
    for _ in range(20):
        _, which = s.next_batch(8)
        assert np.all(np.bincount(which, minlength=4) >= 1)


def test_zero_weight_domains_never_drawn():
    w = (0.0, 0.7, 0.0, 0.3)
    s = MixtureSampler(_train(), Mixture(DOMS, w), L, seed=0)
    counts = _draw(s, 50, 8, weights=w)
    assert counts[0] == 0 and counts[2] == 0
    assert s.drawn_segment["big"] == 0 and s.drawn_segment["small"] == 0


def test_rows_are_real_slices_of_their_domain():
    s = MixtureSampler(_train(), Mixture.uniform(DOMS), L, seed=3)
    for _ in range(30):
        x, which = s.next_batch(8)
        for row, i in zip(x, which):
            d = DOMS[i]
            start = int(row[0]) - OFFSET[d]
            assert 0 <= start and start + L + 1 <= SIZE[d]
            np.testing.assert_array_equal(row, _train()[d][start : start + L + 1])


def test_windows_within_an_epoch_are_distinct_and_aligned():
    s = MixtureSampler(_train(), Mixture(DOMS, (0, 0, 1.0, 0)), L, seed=4)
    stream = s.streams["small"]
    n_win = len(stream.starts)
    assert n_win >= (2000 - 1 - L) // L
    x, _ = s.next_batch(n_win)
    starts = x[:, 0] - OFFSET["small"]
    assert len(set(starts.tolist())) == n_win  # no window repeats inside one epoch
    assert len(set((starts % L).tolist())) == 1  # one shift per epoch, windows tile the stream
    assert stream.epoch == 0
    s.next_batch(1)
    assert stream.epoch == 1


def test_set_mixture_resets_segment_and_follows_new_weights():
    s = MixtureSampler(_train(), Mixture(DOMS, (0.7, 0.1, 0.1, 0.1)), L, seed=0)
    _draw(s, 20, 8)
    total_before = dict(s.drawn_total)
    new = (0.05, 0.15, 0.2, 0.6)
    s.set_mixture(Mixture(DOMS, new))
    assert all(v == 0 for v in s.drawn_segment.values())
    assert s.segment_fractions() == {d: 0.0 for d in DOMS}
    counts = _draw(s, 40, 8, weights=new)  # tracks the new weights from the first batch on
    assert s.drawn_total == {d: total_before[d] + c * L for d, c in zip(DOMS, counts)}
    with pytest.raises(MixtureError, match="fix:"):
        s.set_mixture(Mixture(("mid", "big", "small", "tiny"), new))


def test_repetition_cap_holds_and_share_goes_to_others_proportionally():
    w = np.array([0.3, 0.2, 0.1, 0.4])
    cap = {"tiny": SIZE["tiny"] * 1.0}  # one epoch of tiny
    s = MixtureSampler(_train(), Mixture(DOMS, tuple(w)), L, cap_tokens=cap, seed=0)
    capped_at = None
    for b in range(60):
        _, which = s.next_batch(8)
        assert s.drawn_total["tiny"] <= cap["tiny"]
        if capped_at is None and s.drawn_total["tiny"] + L > cap["tiny"]:
            capped_at = b
    assert capped_at is not None and capped_at < 10  # 18 windows at weight 0.4, 8 per batch
    assert s.drawn_total["tiny"] == (300 // L) * L  # drawn right up to its cap, never past it
    assert s.epochs()["tiny"] <= 1.0
    # after the cap, the other three track their renormalised weights among themselves
    others = DOMS[:3]
    w_other = w[:3] / w[:3].sum()
    seg = np.array([s.drawn_segment[d] for d in others], dtype=float)
    assert np.all(np.abs(seg - w_other * seg.sum()) <= TOL_WINDOWS * L), (seg / L, w_other * seg.sum() / L)
    # and the last batches hold no tiny at all
    _, which = s.next_batch(32)
    assert 3 not in which.tolist()


def test_all_weighted_domains_capped_raises_with_fix():
    w = (0.0, 0.0, 0.5, 0.5)
    s = MixtureSampler(_train(), Mixture(DOMS, w), L, cap_tokens={"small": 2 * L, "tiny": 2 * L}, seed=0)
    s.next_batch(4)
    with pytest.raises(RuntimeError, match="fix:"):
        s.next_batch(1)
    assert s.drawn_segment["big"] == 0 and s.drawn_segment["mid"] == 0  # zero weights stay zero


def test_same_seed_same_draws_other_seed_differs():
    def run(seed):
        s = MixtureSampler(_train(), Mixture(DOMS, (0.4, 0.3, 0.2, 0.1)), L, seed=seed)
        return [s.next_batch(8) for _ in range(10)]

    a, b, c = run(7), run(7), run(8)
    for (xa, wa), (xb, wb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(wa, wb)
    assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_too_short_domain_raises_with_fix():
    sizes = dict(SIZE, tiny=L + 1)
    with pytest.raises(ValueError, match="fix:"):
        MixtureSampler(_train(sizes), Mixture.uniform(DOMS), L)


def test_pushing_the_same_mixture_changes_no_draw():
    """A round that stays pushes the weights the sampler already has: the draws go on exactly as
    on a fixed mixture (a reset of the segment counters would reorder them)."""
    w = Mixture(DOMS, (0.4, 0.3, 0.2, 0.1))
    fixed, stays = MixtureSampler(_train(), w, L, seed=3), MixtureSampler(_train(), w, L, seed=3)
    for i in range(30):
        if i % 7 == 0:
            stays.set_mixture(Mixture(DOMS, (0.4, 0.3, 0.2, 0.1)))
        np.testing.assert_array_equal(fixed.next_batch(5)[0], stays.next_batch(5)[0])
    assert fixed.drawn_segment == stays.drawn_segment
