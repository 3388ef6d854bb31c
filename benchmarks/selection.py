"""Which way of picking the mixture from merged candidates trains better: TPE's argmin or the mixing law.

    .venv/bin/python benchmarks/selection.py --levers bench_runs/levers_v2 --seeds 0 1
        # the default proxy's adapters (--variant); 24 exact 240-step continuations: about an hour on 2 cores

On each base run's round 0 (made by benchmarks/fidelity_levers.py in --levers), with one proxy
variant's adapters and per objective (mean, target):
  tpe         optuna-tpe scores `--samples` merged candidates on the selection windows (the round's warm
              starts first, as the engine runs it) and the best-scoring one is picked;
  mixing-law  the reference's selection: Dirichlet merges within the caps (`--samples` of them, warm
              starts included), a log-linear law per domain fitted to them, and its KL-regularised
              proposal (lambda 0.05, the reference's prior) is picked; also the best of its own draws.
Beside them, "stay within caps" (decision.stay_within_caps: the current mixture within the caps left,
what a round that does not move pushes). Each pick is then trained for real (the exact continuation of the main run to the next boundary, on
2 truth seeds), beside stay. Writes OUT/selection.json and prints, per (seed, objective, method), the
pick's true loss, its gain over stay, and the regret against the best true loss of the 16 fidelity
candidates and the picks together.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity_levers import VARIANTS, _search_overrides, adapter_key, train_variant  # noqa: E402

from opmix_ray.engine.scoring import candidate_mixture, score  # noqa: E402
from opmix_ray.engine.search import warm_starts  # noqa: E402
from opmix_ray.evaluate import objective  # noqa: E402
from opmix_ray.experiments.fidelity import round_proxy, truths  # noqa: E402
from opmix_ray.searchers import create_searcher  # noqa: E402
from opmix_ray.storage import read_json, write_json  # noqa: E402


def pick(rp, method: str, weights: dict[str, float], samples: int, seed: int) -> dict:
    """Run one selection method on the round's merged candidates; its pick and what it saw."""
    cands, cfg = rp.candidates, rp.cfg
    cands.objective_weights = weights
    space = cands.space
    name = "optuna-tpe" if method == "tpe" else "mixing-law"
    opts = {"n_init": samples} if method != "tpe" else {}
    searcher = create_searcher(name, space=space, seed=seed, points_to_evaluate=warm_starts(cfg, space) or None,
                               objective_weights=weights, **opts)
    seen = []
    for i in range(samples):
        tid = f"t{i}"
        params = searcher.suggest(tid)
        a = space.weights(params)
        row = score(cands, a)
        searcher.on_trial_complete(tid, row)
        seen.append((a, row["objective"]))
    best_a, best_v = min(seen, key=lambda x: x[1])
    out = {"method": method, "n_scored": len(seen), "best_trial_a": best_a.tolist(), "best_trial_proxy": best_v}
    if method == "tpe":
        out["a"] = best_a.tolist()
    else:
        law = searcher.law_proposal()
        out.update(a=law["w"], law={k: v for k, v in law.items() if k != "w"})
    out["mixture"] = candidate_mixture(cands, np.asarray(out["a"])).as_dict()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levers", required=True, type=Path, help="fidelity_levers.py's --out dir")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variant", choices=list(VARIANTS), default="shared init, 2x current lr, wd .01, c 1, raw")
    ap.add_argument("--samples", type=int, default=16, help="merged candidates each method scores")
    ap.add_argument("--out", type=Path, help="default: LEVERS/selection.json")
    args = ap.parse_args()
    ov = VARIANTS[args.variant]
    out_file = args.out or args.levers / "selection.json"
    rows, t0 = [], time.time()
    for seed in args.seeds:
        run_dir = args.levers / "runs" / f"bench-s{seed}"
        fid = read_json(run_dir / "fidelity_round_0.json")
        dirs = train_variant(run_dir, ov, args.levers / "adapters" / run_dir.name / adapter_key(ov))
        rp = round_proxy(run_dir, 0, _search_overrides(run_dir, ov), dirs)
        doms, targets = list(rp.shards.domains), list(rp.shards.eval_only)
        objs = {"mean": {d: 1.0 for d in doms}, **({"target": {d: 1.0 for d in targets}} if targets else {})}
        picks = [(obj, pick(rp, m, w, args.samples, 1000 * seed + j)) for obj, w in objs.items()
                 for j, m in enumerate(("tpe", "mixing-law"))]
        # what a round that does not move pushes: the current mixture within the caps left
        from opmix_ray.engine.rule import reference_mixture
        ref = reference_mixture(rp.candidates.current.as_dict(), rp.candidates.caps_share)
        picks += [(obj, {"method": "stay within caps", "mixture": ref, "a": None}) for obj in objs]
        from opmix_ray.mixture import Mixture
        measured = truths(rp, [Mixture.from_dict(p["mixture"], rp.shards.domains) for _, p in picks], 2)
        stay = next(c for c in fid["candidates"] if c["label"] == "stay")
        for (obj, p), t in zip(picks, measured):
            w = objs[obj]
            true = float(np.mean([objective(x, w) for x in t]))
            pool = [objective(c["truth_mean"], w) for c in fid["candidates"]]
            pool += [float(np.mean([objective(x, objs[o]) for x in tt])) for (o, _), tt in zip(picks, measured)
                     if o == obj]
            row = {"seed": seed, "objective": obj, "variant": args.variant, **p, "truth": t, "true_loss": true,
                   "gain_over_stay": objective(stay["truth_mean"], w) - true, "regret": true - min(pool)}
            rows.append(row)
            law = p.get("law") or {}
            print(f"s{seed} {obj:<6} {p['method']:<10} true {true:.4f} gain over stay {row['gain_over_stay']:+.4f} "
                  f"regret {row['regret']:.4f}" + (f" | law loo Spearman {law.get('loo_spearman')}" if law else "")
                  + f" | {', '.join(f'{d} {x:.2f}' for d, x in p['mixture'].items())}", flush=True)
        write_json(out_file, {"rows": rows, "wall_s": time.time() - t0, "load_avg": os.getloadavg(),
                              "command": " ".join(sys.argv)})
    print(f"wrote {out_file} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
