"""The headroom measurement: data orders apart from init and split, the paired noise, the pick made on
another order than the one that measures it; one real tiny measurement through Ray Tune (slow).

    pytest tests/test_headroom.py                 # seconds
    pytest -m slow tests/test_headroom.py         # + the tiny measurement (~1 min)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from opmix_ray.config import load_config, sampler_seed
from opmix_ray.experiments.baselines import usage_upper_bounds
from opmix_ray.experiments.headroom import headroom_mixtures, order_seed, summarise
from opmix_ray.training import train_fixed

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "opmix_ray", "configs")


def test_data_seed_changes_the_order_only(tiny):
    cfg, sh = tiny
    assert sampler_seed(load_config({"run": {"seed": 3}}).run) == 3000
    assert sampler_seed(load_config({"run": {"seed": 3, "data_seed": 3}}).run) == 3000  # unset = run.seed
    assert sampler_seed(load_config({"run": {"seed": 3, "data_seed": 7}}).run) == 7000
    kw = dict(model_cfg=cfg.model, main=cfg.main, shards=sh, mixture=sh.uniform(), tokens=16 * 64 * 3, seed=0,
              caps=sh.cap_tokens(cfg))
    own, same, other = train_fixed(**kw), train_fixed(**kw, data_seed=0), train_fixed(**kw, data_seed=10_000)
    assert own["val_loss"] == same["val_loss"]  # data_seed = seed is the run's own order, bit for bit
    assert own["val_loss"] != other["val_loss"]  # another order: other draws from the same init
    zero = train_fixed(**{**kw, "tokens": 16 * 64}, data_seed=10_000)
    assert train_fixed(**{**kw, "tokens": 16 * 64})["n_params"] == zero["n_params"]


def test_order_seeds_are_apart_from_every_run_seed():
    assert order_seed(0, 0) is None and order_seed(2, 0) is None
    seeds = {order_seed(s, j) for s in range(3) for j in range(1, 4)}
    assert len(seeds) == 9 and not seeds & set(range(1000))


def test_headroom_mixtures(tiny):
    cfg, sh = tiny
    upper = usage_upper_bounds(cfg, sh)
    mixes = headroom_mixtures(sh, upper, 12, np.random.default_rng(0))
    labels = [lab for lab, _ in mixes]
    assert labels[:2] == ["uniform", "natural"] and len(mixes) == 12
    assert all(f"lean_{d}" in labels for d in sh.domains)
    for lab, w in mixes:
        assert np.isclose(w.sum(), 1) and np.all(w >= 0)
        if lab.startswith("draw_"):
            assert np.all(w <= upper + 1e-12)  # the draws keep within the caps
    i = sh.domains.index("python")
    assert dict(mixes)["lean_python"][i] == pytest.approx(0.6)


def _row(label, order, mean, target):
    return {"label": label, "order": order, "val_loss": {"a": mean, "b": mean, "t": target}}


def test_summarise_picks_on_order_zero_and_measures_on_the_others():
    objs = {"mean": {"a": 1.0, "b": 1.0}, "target": {"t": 1.0}}
    rows = [_row("uniform", 0, 3.0, 5.0), _row("x", 0, 3.1, 4.0), _row("y", 0, 2.95, 4.9)]
    rows += [_row("uniform", j, 3.0 + 0.01 * j, 5.0 + 0.02 * j) for j in (1, 2, 3)]
    # order 0 flattered y on the mean (its pick); on the other orders it is worse than uniform
    rows += [_row("y", j, 3.05, 5.0) for j in (1, 2, 3)] + [_row("x", j, 3.2, 4.2 + 0.05 * j) for j in (1, 2, 3)]
    out = summarise(rows, objs, 3)
    m, t = out["mean"], out["target"]
    assert m["pick"] == "y" and m["order0_gain"] == pytest.approx(0.05)
    d = np.array([3.05 - 3.01, 3.05 - 3.02, 3.05 - 3.03])
    assert m["oracle_gain"] == pytest.approx(-d.mean()) and m["oracle_gain"] < 0
    assert m["noise_sd"] == pytest.approx(np.std(d, ddof=1))
    assert t["pick"] == "x" and t["n_orders"] == 3 and t["n_mixtures"] == 3
    dt = np.array([4.25 - 5.02, 4.3 - 5.04, 4.35 - 5.06])
    assert t["paired_differences"] == pytest.approx(dt.tolist())
    assert t["ratio"] == pytest.approx(-dt.mean() / np.std(dt, ddof=1))


@pytest.mark.slow  # ~55 s: the default suite keeps the mixtures, the summary and the kept runs
def test_headroom_command_end_to_end(tmp_path):
    """The real command on the tiny config: 7 mixtures (uniform, natural, 5 leaning) and 2 more orders."""
    out = tmp_path / "hr"
    cmd = [sys.executable, "-m", "opmix_ray.cli", "headroom", os.path.join(CONFIGS, "bench_tiny.yaml"),
           "--out", str(out), "bench.oracle_runs=7", "bench.noise_orders=2", "main.total_tokens=10240",
           "ray.num_cpus=2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "headroom.json").read_text())
    assert set(res["objectives"]) == {"mean", "target"}
    for o in res["objectives"].values():
        assert o["n_orders"] == 2 and o["n_mixtures"] == 7 and o["pick"] != "uniform"
        assert np.isfinite(o["noise_sd"]) and len(o["paired_differences"]) == 2
    runs = res["runs"]
    assert sum(r["label"] == "uniform" for r in runs) == 3  # order 0 plus the 2 noise orders
    uni = {r["order"]: r["val_loss"] for r in runs if r["label"] == "uniform"}
    assert uni[1] != uni[2]  # other orders, other losses
    assert "| target |" in p.stdout
    assert not (out / "headroom_partial.json").exists()  # its runs are all in headroom.json
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # a finished measurement is never replaced silently


def test_bench_report_judges_each_seed_against_the_noise():
    from opmix_ray.experiments.bench_report import against_noise, noise_verdicts
    rows = []
    for s, (u, o) in enumerate([(5.0, 4.8), (5.1, 5.08), (5.0, 5.2)]):  # opmix: -0.2, -0.02, +0.2 nats
        rows.append({"method": "uniform", "objective": "any", "seed": s, "val_loss": {"a": 3.0, "t": u}})
        rows.append({"method": "opmix", "objective": "target", "seed": s, "val_loss": {"a": 3.0, "t": o}})
    result = {"rows": rows, "domains": ["a"], "eval_only": ["t"], "noise": {"target": 0.05},
              "headroom": {"target": {"pick": "lean_a", "oracle_gain": 0.25, "noise_sd": 0.05, "ratio": 5.0,
                                      "n_orders": 3}}}
    (v,) = noise_verdicts(result)
    assert v["label"] == "opmix (target)" and v["diffs"] == pytest.approx([-0.2, -0.02, 0.2])
    assert (v["better_beyond_noise"], v["better_beyond_2noise"], v["worse_beyond_2noise"]) == (1, 1, 1)
    assert v["headroom_captured"] == pytest.approx((0.02 / 3) / 0.25)  # the mean gain over the oracle's
    text = "\n".join(against_noise(result))
    assert "ratio 5.00" in text and "-0.2000 (-4.0 sd)" in text


def test_a_wider_measurement_trains_only_the_runs_it_does_not_have(monkeypatch):
    """Adding mixtures to a finished measurement: the same label, weights and order are kept, the rest trained."""
    import opmix_ray.training as training
    from opmix_ray.experiments import headroom as hr
    trained = []

    def fake_jobs(jobs, shards, storage_path, name, max_concurrent=2, on_row=None):
        trained.extend((j["label"], j["order"]) for j in jobs)
        return [{"val_loss": {"a": 1.0}, "drawn": {}, "wall_s": 0.0, "n_params": 1, "flops": 0.0} for _ in jobs]

    monkeypatch.setattr(training, "run_fixed_jobs", fake_jobs)
    w = lambda x, y: {"a": x, "b": y}  # the fixed-mixture jobs carry weights per domain
    jobs = [{"label": lab, "order": o, "data_seed": None if o == 0 else o, "weights": m}
            for lab, o, m in (("uniform", 0, w(0.5, 0.5)), ("draw_2", 0, w(0.3, 0.7)), ("uniform", 1, w(0.5, 0.5)))]
    prior = [{**jobs[0], "val_loss": {"a": 9.0}}, {**jobs[1], "weights": w(0.31, 0.69), "val_loss": {"a": 9.0}}]
    rows = hr._run(jobs, None, Path("unused"), "x", 2, prior, lambda *_: None, keep=None)
    assert trained == [("draw_2", 0), ("uniform", 1)]  # a draw with other weights is another run
    assert [r["val_loss"]["a"] for r in rows] == [9.0, 1.0, 1.0] and [r["label"] for r in rows] == ["uniform", "draw_2", "uniform"]


def test_a_stopped_measurement_keeps_the_runs_it_finished(monkeypatch, tmp_path):
    """Runs are written as they finish: a measurement stopped mid-way trains only the rest next time."""
    import opmix_ray.training as training
    from opmix_ray.experiments import headroom as hr
    trained, setting = [], {"seed": 0}
    row = {"val_loss": {"a": 1.0}, "drawn": {}, "wall_s": 0.0, "n_params": 1, "flops": 0.0}

    def stopped_after_one(jobs, shards, storage_path, name, max_concurrent=2, on_row=None):
        trained.extend(j["label"] for j in jobs)
        on_row(1, row)
        raise KeyboardInterrupt

    def fake_jobs(jobs, shards, storage_path, name, max_concurrent=2, on_row=None):
        trained.extend(j["label"] for j in jobs)
        return [row for _ in jobs]

    jobs = [{"label": lab, "order": 0, "data_seed": None, "weights": {"a": x, "b": 1 - x}}
            for lab, x in (("uniform", 0.5), ("natural", 0.7), ("draw_2", 0.2))]
    partial = tmp_path / hr.PARTIAL
    monkeypatch.setattr(training, "run_fixed_jobs", stopped_after_one)
    with pytest.raises(KeyboardInterrupt):
        hr._run(jobs, None, tmp_path, "x", 2, [], lambda *_: None, hr._Keeper(partial, setting))
    kept = hr.prior_runs(partial, None, setting)
    assert [r["label"] for r in kept] == ["natural"]
    assert hr.prior_runs(partial, None, {"seed": 1}) == []  # another setting's runs are not reused
    trained.clear()
    monkeypatch.setattr(training, "run_fixed_jobs", fake_jobs)
    rows = hr._run(jobs, None, tmp_path, "x", 2, kept, lambda *_: None, hr._Keeper(partial, setting))
    assert trained == ["uniform", "draw_2"] and [r["label"] for r in rows] == ["uniform", "natural", "draw_2"]
