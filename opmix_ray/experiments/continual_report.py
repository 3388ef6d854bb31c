"""What `opmix-ray continual` prints and writes as results.md: one sequence's stage table, or, with
schedule.seeds, every seed's final stage against uniform-seen and its data-order noise."""
from __future__ import annotations

import math

import numpy as np


def stage_noise(stage: int, mean_losses: list[float], instruct: list[dict] | None = None) -> dict:
    """One stage's data-order noise from uniform-seen's mean val loss on k >= 2 orders from one
    checkpoint: the sd over the orders, and sqrt(2) x that, the sd of the difference between two
    runs on independent orders (the uncertainty of a one-order comparison of two methods).
    instruct: each order's instruction-task scores (instruct_eval); adds the same noise of every
    task's held-out answer loss, under "answer_loss"."""
    sd = float(np.std(mean_losses, ddof=1)) if len(mean_losses) > 1 else float("nan")
    out = {"stage": stage, "mean_loss": [float(x) for x in mean_losses], "sd": sd, "noise": math.sqrt(2) * sd}
    if instruct and all(instruct) and len(instruct) > 1:
        losses = {t: [float(s[t]["heldout"]["answer_loss"]) for s in instruct] for t in instruct[0]}
        out["answer_loss"] = {t: {"values": v, "noise": math.sqrt(2) * float(np.std(v, ddof=1))}
                              for t, v in losses.items()}
    return out


def pooled(noises: list[float]) -> float:
    """Several seeds' noise as one: the root mean square."""
    return float(math.sqrt(np.mean(np.square(noises))))


def combine(results: dict[int, dict]) -> dict:
    """The seeds' results as one: every row (each carries its seed), FLOPs and noise per seed, and the
    pooled final-stage noise (the root mean square of the seeds' own)."""
    first = next(iter(results.values()))
    finals = [r["noise"] for r in results.values() if r.get("noise") is not None]
    return {"rows": [row for r in results.values() for row in r["rows"]], "seeds": list(results),
            "seen_by_stage": first["seen_by_stage"], "changes": first.get("changes"),
            "noise": pooled(finals) if finals else None,
            "noise_by_seed": {str(s): r.get("noise_by_stage", []) for s, r in results.items()},
            "flops_by_seed": {str(s): r["flops"] for s, r in results.items()},
            "wall_s_by_seed": {str(s): r["wall_s"] for s, r in results.items()}}


def markdown(result: dict) -> str:
    return seeds_markdown(result) if "seeds" in result else sequence_markdown(result)


def seeds_markdown(result: dict) -> str:
    seeds, last = result["seeds"], len(result["seen_by_stage"]) - 1
    final = {(r["method"], r["seed"]): r for r in result["rows"] if r["stage"] == last}
    methods = list(dict.fromkeys(m for m, _ in final))
    noise = result.get("noise")
    lines = [f"Final stage: mean val loss over its {len(result['seen_by_stage'][-1])} domains, per seed "
             + (f"(noise: sd of a one-order difference of two runs {noise:.4f} nats; a difference beyond "
                f"2 x noise = {2 * noise:.4f} counts)" if noise else "(no noise measured: schedule.noise_orders)"),
             "", "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | vs uniform-seen, by seed | "
             "better / worse beyond 2 x noise | total FLOPs (mean) |", "|" + "---|" * (len(seeds) + 5)]
    ref = {s: final[("uniform-seen", s)]["mean_loss"] for s in seeds if ("uniform-seen", s) in final}
    for m in methods:
        loss = {s: final[(m, s)]["mean_loss"] for s in seeds if (m, s) in final}
        diff = {s: loss[s] - ref[s] for s in loss if s in ref}
        if m != "uniform-seen" and diff and noise:
            tally = f"{sum(d < -2 * noise for d in diff.values())} / {sum(d > 2 * noise for d in diff.values())} of {len(diff)}"
        else:
            tally = ""
        flops = np.mean([final[(m, s)]["total_flops"] for s in loss])
        lines.append(f"| {m} | " + " | ".join(f"{loss[s]:.4f}" if s in loss else "-" for s in seeds)
                     + f" | {np.mean(list(loss.values())):.4f} | "
                     + (", ".join(f"{d:+.4f}" for d in diff.values()) if m != "uniform-seen" else "")
                     + f" | {tally} | {flops:.3g} |")
    stages = sorted({n["stage"] for ns in result["noise_by_seed"].values() for n in ns})
    if stages:
        lines += ["", "uniform-seen's data-order noise per stage (sqrt(2) x the sd over its orders from one "
                  "checkpoint), by seed:", "", "| seed | " + " | ".join(f"stage {s}" for s in stages) + " |",
                  "|" + "---|" * (len(stages) + 1)]
        for s, ns in result["noise_by_seed"].items():
            by = {n["stage"]: n["noise"] for n in ns}
            lines.append(f"| {s} | " + " | ".join(f"{by[k]:.4f}" if k in by else "-" for k in stages) + " |")
    lines += answer_loss_lines(result, final, seeds, methods)
    lines += ["", "Each seed's stage table: OUT/seed_N/results.md."]
    return "\n".join(lines) + "\n"


def answer_noise(result: dict) -> dict[str, float]:
    """Per instruction task, the final stage's held-out answer-loss noise pooled over the seeds (root
    mean square of the seeds' own, as for the mean val loss)."""
    last = len(result["seen_by_stage"]) - 1
    by_task: dict[str, list[float]] = {}
    for ns in result["noise_by_seed"].values():
        for n in ns:
            if n["stage"] == last:
                for t, v in n.get("answer_loss", {}).items():
                    by_task.setdefault(t, []).append(v["noise"])
    return {t: pooled(v) for t, v in by_task.items()}


def answer_loss_lines(result: dict, final: dict, seeds: list, methods: list[str]) -> list[str]:
    """The final stage's held-out answer loss per instruction task against uniform-seen, by seed."""
    tasks = list(dict.fromkeys(t for r in final.values() for t in r.get("instruct", {})))
    if not tasks:
        return []
    noise = answer_noise(result)
    lines = ["", "Final stage: held-out answer loss per task (nats/token), and the difference from uniform-seen "
             "by seed; noise per task as for the mean val loss:", "",
             "| method | task | " + " | ".join(f"seed {s}" for s in seeds) + " | vs uniform-seen, by seed | "
             "better / worse beyond 2 x noise |", "|" + "---|" * (len(seeds) + 4)]
    for t in tasks:
        ref = {s: final[("uniform-seen", s)]["instruct"][t]["heldout"]["answer_loss"] for s in seeds
               if t in final.get(("uniform-seen", s), {}).get("instruct", {})}
        for m in methods:
            got = {s: final[(m, s)]["instruct"][t]["heldout"]["answer_loss"] for s in seeds
                   if t in final.get((m, s), {}).get("instruct", {})}
            diff = {s: got[s] - ref[s] for s in got if s in ref}
            n = noise.get(t)
            tally = (f"{sum(d < -2 * n for d in diff.values())} / {sum(d > 2 * n for d in diff.values())} of {len(diff)}"
                     if m != "uniform-seen" and diff and n else "")
            lines.append(f"| {m} | {t} | " + " | ".join(f"{got[s]:.3f}" if s in got else "-" for s in seeds) + " | "
                         + (", ".join(f"{d:+.3f}" for d in diff.values()) if m != "uniform-seen" else "")
                         + f" | {tally} |")
    if noise:
        lines += ["", "Answer-loss noise, final stage, pooled over seeds: "
                  + ", ".join(f"{t} {v:.3f}" for t, v in noise.items())]
    return lines


def sequence_markdown(result: dict) -> str:
    rows, seen = result["rows"], result["seen_by_stage"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    S = len(seen)
    labels = result.get("changes") or ["+" + ",".join(seen[s][len(seen[s - 1]) if s else 0:]) for s in range(S)]
    head = ["method"] + [f"stage {s} ({labels[s]})" for s in range(S)] + ["final mean ppl", "search FLOPs", "total FLOPs"]
    lines = ["Mean val loss over the stage's current domains (all seen so far, less removed and replaced ones), "
             "after each stage:", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        by = {r["stage"]: r for r in rows if r["method"] == m}
        f = result["flops"][m]
        lines.append(f"| {m} | " + " | ".join(f"{by[s]['mean_loss']:.4f}" if s in by else "-" for s in range(S))
                     + f" | {by[S - 1]['mean_ppl']:.2f} | {f['search']:.3g} | {f['main'] + f['search']:.3g} |")
    last = {r["method"]: r for r in rows if r["stage"] == S - 1}
    lines += ["", "Final per-domain val loss:", "", "| method | " + " | ".join(seen[-1]) + " |",
              "|" + "---|" * (len(seen[-1]) + 1)]
    for m, r in last.items():
        lines.append(f"| {m} | " + " | ".join(f"{r['val_loss'][d]:.4f}" for d in seen[-1]) + " |")
    tasks = [d for d in seen[-1] if any(d in r.get("instruct", {}) for r in rows if r["stage"] > 0)]
    if tasks:
        from opmix_ray.experiments.instruct_eval import markdown as instruct_markdown
        lines += ["", instruct_markdown(rows, tasks, result.get("instruct_majority_em")).rstrip("\n")]
    searched = [r for r in rows if r["stage"] > 0 and r.get("stage_search_flops") and r.get("stage_main_flops")]
    if searched:
        lines += ["", "Search FLOPs / the stage's training FLOPs:", ""]
        for m in dict.fromkeys(r["method"] for r in searched):
            lines.append(f"- {m}: " + ", ".join(f"stage {r['stage']} {r['stage_search_flops'] / r['stage_main_flops']:.2f}"
                                              for r in searched if r["method"] == m))
    if result.get("noise_by_stage"):
        lines += ["", "uniform-seen's data-order noise (sqrt(2) x the sd of the stage's mean loss over its orders "
                  "from one checkpoint): " + ", ".join(f"stage {n['stage']} {n['noise']:.4f} ({len(n['mean_loss'])} orders)"
                                                     for n in result["noise_by_stage"])]
    lines += ["", "Stage mixtures (token shares):", ""]
    for r in rows:
        if r["stage"] > 0:
            mix = ", ".join(f"{d} {w:.2f}" for d, w in r["mixture"].items() if w > 0.005)
            lines.append(f"- stage {r['stage']} {r['method']}: {mix}")
    return "\n".join(lines) + "\n"
