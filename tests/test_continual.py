"""Domain-set changes: the collapsed adapter plan, explicit initial mixtures, the stage schedule;
the tiny continual run end to end is `slow`.

    pytest tests/test_continual.py                 # seconds
    pytest -m slow tests/test_continual.py         # + opmix-ray continual on continual_tiny.yaml (~4 min)
"""
import json
import os
import subprocess
import sys

import pytest

from opmix_ray.config import ConfigError
from opmix_ray.experiments.config import load_experiment_config
from opmix_ray.engine.adapters import adapter_plan
from opmix_ray.engine.preflight import preflight
from opmix_ray.experiments.continual import check_schedule
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


@pytest.mark.parametrize("over, field", [
    ({"adapters": {"domains": ["klingon"]}}, "adapters.domains"),
    ({"adapters": {"domains": ["python"], "include_old": False}}, "adapters.domains"),
    ({"rounds": {"initial": {"bible": 0.5, "python": 0.2}}}, "rounds.initial"),
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
    from opmix_ray.engine.driver import _initial_mixture
    assert _initial_mixture(cfg, shards).as_dict() == init


@pytest.mark.slow
def test_tiny_continual_end_to_end(tmp_path):
    out = tmp_path / "c"
    p = subprocess.run([sys.executable, "-m", "opmix_ray.cli", "continual", os.path.join(CONFIGS, "continual_tiny.yaml"),
                        "--out", str(out)], capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    final = {r["method"]: r for r in res["rows"] if r["stage"] == 2}
    assert set(final) == {"opmix", "opmix-recompute", "naive", "replay", "retrain"}
    assert final["naive"]["mixture"]["fortunes"] == 1.0
    assert final["opmix"]["mixture"]["fortunes"] > 0 and final["opmix"]["mixture"]["bible"] > 0
    # reuse trains 2 adapters per stage, recompute one per seen domain + old
    assert res["flops"]["opmix"]["search"] < res["flops"]["opmix-recompute"]["search"]
    assert all(set(r["val_loss"]) >= set(res["seen_by_stage"][-1]) for r in final.values())
