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
    ("w_a,w_b,loss_a\n" + "0.5,0.5,1\n" * 6, ["--target", "nope"], "'nope' is not a column"),
    ("w_a,w_b,loss_a\n" + "0.5,-0.5,1\n" * 6, [], "row 1, column w_b: weight -0.5 is negative"),
    ("w_a,w_b,loss_a\n" + "0.5,0.5,1\n" * 3, [], "a fit needs at least 5"),
])
def test_a_bad_table_is_one_line_exit_2(tmp_path, capsys, table, args, why):
    path = tmp_path / "t.csv"
    path.write_text(table)
    assert main(["fit-swarm", str(path), "--out", str(tmp_path / "o.json"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0] and "fix:" in err[0]
    assert not (tmp_path / "o.json").exists()


def _csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))


@pytest.mark.parametrize("column, cell, row", [("w_code", "abc", 7), ("w_books", "", 3), ("loss_math", "nan", 12),
                                               ("loss_web", "inf", 48)])
def test_a_cell_that_is_not_a_finite_number_is_named_by_row_column_and_value(tmp_path, capsys, column, cell, row):
    """One bad cell refuses the table (a text cell used to drop the whole domain, exit 0)."""
    A, L = _swarm(tmp_path / "ok.csv")
    text = (tmp_path / "ok.csv").read_text().splitlines()
    header = [h.strip('"') for h in text[0].split(",")]
    cells = text[row].split(",")
    cells[header.index(column)] = cell
    text[row] = ",".join(cells)
    path = tmp_path / "t.csv"
    path.write_text("\n".join(text) + "\n")
    assert main(["fit-swarm", str(path), "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"row {row}" in err[0] and f"column {column}: {cell!r} is not a finite number" in err[0], err
    assert "fix:" in err[0] and not (tmp_path / "o.json").exists()
    assert "(id run" in err[0]  # the run column names the row too


def test_weights_off_one_are_refused_unless_renormalise(tmp_path, capsys):
    A, L = _swarm(tmp_path / "ok.csv")
    pct = pa.table({**{f"w_{d}": 100 * A[:, i] for i, d in enumerate(DOMS)},
                    **{f"loss_{d}": L[:, i] for i, d in enumerate(DOMS)}})
    pacsv.write_csv(pct, tmp_path / "pct.csv")
    assert main(["fit-swarm", str(tmp_path / "pct.csv"), "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "row 1 has weights summing to 100, and 47 more rows" in err and "--renormalise" in err
    assert main(["fit-swarm", str(tmp_path / "pct.csv"), "--renormalise", "--method", "regmix-linear",
                 "--out", str(tmp_path / "o.json")]) == 0
    printed = capsys.readouterr().out
    assert "note: 48 mixture rows did not sum to 1 and were rescaled (--renormalise)" in printed
    swarm = read_swarm(tmp_path / "pct.csv", renormalise=True)
    np.testing.assert_allclose(swarm.A, A, atol=1e-9)
    assert read_swarm(tmp_path / "ok.csv").renormalised == 0  # CSV rounding stays within the tolerance


# RegMix's public swarm: mixtures and losses in two files joined on `index`, one column per Pile
# domain. A small synthetic pair of the same shape, on a known surface where Pile-CC's loss falls
# mostly with its own weight and a little with the other web-like domains'.
PILE = ("arxiv", "freelaw", "github", "pile_cc", "pubmed_central", "wikipedia_en")
NATURAL = np.array([0.09, 0.05, 0.1, 0.45, 0.15, 0.16])
PILE_GAIN = np.array([0.02, 0.03, 0.01, 0.5, 0.02, 0.12])


def _pile_cc_loss(A):
    return 4.0 - (PILE_GAIN * np.log1p(30 * A) / np.log(31)).sum(axis=1)


def _regmix_pair(tmp, name, n, seed, start=0):
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(np.log(0.3), np.log(5.0), n))[:, None]  # RegMix draws at many concentrations
    A = np.array([rng.dirichlet(np.maximum(s * NATURAL * 6, 1e-3)) for s in scale])
    index = np.arange(start, start + n)
    mix = {"index": index, **{f"train_the_pile_{d}": A[:, i] for i, d in enumerate(PILE)}}
    y = _pile_cc_loss(A) + rng.normal(0, 0.004, n)
    losses = {"index": index, **{f"metric/the_pile_{d}_val_loss": 3.5 + rng.normal(0, 0.05, n) for d in PILE},
              "metric/train_loss": y + 0.1}
    losses["metric/the_pile_pile_cc_val_loss"] = y
    order = rng.permutation(n)  # the losses file is in another order: the join is by index, not by row
    pacsv.write_csv(pa.table(mix), tmp / f"{name}_mix.csv")
    pacsv.write_csv(pa.table({k: np.asarray(v)[order] for k, v in losses.items()}), tmp / f"{name}_loss.csv")
    return A, y


REGMIX_ARGS = ["--id", "index", "--mixture-prefix", "train_the_pile_", "--target", "metric/the_pile_pile_cc_val_loss"]


@pytest.mark.parametrize("method, floor", [("regmix", 0.9), ("regmix-linear", 0.8), ("olmix", 0.9)])
def test_regmix_layout_read_with_the_column_options_and_scored_on_a_held_out_pair(tmp_path, capsys, method, floor):
    _regmix_pair(tmp_path, "train", 256, 0)
    _regmix_pair(tmp_path, "test", 128, 1, start=10_000)
    argv = ["fit-swarm", str(tmp_path / "train_mix.csv"), "--losses", str(tmp_path / "train_loss.csv"), *REGMIX_ARGS,
            "--method", method, "--test", str(tmp_path / "test_mix.csv"), "--test-losses", str(tmp_path / "test_loss.csv")]
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out)  # stdout is the JSON document and nothing else
    assert list(res["mixture"]) == list(PILE) and res["n_runs"] == 256
    assert res["target"] == "metric/the_pile_pile_cc_val_loss"
    t = res["test"]
    assert t["n"] == 128 and t["spearman"] > floor and t["pearson"] > floor and t["mae"] < 0.05, t
    assert res["cv_spearman"] > floor  # Olmix too: its cross-validated Spearman, as RegMix's
    if method == "olmix":
        assert [law["column"] for law in res["laws"]] == ["metric/the_pile_pile_cc_val_loss"]
    assert res["mixture"]["pile_cc"] == max(res["mixture"].values())
    assert not list(tmp_path.glob("*mixture.json"))  # --json without --out writes no file
    assert main(argv + ["--out", str(tmp_path / "p.json")]) == 0
    printed = capsys.readouterr().out
    assert f"held-out {tmp_path / 'test_mix.csv'} + {tmp_path / 'test_loss.csv'} (128 runs): Spearman " \
           f"{t['spearman']:.4f}, Pearson {t['pearson']:.4f}, MAE {t['mae']:.4f}" in printed
    assert f"at the swarm's best run, {res['swarm_best_row']} (measured {res['swarm_best']:.4f})" in printed
    assert res["swarm_best_row"].startswith("row ") and "(id " in res["swarm_best_row"]
    assert json.loads((tmp_path / "p.json").read_text())["test"] == t


def test_regmix_layout_join_errors_name_the_runs(tmp_path, capsys):
    _regmix_pair(tmp_path, "train", 20, 0)
    loss = (tmp_path / "train_loss.csv").read_text().splitlines()
    (tmp_path / "short.csv").write_text("\n".join(loss[:-2]) + "\n")
    (tmp_path / "twice.csv").write_text("\n".join(loss + [loss[1]]) + "\n")
    base = ["fit-swarm", str(tmp_path / "train_mix.csv"), "--out", str(tmp_path / "o.json"), *REGMIX_ARGS]
    for losses, why in (("short.csv", "2 runs have no losses in"), ("twice.csv", "twice"),
                        ("train_loss.csv", None)):
        rc = main([*base, "--losses", str(tmp_path / losses)])
        err = capsys.readouterr().err.strip().splitlines()
        if why is None:
            assert rc == 0 and not err
            (tmp_path / "o.json").unlink()
        else:
            assert rc == 2 and len(err) == 1 and why in err[0] and "--losses" in err[0] and "fix:" in err[0], err
    # --id naming a column one table lacks; --target naming the id or a mixture column
    assert main([*base[:-6], "--losses", str(tmp_path / "train_loss.csv"), "--id", "run",
                 "--mixture-prefix", "train_the_pile_"]) == 2
    assert "data error at --id: " in capsys.readouterr().err


def test_the_target_error_lists_neither_the_id_nor_the_mixture(tmp_path, capsys):
    _regmix_pair(tmp_path, "train", 20, 0)
    rc = main(["fit-swarm", str(tmp_path / "train_mix.csv"), "--losses", str(tmp_path / "train_loss.csv"),
               "--mixture-prefix", "train_the_pile_", "--target", "index", "--out", str(tmp_path / "o.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "data error at --target: 'index' is not a column" in err
    listed = err.split("fix: one of ")[1]
    assert "metric/the_pile_pile_cc_val_loss" in listed and "'index'" not in listed and "train_the_pile" not in listed


def test_olmix_reports_its_cv_spearman_and_its_laws(tmp_path, capsys):
    path = tmp_path / "swarm.csv"
    _swarm(path)
    assert main(["fit-swarm", str(path), "--method", "olmix", "--out", str(tmp_path / "a.json")]) == 0
    printed = capsys.readouterr().out
    assert "5-fold CV Spearman n/a" not in printed and "5-fold CV Spearman 0." in printed
    assert "olmix fitted 4 laws L(w) = exp(c) + exp(t.w): one per loss column (loss_web, loss_code, loss_math, " \
           "loss_books), the objective their mean" in printed
    assert main(["fit-swarm", str(path), "--method", "olmix", "--target", "loss_code", "--out",
                 str(tmp_path / "b.json")]) == 0
    assert "olmix fitted 1 law L(w) = exp(c) + exp(t.w): on loss_code" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text())["cv_spearman"] > 0.7


def test_a_long_domain_name_keeps_the_table_aligned(tmp_path, capsys):
    rng = np.random.default_rng(0)
    names = ("web", "stackexchange_and_ubuntu_irc_logs", "code")
    A = rng.dirichlet(np.ones(3), size=12)
    _csv(tmp_path / "s.csv", [f"w_{d}" for d in names] + ["loss_x"],
         [list(a) + [3 - a[2]] for a in A])
    assert main(["fit-swarm", str(tmp_path / "s.csv"), "--method", "regmix-linear", "--out", str(tmp_path / "o.json")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(rows) == 3 and len({line.rindex(" ") for line in rows}) == 1, rows


def test_predict_takes_a_table_by_column_name_and_checks_an_array(tmp_path):
    A, _ = _swarm(tmp_path / "s.csv")
    swarm = read_swarm(tmp_path / "s.csv")
    model = fit(swarm, "regmix-linear")
    expected = predict(model, A)
    shuffled = {f"w_{d}": A[:, i] for i, d in reversed(list(enumerate(DOMS)))}  # the swarm's names, any order
    np.testing.assert_allclose(predict(model, shuffled), expected)
    np.testing.assert_allclose(predict(model, pa.table({d: A[:, i] for i, d in enumerate(DOMS)})), expected)
    np.testing.assert_allclose(predict(model, swarm), expected)
    np.testing.assert_allclose(predict(model, A[0]), expected[:1])
    with pytest.raises(ValueError, match=r"rows of 4 weights in the order \['web', 'code', 'math', 'books'\]"):
        predict(model, A[:, :3])
    with pytest.raises(ValueError, match=r"no column for the domains \['books'\]"):
        predict(model, {f"w_{d}": A[:, i] for i, d in enumerate(DOMS[:3])})


def test_public_functions_are_documented():
    from opmix_ray.experiments import swarm_fit
    for name in ("read_swarm", "fit", "predict", "propose", "evaluate", "cross_validate"):
        assert (getattr(swarm_fit, name).__doc__ or "").strip(), name


def test_mixture_columns_by_name_and_a_test_table_that_does_not_match(tmp_path, capsys):
    A, L = _swarm(tmp_path / "s.csv")
    swarm = read_swarm(tmp_path / "s.csv", mixture_columns=["w_books", "w_web", "w_code", "w_math"])
    assert swarm.domains == ("books", "web", "code", "math")
    np.testing.assert_allclose(swarm.A[:, 0], A[:, 3])
    out = str(tmp_path / "o.json")
    assert main(["fit-swarm", str(tmp_path / "s.csv"), "--mixture-columns", "w_web,w_nope", "--out", out]) == 2
    assert "data error at --mixture-columns: ['w_nope'] are not columns of" in capsys.readouterr().err
    _csv(tmp_path / "other.csv", ["w_web", "w_code", "w_math", "w_news", "loss_web", "loss_code", "loss_math",
                                  "loss_books"], [[0.25] * 4 + [1.0] * 4] * 6)
    assert main(["fit-swarm", str(tmp_path / "s.csv"), "--test", str(tmp_path / "other.csv"), "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data error at --test: its domains" in err[0] and "news" in err[0]
    assert main(["fit-swarm", str(tmp_path / "s.csv"), "--test-losses", str(tmp_path / "other.csv"), "--out", out]) == 2
    assert "--test-losses: given without --test" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
