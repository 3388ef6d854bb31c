"""`opmix-ray fit-swarm TABLE`: RegMix or Olmix fitted on your own swarm (experiments/swarm_fit.py).

    opmix-ray fit-swarm swarm.csv --method regmix --out proposal.json
    opmix-ray fit-swarm swarm.parquet --method olmix --target loss_python --prior prior.yaml --no-bounds
"""
from __future__ import annotations

import json
from pathlib import Path


def cmd_fit_swarm(args) -> int:
    import yaml

    from opmix_ray.errors import DataError
    from opmix_ray.experiments.swarm_fit import fit, propose, read_swarm
    from opmix_ray.storage import atomic_write_bytes
    out = Path(args.out) if args.out else Path(f"{Path(args.table).stem}_{args.method}_mixture.json")
    if out.exists():  # never replace what a user owns
        raise DataError(f"data error at --out: {out} already exists (fix: pass another --out; nothing was written)")
    prior = args.prior
    if prior not in ("natural", "uniform"):
        try:
            prior = yaml.safe_load(Path(prior).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise DataError(f"data error at --prior: cannot read {args.prior} ({type(exc).__name__}) (fix: natural, "
                            "uniform, or a YAML/JSON file mapping domain: weight)") from None
        if not isinstance(prior, dict):
            raise DataError(f"data error at --prior: {args.prior} is not a mapping (fix: domain: weight per line)")
    lgbm = {}
    for pair in args.lgbm or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise DataError(f"data error at --lgbm {pair}: expected KEY=VALUE (fix: e.g. --lgbm num_leaves=15)")
        lgbm[key] = yaml.safe_load(value)
    from opmix_ray.experiments.config import LGBM_PARAMS
    swarm = read_swarm(args.table, args.target)
    model = fit(swarm, args.method, args.seed, {**LGBM_PARAMS, **lgbm}, args.lgbm_rounds)
    res = propose(model, swarm, prior, bounds=not args.no_bounds, seed=args.seed)
    cv = "n/a (Olmix)" if res["cv_spearman"] is None else f"{res['cv_spearman']:.3f}"
    print(f"{args.method} on {res['n_runs']} runs of {args.table}, objective {res['target']}: "
          f"5-fold CV Spearman {cv}; predicted {res['predicted']:.4f} (best run {res['swarm_best']:.4f})")
    for d, w in res["mixture"].items():
        print(f"  {d:<16} {w:.4f}")
    atomic_write_bytes(out, json.dumps(res, indent=1).encode())
    print(f"wrote {out}")
    return 0
