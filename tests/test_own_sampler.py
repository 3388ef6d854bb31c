"""OpMixSampler and OpMixLoop, the pieces of OP-Mix for a trainer of your own that need no Ray
(opmix_ray/own_trainer/, docs/own_trainer.md): the sampler follows the weights, lands a push at the
first step not drawn, keeps the caps, resumes exactly from state_dict() (also from a step a loader
drew ahead of), draws what MixtureSampler draws, and serves map-style datasets; the loop applies a
background round at the step it is seen in and sends it again after a resume. Seconds, no Ray.
"""
import json

import numpy as np
import pytest
import torch

from opmix_ray import OpMixLoop, OpMixSampler
from opmix_ray.data.sampler import MixtureSampler
from opmix_ray.mixture import Mixture

L = 16
DOMS = ("a", "b", "c")


def _train():
    return {d: 10_000 * i + np.arange(3000 + 500 * i, dtype=np.int64) for i, d in enumerate(DOMS)}


# --- the sampler, no Ray ---

def test_draws_follow_the_weights_and_a_push_lands_at_the_first_step_not_drawn():
    s = OpMixSampler(_train(), Mixture(DOMS, (0.5, 0.3, 0.2)), L, rows_per_step=10, seed=0)
    for _ in range(3):
        s.next_batch(10)
    assert s.next_step == 3
    new = Mixture(DOMS, (0.1, 0.1, 0.8))
    assert s.push(new, key="r0") == 3 and s.mixture == new  # nothing of step 3 drawn: it applies now
    s.push(new, key="r0")  # a key already pushed is not pushed again
    assert len(s.pushes) == 1
    counts = np.bincount(np.concatenate([s.next_batch(10)[1] for _ in range(4)]), minlength=3)
    assert np.all(np.abs(counts / 40 - (0.1, 0.1, 0.8)) <= 2 / 40)
    # a loader that drew 4 rows of step 7 ahead: the push waits for step 8
    rows = iter(s)
    for _ in range(4):
        next(rows)
    other = Mixture(DOMS, (0.6, 0.2, 0.2))
    assert s.push(other, key="r1") == 8 and s.mixture == new
    for _ in range(6):
        next(rows)
    assert s.mixture == new
    next(rows)  # the first row of step 8
    assert s.mixture == other
    with pytest.raises(ValueError, match="after that step's rows were drawn"):
        s.push(other, at_step=8)


def test_it_draws_what_the_main_runs_mixture_sampler_draws():
    a = OpMixSampler(_train(), Mixture(DOMS, (0.5, 0.3, 0.2)), L, rows_per_step=8, seed=3)
    b = MixtureSampler(_train(), Mixture(DOMS, (0.5, 0.3, 0.2)), L, seed=3)
    new = Mixture(DOMS, (0.2, 0.2, 0.6))
    for step in range(10):
        if step == 4:
            a.push(new)
            b.set_mixture(new)
        assert np.array_equal(a.next_batch(8)[0], b.next_batch(8)[0])


def test_state_dict_is_json_and_resumes_the_same_rows_also_from_a_step_drawn_ahead():
    s = OpMixSampler(_train(), Mixture(DOMS, (0.5, 0.3, 0.2)), L, rows_per_step=8, seed=1)
    rows = iter(s)
    for _ in range(5 * 8 + 3):  # steps 0-4, and 3 rows of step 5 drawn ahead
        next(rows)
    s.push(Mixture(DOMS, (0.2, 0.2, 0.6)), key=0)  # lands at step 6
    at_5 = json.loads(json.dumps(s.state_dict(step=5)))
    now = json.loads(json.dumps(s.state_dict()))
    want = [next(rows)["input_ids"] for _ in range(5 + 3 * 8)]  # the rest of step 5, then steps 6-8
    fresh = OpMixSampler(_train(), Mixture(DOMS, (1 / 3, 1 / 3, 1 / 3)), L, seed=99)
    fresh.load_state_dict(now)
    got = [next(iter(fresh))["input_ids"] for _ in range(len(want))]
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    # from step 5's start: step 5's three rows again, then the same rows; the push came after step 5
    # began, so it is sent again at its step (OpMixLoop keeps the decisions for that)
    fresh.load_state_dict(at_5)
    assert fresh.push(Mixture(DOMS, (0.2, 0.2, 0.6)), key=0, at_step=6) == 6
    it = iter(fresh)
    [next(it) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip([next(it)["input_ids"] for _ in range(len(want))], want))
    assert fresh.mixture.as_dict()["c"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="no state kept for step 0"):
        fresh.state_dict(step=0)


def test_repetition_caps_hold_and_map_style_datasets_draw_examples():
    caps = {"a": np.inf, "b": np.inf, "c": 2 * L}  # c may give two windows, then its share goes to the others
    s = OpMixSampler(_train(), Mixture(DOMS, (0.2, 0.2, 0.6)), L, caps, rows_per_step=10)
    which = np.concatenate([s.next_batch(10)[1] for _ in range(5)])
    assert (which == 2).sum() == 2
    data = {"x": [f"x{i}" for i in range(7)], "y": [f"y{i}" for i in range(50)]}
    e = OpMixSampler.from_datasets(data, Mixture(("x", "y"), (0.5, 0.5)), {"x": 2.0}, seed=0, rows_per_step=4)
    got, which = e.next_batch(4 * 10)
    assert sum(g.startswith("x") for g in got) == 14 and all(g in data["x"] + data["y"] for g in got)  # 7 x 2 epochs
    state = json.loads(json.dumps(e.state_dict()))
    more = e.next_batch(8)[0]
    e2 = OpMixSampler.from_datasets(data, Mixture(("x", "y"), (0.5, 0.5)), {"x": 2.0}, seed=5)
    e2.load_state_dict(state)
    assert e2.next_batch(8)[0] == more


class _Round:
    """A round that is in after `polls` polls: a stand-in for the round runner, to test the loop's
    own rule for background rounds (the rounds themselves are real in the tests below)."""

    def __init__(self, request, polls):
        self.request, self.round, self.polls = request, request["round"], polls

    def ready(self):
        self.polls -= 1
        return self.polls < 0

    def result(self):
        from opmix_ray.own_trainer.client import BoundaryDecision
        return BoundaryDecision(self.round, self.request["step"], True, Mixture(DOMS, (0.1, 0.1, 0.8)), "in")


class _FakeOpMix:
    """The surface of OpMix that OpMixLoop uses, over the synthetic domains."""

    def __init__(self):
        from types import SimpleNamespace
        self.cfg = SimpleNamespace(rounds=SimpleNamespace(mode="async"))
        self.batch_size, self.boundaries, self.submitted, self.applied = 8, [3], [], []

    def check_sampler(self, sampler): ...

    def request(self, model, step, sampler, lr=None):
        return {"round": self.boundaries.index(step), "step": step}

    def submit(self, request):
        self.submitted.append(request)
        return _Round(request, polls=2)

    def note_applied(self, k, step):
        self.applied.append((k, step))


def test_a_background_round_applies_at_the_step_it_is_seen_in_and_a_resume_sends_it_again():
    fake = _FakeOpMix()
    sampler = OpMixSampler(_train(), Mixture(DOMS, (1 / 3, 1 / 3, 1 / 3)), L, rows_per_step=8)
    loop = OpMixLoop(fake, sampler, rank=0, world=1, say=None)
    saved = None
    for step in range(8):
        got = loop.before_step(step, model=None)
        if step == 4:
            saved = json.loads(json.dumps(loop.state_dict()))  # the round is still out
        sampler.next_batch(8)
        if got:
            assert step == 6 and got[0].round == 0  # started at 3, seen in at the third poll after
    assert fake.applied == [(0, 6)] and loop.decided[0]["at_step"] == 6
    again = _FakeOpMix()
    fresh = OpMixLoop(again, OpMixSampler(_train(), Mixture(DOMS, (1 / 3, 1 / 3, 1 / 3)), L), rank=0, world=1, say=None)
    fresh.load_state_dict(saved)
    assert again.submitted == [{"round": 0, "step": 3}] and 0 in fresh.pending  # sent again, as it was asked
