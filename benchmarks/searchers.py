"""Searcher benchmark: best objective found vs number of trials, per built-in searcher, 3+ seeds,
on ONE fixed set of trained adapters (so every searcher scores the same merged candidates).

    python benchmarks/searchers.py                      # trains the adapters first (tiny config, 1 round)
    python benchmarks/searchers.py --run-dir RUN_DIR    # reuse a finished run's round-0 adapters

Trials are scored in-process with opmix_ray.engine.scoring.score (the same merge + eval a Tune trial
runs), driven sequentially through each searcher's suggest/on_trial_complete, with the uniform
warm start the engine uses. Writes benchmarks/results/searchers.{json,png} and the searchers
section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from opmix_ray.config import load_config  # noqa: E402
from opmix_ray.mixture import Mixture  # noqa: E402
from opmix_ray.searchers import METRIC, create_searcher, registered  # noqa: E402
from search_spaces import SimplexSpace  # noqa: E402

CHECKPOINTS = (4, 8, 12, 16, 24, 32)
WITHIN = 0.005  # "within 0.5% of the best known objective"


def make_run(storage: str) -> str:
    from opmix_ray.engine.driver import run
    cfg = load_config(ROOT / "opmix_ray" / "configs" / "tiny.yaml",
                      {"run": {"storage_path": storage, "name": "searcher_bench"}, "rounds": {"num_rounds": 1},
                       "search": {"searcher": "random", "num_samples": 2}})
    return run(cfg, overwrite=True)["run_dir"]


def load_candidates(run_dir: str):
    from opmix_ray.data.read import build_shards
    from opmix_ray.engine.candidates import build_candidates
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    hist = json.load(open(os.path.join(run_dir, "history.json")))
    shards = build_shards(cfg)
    current = Mixture.from_dict(hist["rounds"][0]["mixture_before"], shards.domains, shards.data_hash)
    root = os.path.join(run_dir, "adapters_round_0", "adapters")
    names = (["old"] if os.path.isdir(os.path.join(root, "old")) else []) + list(shards.domains)
    dirs = {n: os.path.join(root, n) for n in names}
    return cfg, build_candidates(cfg, "bench", os.path.join(run_dir, "main", "round_0"), dirs, shards, current)


def bench_one(name: str, seed: int, cands, n_trials: int) -> dict:
    from opmix_ray.engine.scoring import score
    space = SimplexSpace(cands.coords)
    k = len(space.coords)
    s = create_searcher(name, space=space, seed=seed, points_to_evaluate=[np.full(k, 1 / k)],
                        objective_weights=cands.objective_weights)
    values, t0 = [], time.time()
    for i in range(n_trials):
        cfg = s.suggest(f"t{i}")
        if cfg == "FINISHED" or cfg is None:
            break
        m = score(cands, space.weights(cfg))
        values.append(float(m[METRIC]))
        s.on_trial_complete(f"t{i}", m)
    return {"searcher": name, "seed": seed, "values": values, "wall_s": time.time() - t0}


def summarise(runs: list[dict], n_trials: int) -> tuple[float, dict]:
    best_known = min(min(r["values"]) for r in runs)
    table = {}
    for name in dict.fromkeys(r["searcher"] for r in runs):
        rs = [r for r in runs if r["searcher"] == name]
        curves = np.array([np.minimum.accumulate(r["values"] + [r["values"][-1]] * (n_trials - len(r["values"])))
                           for r in rs])
        hit = [next((i + 1 for i, v in enumerate(c) if v <= best_known * (1 + WITHIN)), None) for c in curves]
        table[name] = {"mean": curves.mean(0).tolist(), "std": curves.std(0).tolist(),
                       "trials_to_within": hit, "wall_s": float(np.mean([r["wall_s"] for r in rs]))}
    return best_known, table


def write_outputs(best_known, table, n_trials, seeds, cmd, out_dir: Path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = np.arange(1, n_trials + 1)
    for name, t in table.items():
        m, s = np.array(t["mean"]), np.array(t["std"])
        ax.plot(x, m, label=name)
        ax.fill_between(x, m - s, m + s, alpha=0.15)
    ax.axhline(best_known * (1 + WITHIN), color="grey", ls=":", label="best known +0.5%")
    ax.set_xlabel("trials (merged candidates scored)")
    ax.set_ylabel("best objective so far (mean val loss)")
    ax.set_title(f"searchers on one adapter set, {len(seeds)} seeds (mean ± sd)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "searchers.png", dpi=120)
    cps = [c for c in CHECKPOINTS if c <= n_trials]
    lines = ["| searcher | " + " | ".join(f"best @{c}" for c in cps) + " | trials to within 0.5% (per seed) | s / run |",
             "|---|" + "---|" * (len(cps) + 2)]
    for name, t in table.items():
        cells = [f"{t['mean'][c - 1]:.4f} ± {t['std'][c - 1]:.4f}" for c in cps]
        hits = ", ".join("—" if h is None else str(h) for h in t["trials_to_within"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {hits} | {t['wall_s']:.0f} |")
    fastest = {n: np.mean([h if h is not None else np.inf for h in t["trials_to_within"]]) for n, t in table.items()}
    win = min(fastest, key=fastest.get)
    verdict = (f"Fewest trials to within 0.5% of the best known objective ({best_known:.4f}): **{win}** "
               f"(mean {fastest[win]:.1f} over seeds; — = not reached in {n_trials}).")
    first = max(t["mean"][0] for t in table.values())
    if first <= best_known * (1 + WITHIN):  # the warm start is already within 0.5%: nothing to separate
        verdict += (f" CAVEAT: the whole range of scored objectives ({best_known:.4f}..{first:.4f}) is inside "
                    "0.5%, so this adapter set cannot separate the searchers; rerun on adapters that move "
                    "the loss (e.g. a run of opmix_ray/configs/demo.yaml via --run-dir).")
    return "\n".join([f"Command: `{cmd}`", "", *lines, "", verdict, "", "![searchers](results/searchers.png)"])


def update_results_md(section: str) -> None:
    path = HERE / "RESULTS.md"
    start, end = "<!-- searchers:start -->", "<!-- searchers:end -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{start}\n## Searchers: best objective vs trials\n\n{section}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", help="a finished run whose round-0 adapters to reuse; default: train them")
    ap.add_argument("--storage", default=str(ROOT / "opmix_runs"), help="where to train them")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--searchers", nargs="*", default=None, help=f"default: all of {registered()}")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    run_dir = args.run_dir or make_run(args.storage)
    _, cands = load_candidates(run_dir)
    seeds = list(range(args.seeds))
    runs = []
    for name in args.searchers or registered():
        for seed in seeds:
            r = bench_one(name, seed, cands, args.trials)
            print(f"{name} seed {seed}: best {min(r['values']):.4f} after {len(r['values'])} trials "
                  f"({r['wall_s']:.0f}s)", flush=True)
            runs.append(r)
    best_known, table = summarise(runs, args.trials)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "searchers.json").write_text(json.dumps({"run_dir": run_dir, "coords": list(cands.coords),
                                                    "best_known": best_known, "runs": runs}, indent=1))
    cmd = "python benchmarks/searchers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    update_results_md(write_outputs(best_known, table, args.trials, seeds, cmd.strip(), out))
    print(f"wrote {out / 'searchers.png'} and benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
