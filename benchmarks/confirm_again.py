"""Run every confirmed round of finished OP-Mix runs again with today's confirmation rule.

    .venv/bin/python benchmarks/confirm_again.py RUN_DIR [RUN_DIR ...] --out results/confirm_again.json

For each round whose decision went to the confirmation adapter, it trains that adapter again on the
round's checkpoint with the run's own config (and the stay's adapter, when staying pushes another
mixture than the current one), applies engine/confirm.py's rule, and records the run's own verdict
beside the new one. The confirmation adapter's objective must come out as recorded (same init,
data seed and steps): that shows the rerun is the same adapter.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opmix_ray.config import load_config  # noqa: E402
from opmix_ray.data.read import build_shards  # noqa: E402
from opmix_ray.engine.adapters import adapter_lr  # noqa: E402
from opmix_ray.engine.confirm import confirm_rule, confirm_windows  # noqa: E402
from opmix_ray.engine.main_run import checkpoint_path  # noqa: E402
from opmix_ray.storage import write_json  # noqa: E402


def rounds_again(run_dir: str) -> list[dict]:
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    shards = build_shards(cfg)
    weights = cfg.search.objective_weights or {d: 1.0 for d in shards.domains}
    out = []
    for r in json.loads(Path(run_dir, "history.json").read_text())["rounds"]:
        d, k = r["decision"], r["round"]
        if not d.get("confirm"):
            continue
        adir = Path(run_dir, f"adapters_round_{k}", "adapters")
        dirs = {n: str(adir / n) for n in os.listdir(adir)}
        state = json.loads(Path(checkpoint_path(run_dir, k), "train_state.json").read_text())
        win = confirm_windows(cfg, shards, checkpoint_path(run_dir, k), d["leader_mixture"],
                              adapter_lr(cfg, state["info"].get("lr")), k, dirs, cpus=2, stay=d.get("stay_mixture"))
        moved, reason, fig = confirm_rule(win, weights, cfg.decision.k)
        out.append({"run": Path(run_dir).name, "round": k, "recorded_moved": d["moved"],
                    "recorded_reason": d["reason"], "recorded_confirm_objective": d["confirm"]["confirm_objective"],
                    "confirm_objective": fig["confirm_objective"], "moved": moved, "reason": reason,
                    "gain": fig["gain"], "se": fig["se"]})
        print(f"{Path(run_dir).name} round {k}: {reason}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = [row for rd in args.run_dirs for row in rounds_again(rd)]
    write_json(args.out, {"command": "benchmarks/confirm_again.py " + " ".join(Path(r).name for r in args.run_dirs),
                          "rounds": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
