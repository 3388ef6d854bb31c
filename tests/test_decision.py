"""The safe decision rule: stay is always scored, a move within the noise is never pushed, and the
truth the fidelity instrument uses is the main run's own continuation."""
import json
import os

import numpy as np
import pytest
import ray

from opmix_ray.config import load_config
from opmix_ray.engine.rule import adapter_noise_var, difference_var_factor, matched_stay, paired_se, safe_rule
from opmix_ray.engine.candidates import Candidates
from opmix_ray.engine.decision import decide
from opmix_ray.engine.search import SearchOutcome
from opmix_ray.mixture import Mixture

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "opmix_ray", "configs")
W = {"a": 1.0, "b": 1.0}


def _windows(rng, n=32, shift=0.0):
    base = {d: 5.0 + rng.normal(0, 0.3, n) for d in W}
    return base, {d: v + shift + rng.normal(0, 0.01, n) for d, v in base.items()}


def test_within_noise_is_no_move_and_a_clear_gain_is_a_move():
    rng = np.random.default_rng(0)
    stay, leader = _windows(rng, shift=-0.001)  # a lead of 0.001 against per-window noise 0.01
    moved, reason, fig = safe_rule(stay, leader, W, {"old": 0.2, "a": 0.8}, k=2.0, noise_var=None)
    assert not moved and "keeping the current mixture" in reason and fig["se"] > 0
    stay, leader = _windows(rng, shift=-0.05)
    moved, reason, fig = safe_rule(stay, leader, W, {"old": 0.2, "a": 0.8}, k=2.0, noise_var=None)
    assert moved and fig["stay_objective"] - fig["leader_objective"] == pytest.approx(0.05, abs=0.01)
    # the same clear eval gain is not enough once the adapters disagree by more than it
    moved, _, fig = safe_rule(stay, leader, W, {"old": 0.2, "a": 0.8}, k=2.0, noise_var=0.05**2)
    assert not moved and fig["se_adapter"] > fig["se_eval"]


def test_noise_terms():
    assert difference_var_factor({"old": 1.0, "a": 0.0}) == 0.0  # stay against itself
    assert difference_var_factor({"old": 0.0, "a": 1.0}) == pytest.approx(2.0)  # two independent adapters
    assert adapter_noise_var({"a": 1.0, "b": 2.0}, {"a": 1.1, "b": 2.0}, W) == pytest.approx(0.01 / 4)
    p = {"a": 0.25, "b": 0.75}
    s = matched_stay({"old": 0.4, "a": 0.5, "b": 0.1}, p)
    assert s["old"] == pytest.approx(0.4) and sum(s.values()) == pytest.approx(1.0)
    assert s["old"] * 0.25 + s["a"] == pytest.approx(0.25)  # it stands for the current mixture
    assert difference_var_factor({"old": 0.4, "a": 0.15, "b": 0.45}, s) == pytest.approx(0.0)
    same = {d: np.ones(8) for d in W}
    assert paired_se(same, same, W) == 0.0


def _synthetic_candidates(scale: float) -> Candidates:
    """A real tiny Llama with random LoRA-shaped deltas of size `scale` on every attention projection."""
    import torch

    from opmix_ray.config import ModelSection
    from opmix_ray.model import build_model
    model = build_model(ModelSection(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), 64, 16, seed=0)
    rng = np.random.default_rng(1)
    coords, extra = ("old", "a", "b"), ("old#2",)
    stacked = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith("proj"):
            stacked[name] = (scale * rng.normal(size=(4, *mod.weight.shape))).astype(np.float32)
    val = {d: rng.integers(0, 64, size=(16, 17)) for d in ("a", "b")}
    current = Mixture.from_dict({"a": 0.5, "b": 0.5})
    from search_spaces import SimplexSpace
    return Candidates(f"synthetic/{scale}", coords, model.config.to_dict(),
                      {k: v.detach().numpy() for k, v in model.state_dict().items()}, stacked, val, current,
                      dict(W), None, SimplexSpace(coords), extra)


def _outcome(c: Candidates) -> SearchOutcome:
    # the search's best trial is far from stay and claims a lead: only the rescoring can tell
    trials = [{"objective": 4.0, "a_old": 0.1, "a_a": 0.8, "a_b": 0.1, "mix_a": 0.85, "mix_b": 0.15},
              {"objective": 4.1, "a_old": 1.0, "a_a": 0.0, "a_b": 0.0, "mix_a": 0.5, "mix_b": 0.5}]
    return SearchOutcome(c.current, {}, 4.0, {}, 2, 0, 0.0, trials)


def test_a_round_whose_candidates_are_all_within_noise_ends_in_no_move():
    cfg = load_config({"search": {"searcher": "random"}})
    c = _synthetic_candidates(1e-7)  # every merged model is the base model, up to rounding
    d = decide(cfg, c, _outcome(c), 0)
    assert d.rule == "safe" and not d.moved and "keeping the current mixture" in d.reason
    assert d.stay_objective is not None and d.leader_objective is not None and d.se_adapter is not None
    assert abs(d.stay_objective - d.leader_objective) <= cfg.decision.k * d.se + 1e-12
    assert d.leader_mixture == pytest.approx({"a": 0.85, "b": 0.15})
    argmin = decide(load_config({"decision": {"rule": "argmin"}}), c, _outcome(c), 0)
    assert argmin.moved and argmin.stay_objective is None  # the old behaviour: the best trial, however small its lead


def test_a_round_that_stays_where_new_data_arrived_pushes_the_new_data_at_its_prior_share():
    cfg = load_config({"search": {"searcher": "random"}})
    c = _synthetic_candidates(1e-7)
    c.current, c.stay = Mixture.from_dict({"a": 1.0, "b": 0.0}), {"a": 0.5, "b": 0.5}  # b just arrived
    d = decide(cfg, c, _outcome(c), 0)
    assert not d.moved and "keeping the new data at its prior share" in d.reason
    assert d.stay_mixture == pytest.approx({"a": 0.5, "b": 0.5})  # what the round pushes: b is drawn


def test_a_round_that_stays_within_caps_pushes_the_current_mixture_held_to_the_caps_left():
    cfg = load_config({"search": {"searcher": "random"}})
    assert cfg.decision.stay_within_caps  # the default
    c = _synthetic_candidates(1e-7)
    c.caps_share = {"a": 0.2}  # a's cap allows a fifth of the rest of the run; the current mixture draws half
    d = decide(cfg, c, _outcome(c), 0)
    assert not d.moved and "within its caps" in d.reason
    assert d.stay_mixture == pytest.approx({"a": 0.2, "b": 0.8})
    plain = decide(load_config({"search": {"searcher": "random"}, "decision": {"stay_within_caps": False}}),
                   c, _outcome(c), 0)
    assert not plain.moved and plain.stay_mixture is None  # a plain stay pushes nothing


def test_trust_region_keeps_far_candidates_from_leading():
    cfg = load_config({"search": {"searcher": "random"}, "decision": {"max_l1_step": 0.1, "rule": "argmin"}})
    c = _synthetic_candidates(1e-7)
    d = decide(cfg, c, _outcome(c), 0)
    assert d.leader_weights == {"old": 1.0, "a": 0.0, "b": 0.0}  # only the trial at the current mixture is in reach


@pytest.fixture(scope="module")
def stay_run(one_round_run):
    """conftest's one-round run (a binding cap, a round that always stays), with Ray up for the tests
    that start work on it."""
    from opmix_ray.ray_init import init_ray
    cfg, summary = one_round_run
    init_ray(cfg)
    yield cfg, summary
    ray.shutdown()


@pytest.mark.slow  # the default suite: the same decision on synthetic candidates (test_a_round_that_stays_within...)
def test_a_stay_within_caps_pushes_the_current_mixture_held_to_the_caps_left(tmp_path):
    """The default safe rule with a binding cap: the round keeps the mixture, and what it pushes is
    the current one with licenses at the share its cap allows for the rest of the run."""
    from opmix_ray.engine.rule import reference_mixture
    from opmix_ray.engine.driver import run
    cfg = load_config(os.path.join(CONFIGS, "tiny.yaml"),
                      {"run": {"storage_path": str(tmp_path), "name": "within"}, "rounds": {"num_rounds": 1},
                       "data": {"max_epochs": {"licenses": 0.05}},
                       "search": {"num_samples": 3, "searcher": "random"}, "decision": {"k": 1e9}})
    assert cfg.decision.stay_within_caps  # the default
    summary = run(cfg)
    ray.shutdown()
    with open(os.path.join(summary["run_dir"], "history.json")) as f:
        r = json.load(f)["rounds"][0]
    d, caps = r["decision"], r["cap_shares"]
    assert d["moved"] is False and "within its caps" in d["reason"]
    assert caps["licenses"] < r["mixture_before"]["licenses"]  # the cap binds
    assert r["weights"] == pytest.approx(reference_mixture(r["mixture_before"], caps), abs=1e-9)
    assert r["weights"]["licenses"] == pytest.approx(caps["licenses"], abs=1e-9)


def test_stay_is_scored_recorded_and_pushed(stay_run):
    cfg, summary = stay_run
    with open(os.path.join(summary["run_dir"], "history.json")) as f:
        r = json.load(f)["rounds"][0]
    d = r["decision"]
    assert d["rule"] == "safe" and d["moved"] is False and d["stay_objective"] is not None
    assert d["se"] > 0 and d["se_adapter"] is not None and "keeping the current mixture" in d["reason"]
    # stay was uniform, which over-draws licenses: the search space holds the cap share left, and the
    # stay itself changes nothing (the sampler enforces the cap as in the fixed-mixture run)
    caps = r["cap_shares"]
    assert caps["licenses"] < r["mixture_before"]["licenses"] and r["search_space"] == "CollapsedSpace"
    assert r["weights"] == r["mixture_before"]
    import pyarrow.parquet as pq
    for t in pq.read_table(os.path.join(summary["run_dir"], "rounds", "round_0_trials.parquet")).to_pylist():
        assert t["mix_licenses"] <= caps["licenses"] + 1e-6  # every candidate the searcher proposed, too


def test_stay_truth_equals_the_main_runs_own_continuation(stay_run):
    """The fidelity truth for a = stay (the current mixture, unchanged, as the run kept it), run
    from the round's checkpoint, is the loss the main run itself reached at the end (optimizer,
    schedule, sampler and caps all carried)."""
    from opmix_ray.data.read import build_shards
    from opmix_ray.engine.continuation import continue_main_run
    from opmix_ray.engine.main_run import checkpoint_path, steps_and_boundaries
    cfg, summary = stay_run
    with open(os.path.join(summary["run_dir"], "history.json")) as f:
        h = json.load(f)
    total, bounds = steps_and_boundaries(cfg)
    truth = continue_main_run(cfg, build_shards(cfg), checkpoint_path(summary["run_dir"], 0),
                              h["rounds"][0]["weights"], total - bounds[0], threads=int(cfg.main.cpus_per_worker))
    for d, v in h["final"]["val_loss"].items():
        assert truth["val_loss"][d] == pytest.approx(v, abs=1e-5), d
    other = continue_main_run(cfg, build_shards(cfg), checkpoint_path(summary["run_dir"], 0),
                              h["rounds"][0]["weights"], total - bounds[0], truth_seed=1, threads=1)
    assert other["val_loss"] != truth["val_loss"]  # a second truth seed is another data order


@pytest.mark.slow  # ~40 s: the default suite keeps the stay's truth above
def test_fidelity_instrument_scores_stay_and_its_truth_is_the_run_itself(stay_run):
    from opmix_ray.experiments.fidelity import run_fidelity
    cfg, summary = stay_run
    res = run_fidelity(summary["run_dir"], 0, n=3, truth_seeds=2)
    labels = [c["label"] for c in res["candidates"]]
    # the cap binds, so staying within the caps left is a candidate of its own beside the plain stay
    assert labels[:3] == ["stay", "reference", "leader"] and res["truth_seeds"] == 2
    with open(os.path.join(summary["run_dir"], "history.json")) as f:
        final = json.load(f)["final"]["val_loss"]
    stay = res["candidates"][0]
    assert all(stay["truth"][0][d] == pytest.approx(v, abs=1e-5) for d, v in final.items())
    for name, o in res["objectives"].items():
        assert o["proxy"]["regret"] >= 0 and o["stay"]["regret"] >= 0 and o["entropy"]["regret"] >= 0, name
        assert o["truth_seed_agreement"] is not None
    assert os.path.isfile(os.path.join(summary["run_dir"], "fidelity_round_0.json"))


def test_confirm_rule_needs_a_gain_beyond_eval_and_adapter_noise():
    from opmix_ray.engine.confirm import confirm_rule
    rng = np.random.default_rng(3)
    old, conf = _windows(rng, shift=-0.03)
    rep = {d: v + 0.001 for d, v in old.items()}  # the adapters agree to 0.001: the gain is real
    moved, reason, fig = confirm_rule({"old": old, "confirm": conf, "old#2": rep}, W, k=2.0)
    assert moved and reason.startswith("confirmed") and fig["gain"] == pytest.approx(0.03, abs=0.01)
    rep = {d: v + 0.05 for d, v in old.items()}  # two 'old' adapters differ by more than the gain
    moved, reason, fig = confirm_rule({"old": old, "confirm": conf, "old#2": rep}, W, k=2.0)
    assert not moved and "keeping the current mixture" in reason and fig["se_adapter"] > fig["gain"]


def test_a_move_is_confirmed_against_the_stays_own_adapter_when_the_stay_is_not_the_current_mixture():
    """New data at 0 in the current mixture: the leader beats 'old' by far, but staying would give the
    new data its prior share; only a gain over the stay's adapter moves the round."""
    from opmix_ray.engine.confirm import confirm_rule
    rng = np.random.default_rng(4)
    old, conf = _windows(rng, shift=-0.3)  # far better than the current mixture
    stay = {d: v - 0.3 for d, v in old.items()}  # but no better than the stay
    rep = {d: v + 0.001 for d, v in old.items()}
    moved, reason, fig = confirm_rule({"old": old, "confirm": conf, "old#2": rep, "stay": stay}, W, k=2.0)
    assert not moved and "over the stay's adapter" in reason and "keeping the stay" in reason
    assert fig["gain"] == pytest.approx(0.0, abs=0.005) and fig["stay_objective"] is not None
    moved, reason, _ = confirm_rule({"old": old, "confirm": conf, "old#2": rep}, W, k=2.0)
    assert moved and "beats 'old'" in reason  # against the current mixture it would have moved


def test_the_confirmation_adapter_is_the_old_adapter_but_for_its_mixture(stay_run):
    """Trained on the current mixture, the confirmation adapter is the 'old' adapter again (same init,
    data seed, lr and steps), so it confirms nothing; on another mixture it is another model."""
    from opmix_ray.data.read import build_shards
    from opmix_ray.engine.adapters import adapter_lr
    from opmix_ray.engine.confirm import confirm_rule, confirm_windows
    from opmix_ray.engine.main_run import checkpoint_path
    cfg, summary = stay_run
    run_dir = summary["run_dir"]
    with open(os.path.join(run_dir, "history.json")) as f:
        r = json.load(f)["rounds"][0]
    adir = os.path.join(run_dir, "adapters_round_0", "adapters")
    dirs = {n: os.path.join(adir, n) for n in os.listdir(adir)}
    with open(os.path.join(checkpoint_path(run_dir, 0), "train_state.json")) as f:
        lr = adapter_lr(cfg, json.load(f)["info"].get("lr"))
    shards, base = build_shards(cfg), checkpoint_path(run_dir, 0)
    same = confirm_windows(cfg, shards, base, r["mixture_before"], lr, 0, dirs, cpus=1)
    for d in same["old"]:
        np.testing.assert_allclose(same["confirm"][d], same["old"][d], atol=1e-4)
    moved, _, fig = confirm_rule(same, {d: 1.0 for d in shards.domains}, k=2.0)
    assert not moved and abs(fig["gain"]) < 1e-4 and fig["se_adapter"] > 0
    # the stay's adapter is trained the same way: on the current mixture it is 'old' again
    with_stay = confirm_windows(cfg, shards, base, r["mixture_before"], lr, 0, dirs, cpus=1, stay=r["mixture_before"])
    for d in same["old"]:
        np.testing.assert_allclose(with_stay["stay"][d], same["old"][d], atol=1e-4)
    other = confirm_windows(cfg, shards, base, {d: float(d == "python") for d in shards.domains}, lr, 0, dirs, cpus=1)
    assert other["drawn"]["python"] == pytest.approx(1.0)
    assert other["confirm"]["python"].mean() < same["confirm"]["python"].mean()  # it learnt python


@pytest.mark.slow  # the default suite: the confirmation rule and the confirmation adapter, above
def test_a_move_is_confirmed_or_refused_by_real_training_before_it_is_pushed(tmp_path):
    """k = 0 and an objective of python alone: a python-heavier leader beats stay, so the round goes to
    the confirmation adapter; what is pushed is the leader only when the confirmation says so, and its
    cost is on the record."""
    from opmix_ray.engine.driver import run
    cfg = load_config(os.path.join(CONFIGS, "tiny.yaml"),
                      {"run": {"storage_path": str(tmp_path), "name": "confirm"}, "rounds": {"num_rounds": 1},
                       "search": {"num_samples": 4, "searcher": "random", "objective_weights": {"python": 1.0}},
                       "decision": {"k": 0.0}})
    summary = run(cfg)
    ray.shutdown()
    with open(os.path.join(summary["run_dir"], "history.json")) as f:
        r = json.load(f)["rounds"][0]
    d = r["decision"]
    c = d["confirm"]
    assert c is not None and c["se_adapter"] is not None and c["wall_s"] > 0 and r["wall_s"]["confirm"] > 0
    assert d["moved"] == (c["gain"] > 0) and d["reason"].startswith("confirmed" if d["moved"] else "not confirmed")
    pushed = d["leader_mixture"] if d["moved"] else r["mixture_before"]
    assert all(r["weights"][k] == pytest.approx(v, abs=1e-6) for k, v in pushed.items())


def test_a_run_that_always_stays_is_the_fixed_mixture_run(stay_run):
    """Staying is free: an OP-Mix run whose every round keeps the mixture ends with the same losses
    as the uniform baseline of the same seed and budget, also when a repetition cap binds."""
    from opmix_ray.engine.driver import run
    cfg, summary = stay_run
    fixed = run(cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": "fixed", "baseline": "uniform"}),
                                       "tracking": cfg.tracking.model_copy(update={"tensorboard": False, "mlflow": False,
                                                                                 "wandb": False})}))
    with open(os.path.join(summary["run_dir"], "history.json")) as f:
        h = json.load(f)
    assert h["rounds"][0]["decision"]["moved"] is False
    with open(os.path.join(fixed["run_dir"], "history.json")) as f:
        base = json.load(f)["final"]["val_loss"]
    assert h["final"]["val_loss"] == base


def test_reference_mixture_keeps_the_current_one_within_the_caps_left():
    from opmix_ray.engine.rule import reference_mixture
    p = {"python": .2, "bible": .2, "dictionary": .2, "fortunes": .2, "licenses": .2}
    assert reference_mixture(p, None) == p and reference_mixture(p, {"python": 0.5}) == pytest.approx(p)
    r = reference_mixture(p, {"fortunes": 0.128, "licenses": 0.014})
    assert r["licenses"] == pytest.approx(0.014) and r["fortunes"] == pytest.approx(0.128)
    assert r["python"] == pytest.approx(r["bible"]) == pytest.approx((1 - 0.142) / 3)  # the excess, shared by weight
    # water-filling: a domain pushed over its own cap by the spread excess is capped in turn
    r = reference_mixture({"a": .5, "b": .3, "c": .2}, {"a": 0.1, "b": 0.5})
    assert r == pytest.approx({"a": 0.1, "b": 0.5, "c": 0.4})
    # caps that cannot all hold: the sampler will redistribute anyway, the current mixture stays
    assert reference_mixture({"a": .5, "b": .5}, {"a": 0.2, "b": 0.3}) == {"a": .5, "b": .5}


def test_matched_stay_stands_for_the_reference_mixture():
    from opmix_ray.engine.rule import reference_mixture
    from opmix_ray.mixture import Mixture, expand_collapsed
    p = {"a": .4, "b": .4, "c": .2}
    ref = reference_mixture(p, {"c": 0.05})
    leader = {"old": 0.6, "a": 0.1, "b": 0.2, "c": 0.1}
    s = matched_stay(leader, p, ref)
    assert sum(s.values()) == pytest.approx(1.0) and s["old"] == pytest.approx(0.25)  # lowered so c fits
    e = expand_collapsed(tuple(s), np.array(list(s.values())), Mixture.from_dict(p))
    assert e.as_dict() == pytest.approx(ref)
    # a domain without its own adapter moves only with old: the reference cannot be met, and the
    # stay is the one matched to p
    assert matched_stay({"old": 0.6, "a": 0.4}, p, ref) == matched_stay({"old": 0.6, "a": 0.4}, p)


def test_a_prior_stay_gives_new_data_its_share_and_the_stay_stands_for_it():
    from opmix_ray.engine.rule import prior_stay, stay_old_share
    from opmix_ray.mixture import Mixture, expand_collapsed
    prev = {"a": 0.6, "b": 0.4}
    # an arrival: 1/n of the mixture (the continual analogue of uniform), the others keep their ratios
    assert prior_stay(prev, ["a", "b", "c"], added=["c"]) == pytest.approx({"a": 0.4, "b": 0.8 / 3, "c": 1 / 3})
    # a split: the parts share the parent's weight by tokens; a revision keeps the old version's weight
    assert prior_stay(prev, ["a", "b1", "b2"], replaced={"b": ["b1", "b2"]}, tokens={"b1": 1, "b2": 3}) == \
        pytest.approx({"a": 0.6, "b1": 0.1, "b2": 0.3})
    assert prior_stay(prev, ["a", "b2"], replaced={"b": ["b2"]}) == pytest.approx({"a": 0.6, "b2": 0.4})
    # the stay stands for the prior exactly, whatever the leader's a_old: old (a, b at their ratios)
    # is pinned at 1 - 1/3 because a and b have no adapter of their own
    p = {"a": 0.6, "b": 0.4, "c": 0.0}
    target = prior_stay(prev, ["a", "b", "c"], added=["c"])
    assert stay_old_share(p, target, {"c"}) == pytest.approx(2 / 3)
    for leader in ({"old": 0.2, "c": 0.8}, {"old": 0.95, "c": 0.05}):
        s = matched_stay(leader, p, target)
        assert s == pytest.approx({"old": 2 / 3, "c": 1 / 3})
        e = expand_collapsed(tuple(s), np.array(list(s.values())), Mixture.from_dict(p))
        assert e.as_dict() == pytest.approx(target)
    # a prior the adapters cannot make (b moved apart from a without its own adapter) is refused
    assert stay_old_share(p, {"a": 0.5, "b": 0.2, "c": 0.3}, {"c"}) is None
