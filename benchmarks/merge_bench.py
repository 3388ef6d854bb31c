"""Put a new `opmix-ray bench` run beside the methods of an earlier one, after checking they are comparable.

    .venv/bin/python benchmarks/merge_bench.py NEW_OUT OLD_RESULTS.json --rename opmix=opmix-v1 --out DIR

A bench run is deterministic given (config, seed, code of the method): a method whose code did
not change gives the same figures in a later run. This script takes every row of NEW_OUT, and
from OLD_RESULTS the rows of methods NEW_OUT did not run (renamed as asked, e.g. the earlier
OP-Mix as "opmix-v1") plus the oracle, and writes the merged results.json, results.md and PNGs.
It refuses to merge unless every method present in both (uniform and natural at least) has the
same per-domain val loss in both, to 1e-9: that is the proof the data, model and training are
the same, so the carried rows are what a full rerun would have printed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opmix_ray.experiments.bench_report import label, write_report  # noqa: E402
from opmix_ray.storage import write_json  # noqa: E402


def checks(result: dict) -> list[str]:
    """The bars OP-Mix is held to, per seed: vs uniform (mean), the share of the oracle's target
    headroom over uniform it captures, vs natural, and pushed shares against the caps left."""
    by = {(label(r), r["seed"]): r for r in result["rows"]}
    seeds = sorted({r["seed"] for r in result["rows"]})
    oracle = result.get("oracle") or []
    best_t = min((o["target_ppl"] for o in oracle), default=None)
    out = []
    for m in ("opmix", "opmix-v1"):
        for s in seeds:
            u, n = by.get(("uniform", s)), by.get(("natural", s))
            om, ot = by.get((f"{m} (mean)", s)), by.get((f"{m} (target)", s))
            if not (u and om and ot):
                continue
            line = (f"- {m} seed {s}: mean ppl {om['mean_ppl']:.2f} vs uniform {u['mean_ppl']:.2f} "
                    f"({100 * (om['mean_ppl'] / u['mean_ppl'] - 1):+.2f}%), vs natural {n['mean_ppl']:.2f} "
                    f"({100 * (om['mean_ppl'] / n['mean_ppl'] - 1):+.2f}%); target ppl {ot['target_ppl']:.2f} vs "
                    f"uniform {u['target_ppl']:.2f} ({100 * (ot['target_ppl'] / u['target_ppl'] - 1):+.2f}%)")
            if best_t is not None and s == oracle[0]["seed"]:
                line += f", {100 * (u['target_ppl'] - ot['target_ppl']) / (u['target_ppl'] - best_t):.0f}% of the oracle's headroom"
            out.append(line)
    for r in result["rows"]:
        if r["method"] != "opmix" or not r.get("run_dir") or "carried_from" in r:
            continue
        hist = json.loads((Path(r["run_dir"]) / "history.json").read_text())
        for rec in hist["rounds"]:
            caps = rec.get("cap_shares") or {}
            over = {d: round(rec["weights"][d] - c, 4) for d, c in caps.items() if rec["weights"][d] > c + 1e-6}
            d = rec.get("decision") or {}
            out.append(f"- {label(r)} seed {r['seed']} round {rec['round']}: {'moved' if d.get('moved') else 'stayed'}"
                       f" ({d.get('reason', '')}); pushed over a cap: {over or 'none'}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("new_out")
    ap.add_argument("old_results")
    ap.add_argument("--rename", action="append", default=[], help="OLD=NEW method name for carried rows")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    new = json.loads((Path(args.new_out) / "results.json").read_text())
    old = json.loads(Path(args.old_results).read_text())
    rename = dict(r.split("=", 1) for r in args.rename)
    new_methods = {r["method"] for r in new["rows"]}
    by_old = {(label(r), r["seed"]): r for r in old["rows"]}
    checked = []
    for r in new["rows"]:
        o = by_old.get((label(r), r["seed"]))
        if o is None or r["method"] in rename:
            continue
        gap = max(abs(r["val_loss"][d] - o["val_loss"][d]) for d in r["val_loss"])
        if gap > 1e-9:
            raise SystemExit(f"{label(r)} seed {r['seed']} differs from the earlier run by {gap:.3g} nats: "
                             "not the same data/model/training, refusing to merge")
        checked.append(f"{label(r)} s{r['seed']}")
    if not checked:
        raise SystemExit("no method is in both runs: nothing proves they are comparable")
    carried = []
    for r in old["rows"]:
        m = rename.get(r["method"], r["method"])
        if m in new_methods and r["method"] not in rename:
            continue
        if r["method"] in new_methods and r["method"] not in rename:
            continue
        carried.append({**r, "method": m, "carried_from": args.old_results})
    merged = {**new, "rows": new["rows"] + carried, "oracle": new.get("oracle") or old.get("oracle"),
              "fidelity": new.get("fidelity") or old.get("fidelity"),
              "merge": {"new": args.new_out, "old": args.old_results, "rename": rename, "identical": checked}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", merged)
    write_report(merged, out)
    lines = checks(merged)
    (out / "checks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"identical in both runs: {', '.join(checked)}; carried {len(carried)} rows; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
