"""The benchmark's table and plots, from OUT/results.json (experiments/bench.py writes it).

    python -m opmix_ray.experiments.bench_report bench_runs/default     # re-render from a finished benchmark
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from opmix_ray.storage import atomic_write_bytes, read_json


def label(row: dict) -> str:
    return row["method"] if row["objective"] == "any" else f"{row['method']} ({row['objective']})"


def _ms(xs) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{np.mean(xs):.2f} ± {np.std(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def summarise(result: dict) -> list[dict]:
    """One line per method (x objective): means and spreads over seeds."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in result["rows"]:
        groups[label(r)].append(r)
    oracle = result.get("oracle") or []
    # the oracle's search is every one of its full runs: knowing the best took all of them
    oracle_flops = {"search_flops": float(sum(r.get("main_flops", 0.0) for r in oracle))}
    if oracle:
        groups["oracle (mean)"] = [{**min(oracle, key=lambda r: r["mean_ppl"]), **oracle_flops}]
        if result["eval_only"]:
            groups["oracle (target)"] = [{**min(oracle, key=lambda r: r["target_ppl"]), **oracle_flops}]
    out = []
    for name, rs in groups.items():
        main = [r.get("main_flops", 0.0) for r in rs]
        search = [r["search_flops"] for r in rs]
        out.append({"label": name, "n_seeds": len(rs), "mean_ppl": [r["mean_ppl"] for r in rs],
                    "worst_ppl": [r["worst_ppl"] for r in rs], "target_ppl": [r["target_ppl"] for r in rs],
                    "ppl": {d: float(np.mean([r["ppl"][d] for r in rs])) for d in rs[0]["ppl"]},
                    "search_flops": float(np.mean(search)), "total_flops": float(np.mean(search) + np.mean(main)),
                    "search_wall_s": float(np.mean([r["search_wall_s"] for r in rs])),
                    "mixture": {d: float(np.mean([r["mixture"][d] for r in rs])) for d in rs[0]["mixture"]}})
    return out


def markdown(result: dict) -> str:
    lines = []
    summ = summarise(result)
    doms = result["domains"] + result["eval_only"]
    head = ["method", "seeds", "mean ppl", "worst ppl", "target ppl"] + doms + ["search FLOPs", "total FLOPs",
                                                                             "search / main FLOPs", "search s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summ:
        cells = [s["label"], str(s["n_seeds"]), _ms(s["mean_ppl"]), _ms(s["worst_ppl"]), _ms(s["target_ppl"])]
        cells += [f"{s['ppl'].get(d, float('nan')):.2f}" for d in doms]
        main = s["total_flops"] - s["search_flops"]
        ratio = f"{s['search_flops'] / main:.2f}" if main > 0 and not s["label"].startswith("oracle") else "-"
        cells += [f"{s['search_flops']:.3g}", f"{s['total_flops']:.3g}", ratio, f"{s['search_wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mixtures (mean over seeds):", "", "| method | " + " | ".join(result["domains"]) + " |",
              "|" + "---|" * (len(result["domains"]) + 1)]
    for s in summ:
        if s["label"].startswith("oracle") or s["label"] == "oracle-run":
            continue
        lines.append(f"| {s['label']} | " + " | ".join(f"{s['mixture'][d]:.3f}" for d in result["domains"]) + " |")
    lines += ["", *against_noise(result)]
    lines += ["", *per_seed_comparisons(result)]
    lines += ["", *vs_uniform(result)]
    for key, name in (("fidelity", "OP-Mix"), ("fidelity_demix", "DeMix")):
        fid = result.get(key)
        if fid and "truth_seeds" in fid:  # results.json files from before the exact-continuation truth lack it
            lines += ["", f"Fidelity of {name} (round {fid['round']}, {fid['n']} candidates x {fid['truth_seeds']} "
                      f"truth seeds, exact continuation for {fid['truth_steps']} steps): "
                      + "; ".join(f"{k}: proxy Spearman {v['proxy']['spearman']:.3f}, regret {v['proxy']['regret']:.4f} "
                                  f"(entropy {v['entropy']['spearman']:.3f}, stay regret {v['stay']['regret']:.4f})"
                                  for k, v in fid["objectives"].items() if v["proxy"]["spearman"] is not None)]
    cv = [(label(r), r["seed"], r["info"]["cv_spearman"]) for r in result["rows"]
          if "cv_spearman" in (r.get("info") or {})]
    if cv:
        lines += ["RegMix regressor 5-fold CV Spearman on the swarm: "
                  + "; ".join(f"{n} seed {s}: {c:.3f}" for n, s, c in cv)]
    return "\n".join(lines) + "\n"


def objective_loss(row: dict, result: dict, objective: str) -> float:
    """The row's objective in nats: mean val loss over the training domains, or over the targets."""
    doms = result["eval_only"] if objective == "target" else result["domains"]
    return float(np.mean([row["val_loss"][d] for d in doms]))


def noise_verdicts(result: dict) -> list[dict]:
    """Every method against uniform, seed by seed, in nats on each objective, with the bench's noise
    (the sd of a one-seed paired difference, from the headroom measurement): diff < 0 = better than
    uniform; beyond = |diff| > 2 noise (a smaller difference is no difference)."""
    noise = result.get("noise") or {}
    head = result.get("headroom") or {}
    uni = {r["seed"]: r for r in result["rows"] if r["method"] == "uniform"}
    out = []
    for obj, sd in noise.items():
        groups = defaultdict(list)
        for r in result["rows"]:
            if r["method"] != "uniform" and r["seed"] in uni and r["objective"] in (obj, "any") and r.get("val_loss"):
                groups[label(r)].append(r)
        for lab, rs in sorted(groups.items()):
            diffs = [objective_loss(r, result, obj) - objective_loss(uni[r["seed"]], result, obj) for r in rs]
            gain = head.get(obj, {}).get("oracle_gain")
            out.append({"label": lab, "objective": obj, "noise": sd, "seeds": [r["seed"] for r in rs], "diffs": diffs,
                        "better_beyond_noise": sum(d < -sd for d in diffs),
                        "better_beyond_2noise": sum(d < -2 * sd for d in diffs),
                        "worse_beyond_noise": sum(d > sd for d in diffs),
                        "worse_beyond_2noise": sum(d > 2 * sd for d in diffs),
                        "headroom_captured": float(-np.mean(diffs) / gain) if gain and gain > 0 else None})
    return out


def against_noise(result: dict) -> list[str]:
    """noise_verdicts as lines, the headroom first."""
    if not result.get("noise"):
        return []
    lines = []
    for obj, h in (result.get("headroom") or {}).items():
        lines.append(f"- headroom on {obj}: the best fixed mixture ({h['pick']}) beats uniform by {h['oracle_gain']:+.4f} "
                     f"nats; noise (sd of a one-seed paired difference, {h['n_orders']} data orders) "
                     f"{h['noise_sd']:.4f}; ratio {h['ratio']:.2f}")
    for v in noise_verdicts(result):
        cap = f"; {100 * v['headroom_captured']:.0f}% of the headroom" if v["headroom_captured"] is not None else ""
        lines.append(f"- {v['label']} vs uniform, {v['objective']} loss (nats): "
                     + ", ".join(f"{d:+.4f} ({d / v['noise']:+.1f} sd)" for d in v["diffs"])
                     + f" by seed; better beyond 1 / 2 sd on {v['better_beyond_noise']} / {v['better_beyond_2noise']}, "
                       f"worse on {v['worse_beyond_noise']} / {v['worse_beyond_2noise']} of {len(v['diffs'])}{cap}")
    return lines


def vs_uniform(result: dict) -> list[str]:
    """Every method against uniform, seed by seed, on its own objective's perplexity (< 0 = better)."""
    by = {(label(r), r["seed"]): r for r in result["rows"]}
    uni = {s: r for (lab, s), r in by.items() if lab == "uniform"}
    out = []
    for lab in sorted({lab for lab, _ in by if lab != "uniform"}):
        key = "target_ppl" if lab.endswith("(target)") else "mean_ppl"
        rel = [100.0 * (r[key] / uni[s][key] - 1) for (lb, s), r in sorted(by.items()) if lb == lab and s in uni
               and r.get(key) and uni[s].get(key)]
        if rel:
            out.append(f"- {lab} vs uniform, {key}: " + ", ".join(f"{x:+.2f}%" for x in rel) + " by seed"
                       + (" (better on every seed)" if all(x < 0 for x in rel) else ""))
    return out


def per_seed_comparisons(result: dict) -> list[str]:
    """OP-Mix against each other method, seed by seed (relative perplexity change; < 0 = OP-Mix better)."""
    by = {(label(r), r["seed"]): r for r in result["rows"]}
    out = []
    for obj, key in (("mean", "mean_ppl"), ("target", "target_ppl")):
        op = {s: r for (lab, s), r in by.items() if lab == f"opmix ({obj})"}
        if not op:
            continue
        others = sorted({lab for lab, _ in by if not lab.startswith("opmix (")})
        for lab in others:
            rel = [100.0 * (op[s][key] / by[(lab, s)][key] - 1) for s in sorted(op) if (lab, s) in by and by[(lab, s)].get(key)]
            if rel:
                out.append(f"- opmix ({obj}) vs {lab}, {key}: " + ", ".join(f"{x:+.2f}%" for x in rel) + " by seed")
    return out


MARKERS = "osD^vP*Xph<>"


def flops_figure(result: dict):
    """One panel per objective: perplexity against the compute spent choosing the mixture, a marker
    and colour per method, methods without search as dashed levels (a log axis has no 0)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    summ = summarise(result)
    colours = plt.get_cmap("tab20").colors
    style = {s["label"]: (colours[i % len(colours)], MARKERS[i % len(MARKERS)]) for i, s in enumerate(summ)}
    panels = [("mean_ppl", "mean val perplexity over the training domains")]
    panels += [("target_ppl", f"target ({', '.join(result['eval_only'])}) val perplexity")] if result["eval_only"] else []
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5), squeeze=False)
    for ax, (key, what) in zip(axes[0], panels):
        for s in summ:
            ys = [y for y in s[key] if y is not None]
            if not ys:
                continue
            colour, marker = style[s["label"]]
            name = f"{s['label']} (n={len(ys)})"
            if s["search_flops"] > 0:
                ax.errorbar(s["search_flops"], np.mean(ys), yerr=np.std(ys), fmt=marker, color=colour, capsize=3,
                            markersize=7, label=name)
            else:  # no search: a level to compare against, not a point at a made-up FLOP count
                ax.axhline(np.mean(ys), color=colour, linestyle="--", linewidth=1.2, label=f"{name}, no search")
        ax.set_xscale("log")
        ax.set(title=f"{what}\nvs compute spent choosing the mixture (lower is better)",
               xlabel="search FLOPs (log; oracle: all its full runs)", ylabel=f"{key.replace('_', ' ')} (mean ± sd over seeds)")
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def plot(result: dict, out: Path) -> list[Path]:
    """ppl_vs_search_flops.png and mixtures.png (each method's mixture, mean over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    summ = summarise(result)
    paths = [_save(flops_figure(result), out / "ppl_vs_search_flops.png")]
    rows = [s for s in summ if not s["label"].startswith("oracle")]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    bottom = np.zeros(len(rows))
    for d in result["domains"]:
        vals = np.array([s["mixture"][d] for s in rows])
        ax.bar(range(len(rows)), vals, bottom=bottom, label=d)
        bottom += vals
    ax.set_xticks(range(len(rows)), [s["label"] for s in rows], rotation=30, ha="right", fontsize=8)
    ax.set(title="the mixture each method chose (mean over seeds)", ylabel="token share")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    paths.append(_save(fig, out / "mixtures.png"))
    plt.close("all")
    return paths


def _save(fig, path: Path) -> Path:
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # the legend outside the axes included
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_report(result: dict, out: Path) -> str:
    text = markdown(result)
    atomic_write_bytes(Path(out) / "results.md", text.encode())
    plot(result, Path(out))
    return text


if __name__ == "__main__":
    d = Path(sys.argv[1])
    print(write_report(read_json(d / "results.json"), d))
