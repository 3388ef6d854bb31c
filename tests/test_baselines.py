"""The baselines' formulas (as their papers give them) and the benchmark's pieces, without Ray; one Tune run of
fixed-mixture jobs; the whole tiny benchmark end to end is `slow`.

    pytest tests/test_baselines.py                 # ~30 s
    pytest -m slow tests/test_baselines.py         # + opmix-ray bench on bench_tiny.yaml (~4 min), an online row
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from opmix_ray.experiments.baselines import BaselineContext, propose, usage_upper_bounds
from opmix_ray.experiments.baselines._doremi import group_dro_update, run_doremi
from opmix_ray.experiments.baselines._regmix import cross_val_spearman, fit_regressor, simulate_mixtures
from opmix_ray.experiments.baselines.base import Swarm, sample_swarm_mixtures
from opmix_ray.experiments.experiment_config import load_experiment_config
from opmix_ray.experiments.bench_report import markdown
from opmix_ray.training import train_fixed

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "opmix_ray", "configs")


def test_eval_only_domain_is_scored_never_trained(tiny):
    cfg, sh = tiny
    assert sh.eval_only == ("manpages",) and "manpages" not in sh.domains
    assert "manpages" in sh.val and "manpages" not in sh.train
    assert set(sh.natural().as_dict()) == set(sh.domains)


def test_uniform_capped_holds_every_cap_for_the_whole_run(tiny):
    cfg, sh = tiny
    cfg = cfg.model_copy(deep=True)
    lic = sh.cap_tokens(cfg)["licenses"] / cfg.data.max_epochs.get("licenses", cfg.data.default_max_epochs)
    cfg.data.max_epochs = {"licenses": 0.5 * cfg.main.total_tokens / len(sh.domains) / lic}  # half of 1/k
    w = propose("uniform-capped", BaselineContext(cfg, sh, "/nonexistent"), {}).mixture.as_dict()
    caps = sh.cap_tokens(cfg)
    assert sum(w.values()) == pytest.approx(1.0)
    for d in sh.domains:  # no domain runs out before the end of the main run
        assert w[d] * cfg.main.total_tokens <= caps[d] * (1 + 1e-9)
    capped = [d for d in sh.domains if caps[d] / cfg.main.total_tokens < 1 / len(sh.domains)]
    assert capped == ["licenses"] and w["licenses"] == pytest.approx(0.5 / len(sh.domains))
    free = [w[d] for d in sh.domains if d not in capped]
    assert max(free) - min(free) < 1e-9 and min(free) > 1 / len(sh.domains)  # the excess spread equally


def test_group_dro_update_matches_doremi():
    alpha = np.array([0.5, 0.3, 0.2])
    lam = np.array([0.0, 0.4, 1.0])
    z = np.log(alpha) + 1.0 * lam
    expect = 0.999 * np.exp(z) / np.exp(z).sum() + 1e-3 / 3
    assert np.allclose(group_dro_update(alpha, lam, 1.0, 1e-3), expect)
    # zero excess everywhere leaves the weights (up to the smoothing) where they were
    assert np.allclose(group_dro_update(alpha, np.zeros(3), 1.0, 0.0), alpha)


def test_swarm_mixtures_respect_usage_bounds(tiny):
    cfg, sh = tiny
    upper = usage_upper_bounds(cfg, sh)
    p = sh.natural().as_array()
    assert np.all(upper <= np.minimum(15 * p, 1) + 1e-12)
    licenses = sh.domains.index("licenses")  # max_epochs 1.0: its cap binds at the main budget
    assert upper[licenses] <= sh.cap_tokens(cfg)["licenses"] / cfg.main.total_tokens + 1e-12
    A = sample_swarm_mixtures(p, upper, 40, np.random.default_rng(0))
    assert A.shape == (40, len(sh.domains)) and np.allclose(A.sum(1), 1)
    assert np.all(A <= upper + 1e-9)
    # small Dirichlet strength first (peaked mixtures), large last (near the prior)
    assert A[:10].max(1).mean() > A[-10:].max(1).mean()


def test_regressors_recover_a_linear_objective():
    rng = np.random.default_rng(0)
    A = rng.dirichlet(np.ones(4), size=48)
    y = A @ np.array([3.0, 2.0, 1.0, 4.0]) + rng.normal(0, 0.01, 48)
    sims = simulate_mixtures(np.full(4, 0.25), np.ones(4), 5000, rng)
    for kind in ("linear", "lightgbm"):
        pred = fit_regressor(A, y, kind)(sims)
        top = sims[np.argsort(pred)[:128]].mean(0)
        assert np.argmax(top) == 2, (kind, top)  # the cheapest domain dominates the top-k mean
        assert cross_val_spearman(A, y, kind) > 0.8


def test_olmix_and_regmix_on_a_synthetic_swarm(tiny):
    cfg, sh = tiny
    ctx = BaselineContext(cfg, sh, "/nonexistent")
    rng = np.random.default_rng(1)
    A = sample_swarm_mixtures(sh.natural().as_array(), usage_upper_bounds(cfg, sh), 24, rng)
    cost = {d: i + 1.0 for i, d in enumerate(sh.domains)}  # loss falls with the share of cheap domains
    losses = [{d: 2.0 + np.exp(-3 * a[i] * cost[d]) for i, d in enumerate(sh.domains)} for a in A]
    ctx._swarm = Swarm(A, losses, flops=1e9, wall_s=1.0)
    for name in ("olmix", "regmix", "regmix-linear"):
        res = propose(name, ctx, {d: 1.0 for d in sh.domains})
        w = res.mixture.as_array()
        assert np.isclose(w.sum(), 1) and np.all(w >= 0) and res.search_flops == 1e9
        assert np.all(w <= usage_upper_bounds(cfg, sh) + 1e-6), (name, w)


def test_doremi_runs_and_returns_a_time_average(tiny):
    cfg, sh = tiny
    out = run_doremi(cfg, sh)
    w = np.array(out["weights"])
    assert np.isclose(w.sum(), 1) and np.all(w > 0) and out["flops"] > 0 and len(out["path"]) >= 2


def test_train_fixed_is_deterministic_and_follows_the_mixture(tiny):
    cfg, sh = tiny
    mix = sh.natural()
    a = train_fixed(cfg.model, cfg.main, sh, mix, 8 * 16 * 64, seed=0, caps=sh.cap_tokens(cfg))
    b = train_fixed(cfg.model, cfg.main, sh, mix, 8 * 16 * 64, seed=0, caps=sh.cap_tokens(cfg))
    assert a["val_loss"] == b["val_loss"] and set(a["val_loss"]) == set(sh.val)
    assert all(abs(a["drawn"][d] - w) < 0.02 for d, w in mix.as_dict().items())


def test_report_compares_per_seed():
    row = lambda m, o, s, mp, tp: {"method": m, "objective": o, "seed": s, "mean_ppl": mp, "worst_ppl": mp,
                                   "target_ppl": tp, "ppl": {"a": mp, "t": tp}, "mixture": {"a": 1.0},
                                   "search_flops": 1.0, "search_wall_s": 0.0, "main_flops": 2.0}
    res = {"rows": [row("natural", "any", 0, 10.0, 20.0), row("opmix", "mean", 0, 9.0, 20.0),
                    row("opmix", "target", 0, 11.0, 18.0)], "oracle": [], "fidelity": None,
           "domains": ["a"], "eval_only": ["t"]}
    text = markdown(res)
    assert "opmix (mean) vs natural, mean_ppl: -10.00%" in text
    assert "opmix (target) vs natural, target_ppl: -10.00%" in text


def test_bench_bad_input_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("bench:\n  methods: [uniform, alchemy]\n")
    p = subprocess.run([sys.executable, "-m", "opmix_ray.cli", "bench", str(bad), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "bench.methods" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


def test_fixed_jobs_run_as_tune_trials(tiny, tmp_path):
    import ray

    from opmix_ray.ray_init import init_ray
    from opmix_ray.training import run_fixed_jobs
    cfg, sh = tiny
    ctx = BaselineContext(cfg, sh, str(tmp_path))
    jobs = [ctx.proxy_job(sh.uniform().as_array(), tokens=4 * 16 * 64, label="u"),
            ctx.proxy_job(sh.natural().as_array(), tokens=4 * 16 * 64, label="n")]
    seen = {}
    init_ray(cfg)
    try:
        rows = run_fixed_jobs(jobs, sh, str(tmp_path), "jobs", on_row=seen.__setitem__)
    finally:
        ray.shutdown()
    assert [r["label"] for r in rows] == ["u", "n"]
    assert seen == {0: rows[0], 1: rows[1]}  # each row handed over as its run finished
    assert all(set(r["val_loss"]) == set(sh.val) and r["flops"] > 0 for r in rows)
    assert rows[0]["val_loss"] != rows[1]["val_loss"]


@pytest.mark.slow
def test_tiny_bench_end_to_end(experiment_results, tmp_path):
    res = experiment_results("bench", "bench_tiny.yaml", timeout=1200)
    labels = {(r["method"], r["objective"]) for r in res["rows"]}
    assert {("opmix", "mean"), ("opmix", "target"), ("natural", "any"), ("regmix", "target"),
            ("olmix", "mean"), ("doremi", "any"), ("aioli", "any")} <= labels
    assert all(np.isfinite(r["mean_ppl"]) and r["target_ppl"] > 0 for r in res["rows"])
    assert len(res["oracle"]) == 3 and res["fidelity"]["n"] == 4
    for f in ("results.md", "ppl_vs_search_flops.png", "mixtures.png"):
        assert (tmp_path / "out" / f).is_file()


@pytest.mark.slow  # ~35 s: the default suite keeps the fixed jobs as Tune trials
def test_an_online_method_is_its_own_row_beside_a_fixed_one(tmp_path):
    """bench with aioli and uniform: uniform's row is a fixed full run, aioli's is its own run."""
    import ray

    from opmix_ray.experiments.bench import run_bench
    cfg = load_experiment_config(os.path.join(CONFIGS, "bench_tiny.yaml"),
                                 {"bench": {"methods": ["uniform", "aioli"], "oracle_runs": 0, "fidelity_mixtures": 0}})
    try:
        res = run_bench(cfg, tmp_path / "bench")
    finally:
        ray.shutdown()
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"uniform", "aioli"}
    a = rows["aioli"]
    assert a["objective"] == "any" and len(a["rounds"]) == 3 and a["search_flops"] > 0
    assert a["mean_ppl"] > 0 and a["target_ppl"] > 0 and a["val_loss"] != rows["uniform"]["val_loss"]
    assert a["main_flops"] == pytest.approx(rows["uniform"]["main_flops"])  # the same main budget
    assert "- aioli vs uniform, mean_ppl: " in (tmp_path / "bench" / "results.md").read_text()


def test_a_stopped_bench_keeps_the_rows_it_finished_only_for_the_same_setting(tmp_path):
    from opmix_ray.experiments.bench import fingerprint, finished_rows
    from opmix_ray.storage import write_json
    cfg = load_experiment_config(os.path.join(CONFIGS, "bench_tiny.yaml"))
    rows = [{"method": "opmix", "objective": "mean", "seed": 0}, {"method": "natural", "objective": "any", "seed": 0},
            {"method": "opmix", "objective": "mean", "seed": 7}]
    assert finished_rows(cfg, tmp_path) == []
    write_json(tmp_path / "rows_partial.json", {"fingerprint": fingerprint(cfg), "rows": rows})
    seeds0 = cfg.model_copy(deep=True)
    seeds0.bench.seeds, seeds0.bench.methods = [0], ["uniform", "opmix"]  # which rows to make: not the setting
    seeds0.schedule.methods = ["opmix", "naive"]  # the continual stages: no bench row reads them
    assert finished_rows(seeds0, tmp_path) == rows[:1]
    other = cfg.model_copy(deep=True)
    other.main.lr *= 2  # another setting: nothing kept
    assert finished_rows(other, tmp_path) == []
    write_json(tmp_path / "rows_partial.json", rows)  # no fingerprint: nothing kept
    assert finished_rows(cfg, tmp_path) == []
