"""fit-swarm: RegMix and Olmix fitted on a user's own table of mixtures and losses, as a library and
as a command. The swarm here has a known loss surface, so the proposals can be checked against it."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from opmix_ray.cli.main import main
from opmix_ray.experiments.swarm_fit import fit, predict, propose, read_swarm

DOMS = ("web", "code", "math", "books")
GAIN = np.array([0.3, 0.9, 0.6, 0.2])  # code helps most


def true_losses(A):
    """Diminishing returns per domain: loss_d = 3 - GAIN_d * log(1 + 20 w_d) / log(21)."""
    return 3.0 - GAIN * np.log1p(20 * A) / np.log(21)


def _swarm(path, n=48, seed=0, fmt="csv"):
    rng = np.random.default_rng(seed)
    A = rng.dirichlet(np.ones(len(DOMS)), size=n)
    L = true_losses(A) + rng.normal(0, 0.002, size=A.shape)
    cols = {f"w_{d}": A[:, i] for i, d in enumerate(DOMS)}
    cols.update({f"loss_{d}": L[:, i] for i, d in enumerate(DOMS)})
    cols["run"] = [f"run{i}" for i in range(n)]  # a text column is ignored
    table = pa.table(cols)
    pq.write_table(table, path) if fmt == "parquet" else pacsv.write_csv(table, path)
    return A, L


@pytest.mark.parametrize("method, fmt", [("regmix", "csv"), ("regmix-linear", "parquet"), ("olmix", "csv")])
def test_the_proposal_beats_most_of_the_swarm_on_the_true_surface(tmp_path, method, fmt):
    path = tmp_path / f"swarm.{fmt}"
    A, L = _swarm(path, fmt=fmt)
    swarm = read_swarm(path)
    assert swarm.domains == DOMS and swarm.A.shape == (48, 4) and "run" not in swarm.columns
    model = fit(swarm, method)
    assert predict(model, swarm.A).shape == (48,)
    res = propose(model, swarm, prior="uniform", simulations=20_000)
    w = np.array([res["mixture"][d] for d in DOMS])
    true = true_losses(w[None]).mean()
    assert w.sum() == pytest.approx(1)
    if method == "regmix-linear":  # a line cannot see diminishing returns: it piles onto the best slope
        assert max(res["mixture"], key=res["mixture"].get) == "code"
    else:
        assert true < np.quantile(L.mean(axis=1), 0.25), (res, true)
    if method != "olmix":
        assert res["cv_spearman"] > 0.7


def test_usage_bounds_cap_a_domain_the_prior_makes_rare(tmp_path):
    path = tmp_path / "swarm.csv"
    _swarm(path)
    swarm = read_swarm(path)
    prior = {"web": 0.4, "code": 0.01, "math": 0.3, "books": 0.29}
    model = fit(swarm, "regmix-linear")
    bounded = propose(model, swarm, prior=prior, simulations=20_000)
    free = propose(model, swarm, prior=prior, bounds=False, simulations=20_000)
    assert bounded["mixture"]["code"] <= 15 * 0.01 / sum(prior.values()) + 1e-9
    assert free["mixture"]["code"] > bounded["mixture"]["code"]


def test_the_command_prints_writes_and_never_replaces(tmp_path, capsys):
    path = tmp_path / "swarm.csv"
    _swarm(path)
    out = tmp_path / "p.json"
    assert main(["fit-swarm", str(path), "--method", "regmix", "--out", str(out), "--target", "loss_code",
                 "--lgbm", "num_leaves=5", "--prior", "uniform"]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert "CV Spearman" in printed and res["target"] == "loss_code" and set(res["mixture"]) == set(DOMS)
    assert res["mixture"]["code"] == max(res["mixture"].values())  # the objective is code's own loss
    assert main(["fit-swarm", str(path), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("table, args, why", [
    ("w_a,loss_a\n0.5,1\n", [], "mixture columns"),
    ("w_a,w_b,loss_a\n" + "0.5,0.5,1\n" * 6, ["--target", "nope"], "not a numeric column"),
    ("w_a,w_b,loss_a\n" + "0.5,-0.5,1\n" * 6, [], "weights are not >= 0"),
    ("w_a,w_b,loss_a\n" + "0.5,0.5,1\n" * 3, [], "a fit needs at least 5"),
])
def test_a_bad_table_is_one_line_exit_2(tmp_path, capsys, table, args, why):
    path = tmp_path / "t.csv"
    path.write_text(table)
    assert main(["fit-swarm", str(path), "--out", str(tmp_path / "o.json"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0] and "fix:" in err[0]
    assert not (tmp_path / "o.json").exists()
