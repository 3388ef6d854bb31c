"""`opmix-ray fit-swarm TABLE`: RegMix or Olmix fitted on your own swarm (experiments/swarm_fit.py).

    opmix-ray fit-swarm swarm.csv --method regmix --out proposal.json
    opmix-ray fit-swarm swarm.parquet --method olmix --target loss_python --prior prior.yaml --no-bounds
    opmix-ray fit-swarm mix.csv --losses losses.csv --id index --mixture-prefix train_the_pile_ \\
        --target metric/the_pile_pile_cc_val_loss --test test_mix.csv --test-losses test_losses.csv --json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

METHODS = ("regmix", "regmix-linear", "olmix")


def add_parser(sub) -> None:
    fs = sub.add_parser("fit-swarm", help="fit RegMix or Olmix on your own swarm (a table of mixtures and losses)")
    fs.add_argument("table", help="CSV or parquet, one row per run: the mixture columns (and the losses, unless "
                    "--losses names their table)")
    fs.add_argument("--method", choices=METHODS, default="regmix")
    cols = fs.add_argument_group("columns")
    cols.add_argument("--losses", metavar="TABLE", help="a second table holding the losses, joined to TABLE on --id")
    cols.add_argument("--id", metavar="COLUMN", help="the run id column (default: one named index, id, run_id or "
                      "run); joins --losses and names rows in errors")
    cols.add_argument("--mixture-prefix", default="w_", metavar="PREFIX", help="mixture columns are those starting "
                      "with PREFIX; the rest of the name is the domain (default w_)")
    cols.add_argument("--mixture-columns", metavar="A,B,...", help="the mixture columns by name, instead of a prefix")
    cols.add_argument("--loss-prefix", default="loss_", metavar="PREFIX", help="loss columns, whose mean is the "
                      "objective without --target and each of which gets an Olmix law (default loss_)")
    cols.add_argument("--target", metavar="COLUMN", help="the objective's column (default: the mean of the loss "
                      "columns)")
    cols.add_argument("--renormalise", action="store_true", help="rescale mixture rows that do not sum to 1 "
                      "(otherwise such a row is refused)")
    fs.add_argument("--test", metavar="TABLE", help="a held-out swarm in the same layout: print the fitted "
                    "model's Spearman, Pearson and MAE on it")
    fs.add_argument("--test-losses", metavar="TABLE", help="the held-out swarm's losses table (with --losses)")
    fs.add_argument("--prior", default="natural", help="natural (the swarm's mean mixture), uniform, or a YAML file")
    fs.add_argument("--no-bounds", action="store_true", help="drop RegMix's usage bound w_d <= 15 x prior_d")
    fs.add_argument("--lgbm", action="append", metavar="KEY=VALUE", help="a LightGBM parameter (regmix)")
    fs.add_argument("--lgbm-rounds", type=int, default=None, help="LightGBM boosting rounds (default 300)")
    fs.add_argument("--seed", type=int, default=0)
    fs.add_argument("--out", help="where the proposal goes (default ./<table>_<method>_mixture.json, not written "
                    "with --json unless given; never replaced)")
    fs.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout")
    fs.set_defaults(fn=cmd_fit_swarm)


def _prior(arg: str):
    import yaml

    from opmix_ray.errors import DataError
    if arg in ("natural", "uniform"):
        return arg
    try:
        prior = yaml.safe_load(Path(arg).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"data error at --prior: cannot read {arg} ({type(exc).__name__}) (fix: natural, "
                        "uniform, or a YAML/JSON file mapping domain: weight)") from None
    if not isinstance(prior, dict):
        raise DataError(f"data error at --prior: {arg} is not a mapping (fix: domain: weight per line)")
    return prior


def _lgbm(args) -> dict:
    import yaml

    from opmix_ray.errors import DataError
    from opmix_ray.experiments.experiment_config import LGBM_PARAMS
    out = {}
    for pair in args.lgbm or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DataError(f"data error at --lgbm {pair}: expected KEY=VALUE (fix: e.g. --lgbm num_leaves=15)")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise DataError(f"data error at --lgbm {pair}: {value!r} is not a value (fix: e.g. --lgbm "
                            "num_leaves=15)") from None
    if args.lgbm_rounds is not None and args.lgbm_rounds < 1:
        raise DataError(f"data error at --lgbm-rounds: {args.lgbm_rounds} (fix: a whole number >= 1)")
    return {**LGBM_PARAMS, **out}


def _read(args, table: str, losses: str | None, names: tuple[str, str]):
    from opmix_ray.experiments.swarm_fit import read_swarm
    cols = [c.strip() for c in args.mixture_columns.split(",") if c.strip()] if args.mixture_columns else None
    return read_swarm(table, args.target, losses=losses, id_column=args.id, mixture_prefix=args.mixture_prefix,
                      mixture_columns=cols, loss_prefix=args.loss_prefix, renormalise=args.renormalise,
                      field_names=names)


def _check_test(swarm, test, args) -> None:
    from opmix_ray.errors import DataError
    if set(test.domains) != set(swarm.domains):
        raise DataError(f"data error at --test: its domains {sorted(test.domains)} are not the swarm's "
                        f"{sorted(swarm.domains)} (fix: a held-out table with the same mixture columns)")
    if test.target is None and set(test.loss_columns()) != set(swarm.loss_columns()):
        raise DataError(f"data error at --test: its loss columns {test.loss_columns()} are not the swarm's "
                        f"{swarm.loss_columns()}, so the objective differs (fix: the same loss columns, or --target)")


def _fit(swarm, args, lgbm):
    from opmix_ray.errors import DataError
    from opmix_ray.experiments.swarm_fit import fit
    try:
        return fit(swarm, args.method, args.seed, lgbm, args.lgbm_rounds)
    except Exception as exc:  # LightGBM refuses a parameter only when it trains
        if type(exc).__name__ != "LightGBMError":
            raise
        raise DataError(f"data error at --lgbm: LightGBM refused the parameters ({' '.join(str(exc).split())[:160]}) "
                        "(fix: see LightGBM's parameter list)") from None


def _summary(res: dict, args, swarm) -> list[str]:
    cv = "n/a" if res["cv_spearman"] is None else f"{res['cv_spearman']:.4f}"
    lines = [f"{args.method} on {res['n_runs']} runs of {swarm.source}, objective {res['target']}: "
             f"5-fold CV Spearman {cv}"]
    if res.get("laws"):
        laws = [law["column"] for law in res["laws"]]
        lines.append(f"olmix fitted {len(laws)} law{'s' if len(laws) > 1 else ''} L(w) = exp(c) + exp(t.w): "
                     + (f"one per loss column ({', '.join(laws)}), the objective their mean" if len(laws) > 1
                        else f"on {laws[0]}"))
    lines.append(f"predicted objective: {res['predicted']:.4f} at the proposal, {res['swarm_best_predicted']:.4f} at "
                 f"the swarm's best run, {res['swarm_best_row']} (measured {res['swarm_best']:.4f})")
    if "test" in res:
        t = res["test"]
        f = lambda v: "n/a" if v is None else f"{v:.4f}"
        lines.append(f"held-out {t['table']} ({t['n']} runs): Spearman {f(t['spearman'])}, Pearson "
                     f"{f(t['pearson'])}, MAE {t['mae']:.4f}")
    if swarm.renormalised:
        lines.append(f"note: {swarm.renormalised} mixture rows did not sum to 1 and were rescaled (--renormalise)")
    width = max(len(d) for d in res["mixture"]) + 2
    lines += [f"  {d:<{width}} {w:.4f}" for d, w in res["mixture"].items()]
    return lines


def cmd_fit_swarm(args) -> int:
    from opmix_ray.errors import DataError
    from opmix_ray.experiments.swarm_fit import evaluate, propose
    from opmix_ray.storage import atomic_write_bytes
    out = Path(args.out) if args.out else None if args.json else \
        Path(f"{Path(args.table).stem}_{args.method}_mixture.json")
    if out is not None and out.exists():  # never replace what a user owns
        raise DataError(f"data error at --out: {out} already exists (fix: pass another --out; nothing was written)")
    if args.test_losses and not args.test:
        raise DataError("data error at --test-losses: given without --test (fix: --test TABLE --test-losses TABLE)")
    prior, lgbm = _prior(args.prior), _lgbm(args)
    swarm = _read(args, args.table, args.losses, ("TABLE", "--losses"))
    test = _read(args, args.test, args.test_losses, ("--test", "--test-losses")) if args.test else None
    if test is not None:
        _check_test(swarm, test, args)
    model = _fit(swarm, args, lgbm)
    res = propose(model, swarm, prior, bounds=not args.no_bounds, seed=args.seed)
    if test is not None:
        res["test"] = {"table": test.source, **evaluate(model, test)}
    doc = json.dumps(res, indent=1)
    if args.json:
        print(doc)
    else:
        print("\n".join(_summary(res, args, swarm)))
    if out is not None:
        atomic_write_bytes(out, doc.encode())
        print(f"wrote {out}", file=sys.stderr if args.json else sys.stdout)
    return 0
