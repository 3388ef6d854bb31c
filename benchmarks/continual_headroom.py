"""Headroom of a continual stage: does any mixture beat uniform over the seen domains beyond noise?

    .venv/bin/python benchmarks/continual_headroom.py opmix_ray/configs/continual.yaml --seed 0 \
        --stages 2 4 --out benchmarks/results/continual/headroom_s0.json

A continual method can only beat uniform-seen (every current domain at an equal share, from the
last checkpoint) by more than the noise if some mixture of the stage does. This measures it the way
`opmix-ray headroom` does for a single run, at chosen stages of a `opmix-ray continual` sequence:

  1. stage 0 pretrains as `opmix-ray continual` does (same seed, split and data order); every
     stage up to the last one asked for trains uniform-seen, so each measured stage starts from the
     checkpoint uniform-seen (and every OP-Mix stage that stays) starts it from;
  2. at a measured stage, on the stage's own data order (order 0): uniform-seen; the new data at
     each share of --shares with the rest split equally over the old domains (OP-Mix's {old, new}
     search space, from uniform-seen's carried mixture); natural-seen (token shares); and --draws
     Dirichlet(1) mixtures over the seen domains (outside OP-Mix's space);
  3. the best mixture on order 0 (the oracle's pick) and uniform-seen on orders 1..--orders.

With d_j = mean val loss over the seen domains of the pick minus uniform-seen's on order j:
noise_sd = sd of d_j, gain = -mean d_j, ratio = gain / noise_sd. A ratio under 3 means no method can
be shown to beat uniform-seen at that stage: the best possible mixture does not clear the noise.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opmix_ray.experiments.continual import schedule_steps, stage_data_seed  # noqa: E402
from opmix_ray.experiments.experiment_config import load_experiment_config  # noqa: E402
from opmix_ray.storage import write_json  # noqa: E402


def stage_mixtures(seen: list[str], new: list[str], tokens: dict[str, int], shares: list[float], draws: int,
                   rng: np.random.Generator) -> list[tuple[str, dict[str, float], bool]]:
    """(label, weights over the seen domains, inside OP-Mix's {old, new} space) for one stage."""
    old = [d for d in seen if d not in new]
    out = [("uniform-seen", {d: 1 / len(seen) for d in seen}, True)]
    for s in shares:
        out.append((f"new_{s:g}", {**{d: (1 - s) / len(old) for d in old}, **{d: s / len(new) for d in new}}, True))
    total = sum(tokens[d] for d in seen)
    out.append(("natural-seen", {d: tokens[d] / total for d in seen}, False))
    for i in range(draws):
        out.append((f"draw_{i}", dict(zip(seen, map(float, rng.dirichlet(np.ones(len(seen)))))), False))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", type=int, nargs="+", required=True, help="the stages to measure (1 = first arrival)")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.05, 0.1, 0.3, 0.45, 0.6])
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--orders", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from opmix_ray.data.read import build_shards
    from opmix_ray.ray_init import init_ray
    from opmix_ray.training import fixed_job, run_fixed_jobs

    t0 = time.time()
    cfg = load_experiment_config(args.config)
    cfg.run.seed, cfg.schedule.seeds = args.seed, []
    steps = schedule_steps(cfg)
    cfg.data.domains = list(dict.fromkeys(d for st in steps for d in st["new"] + st["current"]))
    shards = build_shards(cfg)
    doms, tokens = shards.domains, shards.train_tokens()
    work = Path(args.out).with_suffix("").resolve()  # checkpoints and Tune's files, beside the result
    init_ray(cfg)
    rng = np.random.default_rng(args.seed)

    def job(weights, s, order, init, save=None, **labels):
        w = {d: weights.get(d, 0.0) for d in doms}
        return fixed_job(cfg, args.seed, shards, w, data_seed=stage_data_seed(args.seed, s, order),
                         tokens=cfg.schedule.stages[s].tokens, init_path=init, save_path=save, stage=s,
                         order=order, **labels)

    def mean_loss(row, seen):
        return float(np.mean([row["val_loss"][d] for d in seen]))

    st0 = cfg.schedule.stages[0]
    ckpt = str(work / "stage_0")
    run_fixed_jobs([job(dict.fromkeys(st0.add, 1 / len(st0.add)), 0, 0, cfg.model.path, ckpt)],
                   shards, str(work / "tune"), "stage_0", 1)
    stages = []
    for s in range(1, max(args.stages) + 1):
        seen, new = steps[s]["current"], steps[s]["new"]
        save = str(work / f"stage_{s}")
        uniform = {d: 1 / len(seen) for d in seen}
        if s not in args.stages:
            run_fixed_jobs([job(uniform, s, 0, ckpt, save)], shards, str(work / "tune"), f"stage_{s}", 1)
            ckpt = save
            print(f"stage {s}: uniform-seen trained", flush=True)
            continue
        mixes = stage_mixtures(seen, new, tokens, args.shares, args.draws, rng)
        jobs = [job(w, s, 0, ckpt, save if lab == "uniform-seen" else None, label=lab) for lab, w, _ in mixes]
        order0 = {lab: mean_loss(r, seen) for (lab, _, _), r in
                  zip(mixes, run_fixed_jobs(jobs, shards, str(work / "tune"), f"stage_{s}_order0", 2))}
        pick = min((lab for lab, _, _ in mixes if lab != "uniform-seen"), key=order0.get)
        by_label = {lab: w for lab, w, _ in mixes}
        more = [job(by_label[lab], s, k, ckpt, label=lab) for k in range(1, args.orders + 1)
                for lab in ("uniform-seen", pick)]
        rows = run_fixed_jobs(more, shards, str(work / "tune"), f"stage_{s}_orders", 2)
        uni = [mean_loss(r, seen) for r in rows[0::2]]
        best = [mean_loss(r, seen) for r in rows[1::2]]
        d = np.array(best) - np.array(uni)
        sd = float(np.std(d, ddof=1))
        gain = float(-d.mean())
        stages.append({"stage": s, "label": steps[s]["label"], "seen": seen, "new": new,
                       "mixtures": [{"label": lab, "weights": w, "in_opmix_space": inside, "order0": order0[lab]}
                                    for lab, w, inside in mixes],
                       "pick": pick, "pick_in_opmix_space": dict((m[0], m[2]) for m in mixes)[pick],
                       "order0_gain": order0["uniform-seen"] - order0[pick],
                       "uniform_seen": uni, "pick_losses": best, "paired_differences": d.tolist(),
                       "noise_sd": sd, "gain": gain, "ratio": gain / sd if sd > 0 else math.inf})
        print(f"stage {s} ({steps[s]['label']}): pick {pick}, order-0 gain {stages[-1]['order0_gain']:+.4f}; "
              f"on orders 1..{args.orders} gain {gain:+.4f}, noise sd {sd:.4f}, ratio {stages[-1]['ratio']:.2f}",
              flush=True)
        ckpt = save
    write_json(args.out, {
        "command": "benchmarks/continual_headroom.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()}-core CPU, torch CPU", "load_average_at_end": list(os.getloadavg()),
        "seed": args.seed, "orders": args.orders, "stages": stages, "wall_s": time.time() - t0})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
