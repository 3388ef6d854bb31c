"""Domain-set changes: the collapsed adapter plan, explicit initial mixtures, the stage schedule
(adds, removals, splits, revisions), the split and revised data; the tiny continual runs end to end
are `slow`.

    pytest tests/test_continual.py                 # seconds
    pytest -m slow tests/test_continual.py         # + opmix-ray continual on continual_tiny.yaml and
                                                   #   continual_mixed_tiny.yaml (~10 min)
"""
import os

import pytest

from opmix_ray.config import ConfigError
from opmix_ray.experiments.experiment_config import load_experiment_config
from opmix_ray.engine.adapters import adapter_plan
from opmix_ray.engine.preflight import preflight
from opmix_ray.experiments.continual import _carry, check_schedule, fixed_plans, schedule_steps, stage_stay
from opmix_ray.mixture import Mixture

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "opmix_ray", "configs")


def _tiny(over=None, name="continual_tiny.yaml"):
    return load_experiment_config(os.path.join(CONFIGS, name), over or {})


def test_collapsed_plan_trains_only_affected_domains_plus_old():
    cfg = _tiny({"adapters": {"domains": ["python"]}})
    current = Mixture.from_dict({"bible": 0.5, "dictionary": 0.5, "python": 0.0})
    plan = dict(adapter_plan(current, cfg))
    assert list(plan) == ["old", "python", "old#2"]  # old#2: the replicate that measures adapter noise
    assert plan["old#2"] == plan["old"]
    assert plan["old"] == current.as_dict()  # old = the frozen ratios of the untouched domains
    assert plan["python"]["python"] == pytest.approx(0.9)
    assert plan["python"]["bible"] == pytest.approx(0.05)


def test_schedule_lists_domains_seen_per_stage():
    assert check_schedule(_tiny()) == [["bible", "dictionary"], ["bible", "dictionary", "python"],
                                       ["bible", "dictionary", "python", "fortunes"]]


@pytest.mark.parametrize("stages, field", [
    ([{"add": ["bible"], "tokens": 10}], "schedule.stages"),
    ([{"add": ["bible"], "tokens": 10}, {"add": ["bible"], "tokens": 10}], "schedule.stages.1.add"),
])
def test_bad_schedule_names_the_field(stages, field):
    with pytest.raises(ConfigError, match=f"config error at {field}"):
        check_schedule(_tiny({"schedule": {"stages": stages}}))


def test_a_mixed_schedule_adds_splits_removes_and_revises():
    steps = schedule_steps(_tiny(name="continual_mixed.yaml"))
    assert [s["label"] for s in steps[1:]] == ["+python", "+fortunes", "bible>bible_ot+bible_nt", "-dictionary",
                                               "python>python_v2", "+licenses"]
    assert steps[3]["current"] == ["bible_ot", "bible_nt", "dictionary", "python", "fortunes"]  # parts in place
    assert steps[3]["new"] == ["bible_ot", "bible_nt"] and steps[4]["new"] == []  # a removal brings nothing new
    assert steps[-1]["current"] == ["bible_ot", "bible_nt", "python_v2", "fortunes", "licenses"]
    assert len(steps) - 1 >= 5  # at least five updates, as Olmix's sequences have


S0 = {"add": ["bible", "dictionary"], "tokens": 10}


@pytest.mark.parametrize("stages, field", [
    ([S0, {"remove": ["python"], "tokens": 10}], "schedule.stages.1.remove"),
    ([S0, {"split": {"python": ["a1", "a2"]}, "tokens": 10}], "schedule.stages.1.split"),
    ([S0, {"revise": {"bible": "dictionary"}, "tokens": 10}], "schedule.stages.1.revise"),
    ([S0, {"add": ["python"], "tokens": 10}, {"revise": {"python": "bible"}, "tokens": 10}], "schedule.stages.2.revise"),
    ([S0, {"split": {"bible": ["python", "python"]}, "tokens": 10}], "schedule.stages.1.split"),
    ([{"add": ["bible"], "remove": ["python"], "tokens": 10}, S0], "schedule.stages.0"),
    ([S0, {"remove": ["bible", "dictionary"], "tokens": 10}], "schedule.stages.1.remove"),
    ([S0, {"revise": {"bible": "b2", "dictionary": "d2"}, "tokens": 10}], "schedule.stages.1"),
])
def test_a_bad_domain_change_names_its_stage(stages, field):
    with pytest.raises(ConfigError, match=f"config error at {field}"):
        schedule_steps(_tiny({"schedule": {"stages": stages}}))


@pytest.mark.parametrize("stage, why", [({"tokens": 10}, "changes no domain"),
                                        ({"split": {"bible": ["b1"]}, "tokens": 10}, "2 or more")])
def test_a_stage_that_changes_nothing_is_refused_with_its_fix(stage, why):
    with pytest.raises(ConfigError, match=why):
        _tiny({"schedule": {"stages": [S0, stage]}})


def test_uniform_and_natural_over_the_seen_domains_go_on_from_their_own_checkpoint():
    """The continual analogue of uniform: every domain of the stage, never one absent, at equal or
    token shares, for the stage's tokens, from the method's last checkpoint; retrain from stage 0."""
    cfg = _tiny(name="continual_mixed.yaml")
    steps = schedule_steps(cfg)
    doms = list(dict.fromkeys(d for st in steps for d in st["new"] + st["current"]))
    tokens = {d: 1000 * (i + 1) for i, d in enumerate(doms)}
    ckpt = {"uniform-seen": "u_prev", "natural-seen": "n_prev"}
    for s in range(1, len(steps)):
        plans = fixed_plans(cfg, doms, tokens, steps, s, {}, ckpt, "pretrained")
        seen = steps[s]["current"]
        uni, n_tok, init = plans["uniform-seen"]
        assert {d for d, w in uni.items() if w > 0} == set(seen) and init == "u_prev"
        assert all(uni[d] == pytest.approx(1 / len(seen)) for d in seen)
        assert n_tok == cfg.schedule.stages[s].tokens
        nat, _, init = plans["natural-seen"]
        assert init == "n_prev" and all(nat[d] == pytest.approx(tokens[d] / sum(tokens[x] for x in seen)) for d in seen)
        assert plans["retrain"][2] == "pretrained"
        assert plans["retrain"][1] == sum(st.tokens for st in cfg.schedule.stages[1:s + 1])


def test_carry_renormalises_the_previous_mixture_on_the_current_domains():
    assert _carry({"a": 0.5, "b": 0.25, "c": 0.25}, ["b", "c"]) == {"b": 0.25, "c": 0.25}
    assert _carry({"a": 1.0}, ["b", "c"]) == {"b": 1.0, "c": 1.0}  # nothing left: uniform (weights normalise later)


def test_the_revisions_dir_partitions_bible_and_strips_python_comments(tmp_path, capsys):
    import hashlib

    import pyarrow.parquet as pq

    from opmix_ray.data import revisions
    from opmix_ray.data.shards import BUNDLED_DIR, DataError
    out = tmp_path / "mixed"
    man = revisions.ensure_built(str(out))
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert all(man["copied"][f.stem] == sha(f) for f in BUNDLED_DIR.glob("*.parquet"))  # copied byte for byte
    docs = lambda p: pq.read_table(p)["text"].to_pylist()
    ot, nt, bible = docs(out / "bible_ot.parquet"), docs(out / "bible_nt.parquet"), docs(BUNDLED_DIR / "bible.parquet")
    assert sorted(ot + nt) == sorted(bible) and ot and nt
    first = lambda ds: {d.split("\n", 1)[0].rsplit(" ", 1)[0] for d in ds}  # "<book> <chapter>"
    assert {"Matthew", "Acts", "Romans", "Revelation"} <= first(nt) and {"Genesis", "Psalms", "Isaiah"} <= first(ot)
    assert not first(nt) & {"Genesis", "Psalms", "Isaiah", "1 Chronicles"} and not first(ot) & {"Acts", "1 John"}
    assert not any(line.lstrip().startswith("#") for d in docs(out / "python_v2.parquet") for line in d.split("\n"))
    assert revisions.ensure_built(str(out)) == man  # verified, not rebuilt
    (out / "python_v2.parquet").write_bytes(b"changed")
    with pytest.raises(DataError, match="differs from revisions.json"):
        revisions.ensure_built(str(out))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "mine.parquet").write_bytes(b"a user's file")
    with pytest.raises(DataError, match="no revisions.json"):
        revisions.ensure_built(str(theirs))
    assert [p.name for p in theirs.iterdir()] == ["mine.parquet"]  # nothing written beside it


@pytest.mark.parametrize("over, field", [
    ({"adapters": {"domains": ["klingon"]}}, "adapters.domains"),
    ({"adapters": {"domains": ["python"], "include_old": False}}, "adapters.domains"),
    ({"rounds": {"initial": {"bible": 0.5, "python": 0.2}}}, "rounds.initial"),
    ({"rounds": {"initial_stay": {"bible": 0.5, "python": 0.2}}}, "rounds.initial_stay"),
    # uniform start, python alone with an adapter: bible may not move apart from the other old domains
    ({"adapters": {"domains": ["python"]}, "rounds": {"initial_stay": {
        "bible": 0.5, "dictionary": 0.1, "fortunes": 0.1, "licenses": 0.1, "manpages": 0.1, "python": 0.1}}},
     "rounds.initial_stay"),
])
def test_bad_stage_settings_fail_in_preflight(tmp_path, over, field):
    cfg = _tiny({"run": {"storage_path": str(tmp_path)}, **over}, name="tiny.yaml")
    with pytest.raises(ConfigError, match=f"config error at {field}"):
        preflight(cfg)
    assert not any(tmp_path.iterdir())


def test_explicit_initial_mixture_with_a_domain_not_yet_arrived(tmp_path):
    doms = ["bible", "dictionary", "fortunes", "licenses", "manpages", "python"]
    init = {d: (0.5 if d in ("bible", "python") else 0.0) for d in doms}
    cfg = _tiny({"run": {"storage_path": str(tmp_path)}, "rounds": {"initial": init}}, name="tiny.yaml")
    _, shards = preflight(cfg)
    from opmix_ray.engine.driver import initial_mixture
    assert initial_mixture(cfg, shards).as_dict() == init
    # staying may give the domains not yet trained on a prior share when they have their own adapters
    stay = {d: (0.25 if d in ("bible", "python") else 0.125) for d in doms}
    cfg = _tiny({"run": {"storage_path": str(tmp_path / "s")}, "rounds": {"initial": init, "initial_stay": stay}},
                name="tiny.yaml")
    preflight(cfg)


@pytest.mark.slow
def test_tiny_continual_end_to_end(experiment_results):
    res = experiment_results("continual", "continual_tiny.yaml", timeout=1500)
    final = {r["method"]: r for r in res["rows"] if r["stage"] == 2}
    assert set(final) == {"opmix", "opmix-recompute", "naive", "replay", "retrain"}
    assert final["naive"]["mixture"]["fortunes"] == 1.0
    assert final["opmix"]["mixture"]["fortunes"] > 0 and final["opmix"]["mixture"]["bible"] > 0
    # reuse trains 2 adapters per stage, recompute one per seen domain + old
    assert res["flops"]["opmix"]["search"] < res["flops"]["opmix-recompute"]["search"]
    assert all(set(r["val_loss"]) >= set(res["seen_by_stage"][-1]) for r in final.values())


@pytest.mark.slow
def test_tiny_mixed_continual_end_to_end(experiment_results, tmp_path):
    res = experiment_results("continual", "continual_mixed_tiny.yaml", "--set", f"data.path={tmp_path / 'data'}")
    by = {(r["method"], r["stage"]): r for r in res["rows"]}
    methods = {r["method"] for r in res["rows"]}
    for m in methods:
        assert by[(m, 2)]["mixture"]["bible"] == 0.0  # split: the parent is never drawn again
        assert all(by[(m, s)]["mixture"]["dictionary"] == 0.0 for s in (3, 4))  # removed
        assert by[(m, 4)]["mixture"]["python"] == 0.0  # revised: only the new version is drawn
        assert set(by[(m, 4)]["val_loss"]) >= {"bible_ot", "bible_nt", "python_v2"}
    # a removal brings no new data: reuse keeps the previous mixture, renormalised, with no search
    prev, kept = by[("opmix", 2)]["mixture"], by[("opmix", 3)]["mixture"]
    left = {d: w for d, w in prev.items() if d != "dictionary"}
    assert kept == pytest.approx({d: w / sum(left.values()) for d, w in left.items()} | {"dictionary": 0.0})
    assert by[("opmix", 3)]["stage_search_flops"] == 0.0 < by[("opmix-recompute", 3)]["stage_search_flops"]
    assert res["flops"]["opmix"]["search"] < res["flops"]["opmix-recompute"]["search"]
    assert by[("naive", 4)]["mixture"]["python_v2"] == 1.0
    assert by[("opmix", 4)]["mean_loss"] == pytest.approx(
        sum(by[("opmix", 4)]["val_loss"][d] for d in res["seen_by_stage"][4]) / len(res["seen_by_stage"][4]))


def test_each_stage_of_the_mixed_sequence_stays_with_its_new_data_drawn():
    """schedule.stay: prior: no stage's stay leaves a current domain at 0 (an arrival 1/n, a split's
    parts their parent's weight by tokens, a revision the old version's); current: the new data at 0."""
    cfg = _tiny(name="continual_mixed.yaml")
    steps = schedule_steps(cfg)
    doms = list(dict.fromkeys(d for st in steps for d in st["new"] + st["current"]))
    tokens = {d: 1000 * (i + 1) for i, d in enumerate(doms)}
    mix = {d: (0.5 if d in steps[0]["current"] else 0.0) for d in doms}
    for s in range(1, len(steps)):
        stay = stage_stay(cfg, doms, s, steps[s]["current"], mix, tokens)
        if not steps[s]["new"]:  # a removal: nothing to search, the mixture is renormalised
            assert stay is None
            mix = {d: mix[d] if d in steps[s]["current"] else 0.0 for d in doms}
            mix = {d: w / sum(mix.values()) for d, w in mix.items()}
            continue
        assert sum(stay.values()) == pytest.approx(1.0)
        assert all(stay[d] > 0 for d in steps[s]["current"]), (s, stay)
        assert all(stay[d] == 0 for d in doms if d not in steps[s]["current"])
        mix = stay
    st = cfg.schedule.stages
    split = next(i for i, x in enumerate(st) if x.split)
    parent, parts = next(iter(st[split].split.items()))
    before = {d: 0.25 for d in doms if d in steps[split - 1]["current"]}
    before = {d: before.get(d, 0.0) for d in doms}
    got = stage_stay(cfg, doms, split, steps[split]["current"], before, tokens)
    assert got[parts[0]] / got[parts[1]] == pytest.approx(tokens[parts[0]] / tokens[parts[1]])
    assert got[parts[0]] + got[parts[1]] == pytest.approx(before[parent])
    cur = cfg.model_copy(deep=True)
    cur.schedule.stay = "current"
    assert stage_stay(cur, doms, split, steps[split]["current"], before, tokens) is None


def kl_rows(student, teacher, tokens):
    import torch
    with torch.no_grad():
        t = torch.log_softmax(teacher(input_ids=tokens[:, :-1]).logits.float(), -1)
        s = torch.log_softmax(student(input_ids=tokens[:, :-1]).logits.float(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean(-1).sum())


def test_the_distill_baseline_trains_old_rows_toward_the_previous_checkpoint():
    """model.distill_loss: cross-entropy on the new rows, KL(teacher || model) on the old rows; a copy
    of the teacher has nothing to learn on old rows, and a step pulls a drifted model back to it."""
    import copy

    import torch

    from opmix_ray.config import ModelSection
    from opmix_ray.model import build_model, distill_loss, lm_loss
    teacher = build_model(ModelSection(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), 64, 16, seed=0)
    teacher.eval()
    tokens = torch.randint(0, 64, (6, 17), generator=torch.Generator().manual_seed(0))
    old = torch.tensor([True, True, True, False, False, False])
    student = copy.deepcopy(teacher)
    assert float(distill_loss(student, teacher, tokens, torch.zeros(6, dtype=torch.bool), 1.0).detach()) == \
        pytest.approx(float(lm_loss(student, tokens).detach()))
    assert float(distill_loss(student, teacher, tokens, torch.ones(6, dtype=torch.bool), 1.0).detach()) == pytest.approx(0, abs=1e-6)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kl = lambda: float(distill_loss(student, teacher, tokens, torch.ones(6, dtype=torch.bool), 1.0).detach())
    before = kl()
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    distill_loss(student, teacher, tokens, torch.ones(6, dtype=torch.bool), 1.0).backward()
    opt.step()
    assert 0 < kl() < before
    # mixed rows: the mean of the new rows' cross-entropy and the old rows' KL
    mixed = float(distill_loss(student, teacher, tokens, old, 2.0).detach())
    ce = lm_loss(student, tokens, reduction="none").detach()
    assert mixed == pytest.approx((float(ce[3:].sum()) + 2.0 * kl_rows(student, teacher, tokens[:3])) / 6, rel=1e-4)
    cfg = _tiny(name="continual_mixed.yaml")
    steps = schedule_steps(cfg)
    doms = list(dict.fromkeys(d for st in steps for d in st["new"] + st["current"]))
    w, _, init = fixed_plans(cfg, doms, dict.fromkeys(doms, 1000), steps, 1, {}, {"distill": "prev"}, "p")["distill"]
    assert init == "prev" and w == fixed_plans(cfg, doms, dict.fromkeys(doms, 1000), steps, 1, {}, {}, "p")["replay"][0]
