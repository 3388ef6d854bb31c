"""Which proxy settings make merged adapters rank mixtures as real training does.

    .venv/bin/python benchmarks/fidelity_levers.py --out bench_runs/levers --seeds 0 1   # ~35 min, 2 cores

Per seed: one OP-Mix run of opmix_ray/configs/bench.yaml (reused if OUT already has it), then
`opmix-ray fidelity` on its round 0: 16 candidates (stay, the round's leader, equal weights,
13 draws within the caps), each trained for real by the exact continuation of the main run, on
2 truth seeds. Every proxy variant below then retrains its own adapters on the same checkpoint
(in this process) and scores the same candidates against the same truths, so the variants differ
in nothing else. Writes OUT/levers.json and prints one row per (variant, seed, objective):
Spearman, Pearson, the proxy pick's regret, and the entropy and stay references.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opmix_ray.config import load_config  # noqa: E402
from opmix_ray.data.read import build_shards  # noqa: E402
from opmix_ray.engine.adapters import REPLICATE, adapter_lr, adapter_plan, adapter_seeds, save_component, train_one  # noqa: E402
from opmix_ray.experiments.fidelity import run_fidelity  # noqa: E402
from opmix_ray.mixture import Mixture  # noqa: E402
from opmix_ray.run_config import load_run_config_only  # noqa: E402
from opmix_ray.storage import read_json, write_json  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "opmix_ray" / "configs" / "bench.yaml"

# name -> config overrides of the proxy. "matched" rescales every merged delta to the 'old' adapter's norm
# (search.delta_norm); "raw" is the plain weighted sum.
V1 = {"adapters": {"init": "per_adapter", "lr_schedule": "peak", "weight_decay": 0.0},
      "search": {"delta_scale": 1.0, "delta_norm": "raw"}}
RAW = {"adapters": {"init": "shared", "lr_schedule": "current", "weight_decay": 0.01},
       "search": {"delta_scale": 1.0, "delta_norm": "raw"}}
M = {"adapters": RAW["adapters"], "search": {"delta_scale": 1.0, "delta_norm": "matched"}}


def _with(base: dict, section: str, **kw) -> dict:
    return {**base, section: {**base[section], **kw}}


VARIANTS = {
    "v1 (per-adapter init, 2x peak lr, wd 0, c 1, raw)": V1,
    "shared init, 2x current lr, wd .01, c 1, raw": RAW,
    "same, norm-matched merge": M,
    "matched, per-adapter init": _with(M, "adapters", init="per_adapter"),
    "matched, 2x peak lr": _with(M, "adapters", lr_schedule="peak"),
    "matched, wd 0": _with(M, "adapters", weight_decay=0.0),
    "matched, c = token ratio": _with(M, "search", delta_scale="ratio"),
    "matched, c auto": _with(M, "search", delta_scale="auto"),
    "matched, 60 adapter steps": _with(M, "adapters", steps=60),
    "matched, all 8192 eval tokens": _with(M, "search", eval_tokens_per_domain=8192),
    "raw, 60 adapter steps": _with(RAW, "adapters", steps=60),
    # DeMix (adapters.kind: full): full fine-tuned components, the same settings and merge otherwise
    "DeMix: full components, 2x current lr, wd .01, c 1, raw": _with(RAW, "adapters", kind="full"),
    # what a LoRA probe can express: rank, the (tied) embedding trained in full, steps and lr with it
    "LoRA r64, raw": _with(RAW, "adapters", r=64, alpha=128.0),
    "LoRA r16 + embedding, raw": _with(RAW, "adapters", embedding="full"),
    "LoRA r16 + embedding, 60 adapter steps": _with(RAW, "adapters", embedding="full", steps=60),
    "LoRA r16 + embedding, 4x current lr": _with(RAW, "adapters", embedding="full", lr_multiplier=4.0),
    "LoRA r64 + embedding, raw": _with(RAW, "adapters", embedding="full", r=64, alpha=128.0),
    "LoRA r16 + LoRA on the embedding, raw": _with(RAW, "adapters", embedding="lora"),
}
# the proxy levers measured on the bench's setting (--levers)
LEVERS = ["shared init, 2x current lr, wd .01, c 1, raw", "LoRA r64, raw", "LoRA r16 + embedding, raw",
          "LoRA r16 + embedding, 60 adapter steps", "LoRA r16 + embedding, 4x current lr",
          "DeMix: full components, 2x current lr, wd .01, c 1, raw"]
QUICK = ["v1 (per-adapter init, 2x peak lr, wd 0, c 1, raw)", "shared init, 2x current lr, wd .01, c 1, raw",
         "raw, 60 adapter steps"]


def adapter_key(ov: dict) -> str:
    a = {**RAW["adapters"], "steps": None, "kind": "lora", **ov.get("adapters", {})}
    kind = "" if a["kind"] == "lora" else f"{a['kind']}_"
    more = "".join(f"_{k}{a[k]}" for k in ("r", "embedding", "lr_multiplier") if k in a)
    return f"{kind}{a['init']}_{a['lr_schedule']}_wd{a['weight_decay']}_steps{a['steps'] or 'cfg'}{more}"


def base_run(out: Path, seed: int, schedule: str = "cosine", selection_tokens: int | None = None,
             config: Path = CONFIG) -> Path:
    """bench.yaml's OP-Mix run at `seed`; schedule wsd anneals the lr before every round boundary,
    so round 0 decides at an annealed checkpoint, as the OP-Mix paper does. selection_tokens:
    data.selection_tokens_per_domain (0 = no selection windows, the layout of the cosine truths in
    benchmarks/results/fidelity_levers, made before selection windows existed)."""
    from opmix_ray.engine.driver import run
    name = f"bench-s{seed}" if schedule == "cosine" else f"bench-{schedule}-s{seed}"
    data = {} if selection_tokens is None else {"selection_tokens_per_domain": selection_tokens}
    cfg = load_config(config, {"run": {"seed": seed, "name": name, "storage_path": str(out / "runs")},
                               "main": {"schedule": schedule}, "data": data})
    run_dir = out / "runs" / cfg.run.name
    if not (run_dir / "summary.json").is_file():
        run(cfg, overwrite=True)
    return run_dir


def stay_gap(run_dir: Path, stored: Path) -> float:
    """Largest per-domain difference between a stored fidelity file's stay truth (truth seed 0) and the
    same continuation from run_dir's round-0 checkpoint: 0.0 means the checkpoint, data and training
    are the ones the stored truths were made with."""
    from opmix_ray.engine.continuation import continue_many
    from opmix_ray.ray_init import init_ray
    from opmix_ray.engine.main_run import checkpoint_path, steps_and_boundaries
    cfg = load_run_config_only(run_dir)
    shards = build_shards(cfg)
    _, b = steps_and_boundaries(cfg)
    stay = next(c for c in read_json(stored)["candidates"] if c["label"] == "stay")
    init_ray(cfg)
    row = continue_many(cfg, shards, checkpoint_path(str(run_dir), 0),
                        [{"weights": stay["mixture"], "truth_seed": 0}], b[1] - b[0])[0]
    return max(abs(row["val_loss"][d] - stay["truth"][0][d]) for d in stay["truth"][0])


def train_variant(run_dir: Path, overrides: dict, dest: Path) -> dict[str, str]:
    """The round-0 adapters with the variant's adapter settings, trained here (2 threads)."""
    import torch
    torch.set_num_threads(2)
    cfg = load_run_config_only(run_dir, {"adapters": overrides.get("adapters", {})})
    hist = read_json(run_dir / "history.json")
    shards = build_shards(cfg)
    ckpt = str(run_dir / "main" / "round_0")
    info = read_json(Path(ckpt) / "train_state.json")["info"]
    current = Mixture.from_dict(hist["rounds"][0]["mixture_before"], shards.domains)
    dirs = {}
    for name, weights in adapter_plan(current, cfg):
        if name == REPLICATE:
            continue  # the noise probe of the decision rule: no part of a candidate's score
        d = dest / name
        full = cfg.adapters.kind == "full"
        if not (d / ("model.safetensors" if full else "adapter_model.safetensors")).is_file():
            out = train_one(cfg, shards, ckpt, name, weights, adapter_seeds(cfg, 0, name), adapter_lr(cfg, info.get("lr")))
            if full:
                save_component(out["model"], str(d))
            else:
                out["model"].save_pretrained(str(d), safe_serialization=True, save_embedding_layers=False)
        dirs[name] = str(d)
    return dirs


MIXTURE_ADAPTER = "no merge: one adapter trained on each candidate's mixture"


def mixture_adapter_fidelity(run_dir: Path, truth_file: Path, dest: Path, overrides: dict = RAW) -> dict:
    """The proxy a merge approximates: for each candidate, one LoRA adapter trained on its mixture E(a)
    (the shipped adapter settings, the 'old' adapter's init and data seed, so candidates differ only in
    their mixture), scored on the search's eval windows against the same truths."""
    import torch

    from opmix_ray.engine.candidates import objective_weights
    from opmix_ray.evaluate import domain_losses
    from opmix_ray.experiments.fidelity import corr, scores
    torch.set_num_threads(2)
    cfg = load_run_config_only(run_dir, {"adapters": overrides["adapters"]})
    shards = build_shards(cfg)
    ckpt = str(run_dir / "main" / "round_0")
    info = read_json(Path(ckpt) / "train_state.json")["info"]
    prior = read_json(truth_file)
    cands = []
    for c in prior["candidates"]:
        f = dest / f"{c['label']}.json"
        if not f.is_file():
            out = train_one(cfg, shards, ckpt, "old", c["mixture"], adapter_seeds(cfg, 0, "old"),
                            adapter_lr(cfg, info.get("lr")))
            write_json(f, domain_losses(out["model"], shards.selection(), max_tokens=cfg.search.eval_tokens_per_domain))
        cands.append({**c, "proxy": read_json(f)})
    objs = {"configured": objective_weights(cfg, shards), "mean": {d: 1.0 for d in shards.domains}}
    if shards.eval_only:
        objs["target"] = {d: 1.0 for d in shards.eval_only}
    return {"delta_scale": 1.0, "objectives": {n: scores(cands, "proxy", w) for n, w in objs.items()},
            "per_domain": {d: corr([c["proxy"][d] for c in cands], [c["truth_mean"][d] for c in cands])
                           for d in shards.val}}


def _search_overrides(run_dir: Path, overrides: dict) -> dict:
    s = dict(overrides.get("search", {}))
    if s.get("delta_scale") == "ratio":  # the plain token ratio, no guard
        cfg = load_run_config_only(run_dir, {"adapters": overrides.get("adapters", {})})
        from opmix_ray.engine.main_run import steps_and_boundaries
        _, b = steps_and_boundaries(cfg)
        s["delta_scale"] = (b[1] - b[0]) * cfg.main.batch_size / (cfg.adapters.steps * cfg.adapters.batch_size)
    return {"search": s, "adapters": overrides.get("adapters", {})}


def table(paths: list[str]) -> str:
    """Markdown: one row per variant, per objective Spearman and regret by seed."""
    rows = [r for p in paths for r in json.loads(Path(p).read_text())["rows"]]
    seeds = sorted({r["seed"] for r in rows})
    names = list(dict.fromkeys(r["variant"] for r in rows))
    get = {(r["variant"], r["seed"], r["objective"]): r for r in rows}
    head = ["proxy variant"] + [f"{o} Spearman / regret, seed {s}" for o in ("mean", "target") for s in seeds]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda r: "-" if r is None else f"{r['proxy_spearman']:+.2f} / {r['proxy_regret']:.3f}"
    for n in names:
        out.append("| " + " | ".join([n] + [fmt(get.get((n, s, o))) for o in ("mean", "target") for s in seeds]) + " |")
    for label, key in (("entropy of E(a) (no model)", ("entropy_spearman", "entropy_regret")),
                       ("stay (no model)", (None, "stay_regret")), ("truth seed agreement (ceiling)",
                                                                    ("truth_seed_agreement", None))):
        cells = []
        for o in ("mean", "target"):
            for s in seeds:
                r = next((r for r in rows if r["seed"] == s and r["objective"] == o), None)
                sp = f"{r[key[0]]:+.2f}" if r and key[0] else ""
                rg = f"{r[key[1]]:.3f}" if r and key[1] else ""
                cells.append(" / ".join(x for x in (sp, rg) if x) or "-")
        out.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(out)


def pairs(fidelity_json: str, mixture_adapters_json: str) -> str:
    """Markdown: per candidate and objective, its gain over stay (stay minus candidate; > 0 = better)
    by the merged proxy, by the no-merge proxy and by the truth: what a check of the leader against
    stay would have seen."""
    fid, mix = json.loads(Path(fidelity_json).read_text()), json.loads(Path(mixture_adapters_json).read_text())
    losses = mix["per_candidate_losses"]
    train = [d for d in fid["candidates"][0]["mixture"]]
    target = [d for d in fid["candidates"][0]["truth_mean"] if d not in train]
    out = ["| candidate | " + " | ".join(f"{o}: merge / no merge / truth" for o in ("mean", "target")) + " |",
           "|---|---|---|"]
    stay = next(c for c in fid["candidates"] if c["label"] == "stay")
    avg = lambda m, ds: sum(m[d] for d in ds) / len(ds)
    for c in fid["candidates"]:
        cells = []
        for ds in (train, target):
            g = [avg(stay["proxy"], ds) - avg(c["proxy"], ds), avg(losses["stay"], ds) - avg(losses[c["label"]], ds),
                 avg(stay["truth_mean"], ds) - avg(c["truth_mean"], ds)]
            cells.append(" / ".join(f"{x:+.3f}" for x in g))
        out.append(f"| {c['label']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_runs/levers")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--mixtures", type=int, default=16)
    ap.add_argument("--config", type=Path, default=CONFIG, help="the base runs' config (default: bench.yaml)")
    ap.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} variants: {QUICK}")
    ap.add_argument("--levers", action="store_true", help=f"only the proxy levers: {LEVERS}")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="only these variants")
    ap.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine",
                    help="the main run's lr schedule (main.schedule) in the base runs")
    ap.add_argument("--selection-tokens", type=int, help="data.selection_tokens_per_domain of the base runs "
                    "(0: the layout the stored cosine truths were made with)")
    ap.add_argument("--truths-from", nargs="+", metavar="FIDELITY_JSON", help="one stored fidelity file per seed "
                    "(its candidates and truths), used when the rebuilt base run reproduces its stay truth exactly")
    ap.add_argument("--mixture-adapters", action="store_true",
                    help=f"also score the no-merge reference ({MIXTURE_ADAPTER}); 16 adapter trainings per seed")
    ap.add_argument("--only-mixture-adapters", action="store_true", help="score only the no-merge reference")
    ap.add_argument("--no-merge-variant", choices=list(VARIANTS), default="shared init, 2x current lr, wd .01, c 1, raw",
                    help="the adapter settings of the no-merge reference's per-candidate adapters")
    ap.add_argument("--pairs", nargs=2, metavar=("FIDELITY_JSON", "MIXTURE_ADAPTERS_JSON"),
                    help="print every candidate's gain over stay by merge, no-merge proxy and truth, and exit")
    ap.add_argument("--table", nargs="+", metavar="LEVERS_JSON", help="print the markdown table of these files and exit")
    args = ap.parse_args()
    if args.pairs:
        print(pairs(*args.pairs))
        return 0
    if args.table:
        print(table(args.table))
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.time()
    for seed in args.seeds:
        run_dir = base_run(out, seed, args.schedule, args.selection_tokens, args.config)
        truth_file = run_dir / "fidelity_round_0.json"
        if args.truths_from and not truth_file.is_file():
            stored = Path(args.truths_from[args.seeds.index(seed)])
            gap = stay_gap(run_dir, stored)
            print(f"seed {seed}: stay truth from the rebuilt checkpoint vs {stored}: max |diff| {gap:.3g} nats", flush=True)
            if gap == 0.0:
                truth_file.write_bytes(stored.read_bytes())
        if not truth_file.is_file():
            run_fidelity(run_dir, 0, args.mixtures, truth_seeds=2)
        todo = [] if args.only_mixture_adapters else [n for n in VARIANTS if (not args.quick or n in QUICK)
                                                      and (not args.levers or n in LEVERS)
                                                      and (not args.variants or n in args.variants)]
        if args.mixture_adapters or args.only_mixture_adapters:
            todo.append(MIXTURE_ADAPTER)
        for name in todo:
            if name == MIXTURE_ADAPTER:
                ov = VARIANTS[args.no_merge_variant]
                res = mixture_adapter_fidelity(run_dir, truth_file, out / "adapters" / run_dir.name /
                                               f"per_candidate_{adapter_key(ov)}", ov)
            else:
                ov = VARIANTS[name]
                dirs = train_variant(run_dir, ov, out / "adapters" / run_dir.name / adapter_key(ov))
                res = run_fidelity(run_dir, 0, truths_from=truth_file, overrides=_search_overrides(run_dir, ov),
                                   adapter_dirs=dirs, write=False)
            for obj, o in res["objectives"].items():
                rows.append({"variant": name, "seed": seed, "schedule": args.schedule, "objective": obj, "delta_scale": res["delta_scale"],
                             **{f"proxy_{k}": v for k, v in o["proxy"].items()}, "stay_regret": o["stay"]["regret"],
                             "entropy_spearman": o["entropy"]["spearman"], "entropy_regret": o["entropy"]["regret"],
                             "truth_seed_agreement": (o["truth_seed_agreement"] or {}).get("spearman"),
                             "truth_spread": o["truth_spread"],
                             "per_domain": {d: c["spearman"] for d, c in res["per_domain"].items()}})
                r = rows[-1]
                print(f"{name:<44} s{seed} {obj:<10} c={r['delta_scale']:.2f} spearman {r['proxy_spearman']:+.3f} "
                      f"pearson {r['proxy_pearson']:+.3f} regret {r['proxy_regret']:.4f} | entropy "
                      f"{r['entropy_spearman']:+.3f} / {r['entropy_regret']:.4f} | stay regret {r['stay_regret']:.4f} "
                      f"| ceiling {r['truth_seed_agreement']:+.3f}", flush=True)
            write_json(out / "levers.json", {"rows": rows, "wall_s": time.time() - t0,
                                             "load_avg": os.getloadavg(), "command": " ".join(sys.argv)})
    print(f"wrote {out / 'levers.json'} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
