"""Read a finished run back: the mixture-per-round table, the comparison, the PNG plot.

    opmix-ray results opmix_runs/demo
"""
from __future__ import annotations

import math
from pathlib import Path

from opmix_ray.history import read_history, read_summary
from opmix_ray.storage import atomic_write_bytes


def load_run(run_dir: str | Path) -> tuple[dict, dict | None]:
    """history.json and summary.json (None while running) of a run dir or a run's URI
    (s3://bucket/runs/demo, through pyarrow.fs), both checked (opmix_ray/history.py)."""
    return read_history(run_dir), read_summary(run_dir)


def all_domains(meta: dict) -> list[str]:
    """The run's training domains now, then those removed live (still scored; engine/domains.py)."""
    gone = [c["name"] for c in meta.get("domain_changes", []) if c["op"] == "remove"]
    return list(meta["domains"]) + [d for d in dict.fromkeys(gone) if d not in meta["domains"]]


def mixture_table(history: dict, baseline: dict | None = None) -> str:
    """Domains x (prefix, round 0..R-1, drawn in the last segment, final val ppl[, baseline ppl]).
    A domain added or removed live has weight 0 in the rounds where it was not in the mixture."""
    doms = all_domains(history["meta"])
    rounds = history["rounds"]
    final = history.get("final") or {}
    cols = ["prefix"] + [f"round {r['round']}" for r in rounds] + (["drawn"] if final else [])
    cols += ["val ppl"] if final else []
    cols += [f"{baseline['baseline']} ppl"] if baseline else []
    lines = [f"{'domain':<12}" + "".join(f"{c:>13}" for c in cols)]
    for d in doms:
        row = [history["meta"]["initial_mixture"].get(d, 0.0)] + [r["weights"].get(d, 0.0) for r in rounds]
        cells = [f"{x:>13.3f}" for x in row]
        if final:
            cells += [f"{final['drawn'].get(d, 0.0):>13.3f}", f"{math.exp(final['val_loss'][d]):>13.2f}"]
        if baseline:
            cells.append(f"{math.exp(baseline['final_val_loss'].get(d, math.nan)):>13.2f}")
        lines.append(f"{d:<12}" + "".join(cells))
    for d in [d for d in (final or {}).get("val_loss", {}) if d not in doms]:  # held-out targets: scored only
        cells = [f"{'held out':>13}"] + [f"{'':>13}"] * (len(cols) - 2 - bool(baseline))
        cells.append(f"{math.exp(final['val_loss'][d]):>13.2f}")
        if baseline:
            cells.append(f"{math.exp(baseline['final_val_loss'].get(d, math.nan)):>13.2f}")
        lines.append(f"{d:<12}" + "".join(cells))
    if final:
        train_doms = history["meta"]["domains"]  # the mean is over the domains trained at the end
        mean_ppl = sum(math.exp(final["val_loss"][d]) for d in train_doms) / len(train_doms)
        tail = f"{'mean ppl':<12}" + " " * 13 * (len(cols) - (2 if baseline else 1)) + f"{mean_ppl:>13.2f}"
        if baseline:
            tail += f"{baseline['final_val_ppl_mean']:>13.2f}"
        lines.append(tail)
    return "\n".join(lines)


def comparison_line(summary: dict, baseline: dict) -> str:
    ours, base = summary["final_val_ppl_mean"], baseline["final_val_ppl_mean"]
    rel = 100.0 * (ours - base) / base
    return (f"mean val perplexity: OP-Mix {ours:.3f} vs {baseline['baseline']} {base:.3f} "
            f"({rel:+.2f}%, same tokens and seed; negative = OP-Mix better)")


def objective_line(summary: dict, baseline: dict, weights: dict[str, float], noise: float | None = None,
                   source: str = "") -> str:
    """The run's own objective (search.objective_weights) against the baseline, in nats of val loss,
    with the data-order noise of such a comparison where it was measured for this setting."""
    total = sum(weights.values())
    obj = lambda losses: sum(losses[d] * v for d, v in weights.items()) / total
    ours, base = obj(summary["final_val_loss"]), obj(baseline["final_val_loss"])
    diff = ours - base
    names = ", ".join(weights)
    line = (f"objective ({names}) val loss: OP-Mix {ours:.4f} vs {baseline['baseline']} {base:.4f}: {diff:+.4f} nats "
            f"(perplexity {100.0 * (math.exp(diff) - 1):+.1f}%; negative = OP-Mix better)")
    if noise is None:
        return line + ("\nthe data-order noise of this comparison is not measured for this setting "
                       "(`opmix-ray headroom CONFIG` measures it)")
    verdict = ("beyond twice the noise" if abs(diff) > 2 * noise else
               "within twice the noise: no difference")
    return line + (f"\nnoise of one such comparison (sd over data orders, {source}): {noise:.4f} nats; "
                   f"this difference is {abs(diff) / noise:.1f} sd, {verdict}")


def plot_history(history: dict, out_png: str | Path, baseline: dict | None = None) -> Path:
    """Two panels: mixture weights over the run's tokens, per-domain val loss at each boundary."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms, meta = all_domains(history["meta"]), history["meta"]
    rounds, final = history["rounds"], history.get("final")
    total = meta["total_steps"]
    # tokens, not steps: what a mixture is spent on (steps differ between configs; tokens compare)
    per_step = (final or {}).get("tokens_per_step") or next(
        (r["tokens"] / r["step"] for r in rounds if r.get("step")), 1.0)
    tok = lambda step: step * per_step / 1e6
    fig, (ax_w, ax_l) = plt.subplots(1, 2, figsize=(12, 4.5))
    starts = [tok(x) for x in [0] + [r["step"] for r in rounds] + [total]]
    mixes = [meta["initial_mixture"]] + [r["weights"] for r in rounds]
    for d in doms:
        ys = [m.get(d, 0.0) for m in mixes] + [mixes[-1].get(d, 0.0)]
        ax_w.step(starts, ys, where="post", label=d)
    ax_w.set(title="mixture weights (token share) over the run", xlabel="main-run tokens (millions)", ylabel="weight",
             ylim=(0, 1.1 * max(max(m.values(), default=0.0) for m in mixes) or 1.0))
    ax_w.legend(fontsize=8)
    steps = [tok(r["step"]) for r in rounds] + ([tok(final["step"])] if final else [])
    for d in doms:
        ys = [r["base_val_loss"].get(d, math.nan) for r in rounds] + ([final["val_loss"][d]] if final else [])
        line, = ax_l.plot(steps, ys, marker="o", label=d)
        if baseline:
            ax_l.scatter([tok(total)], [baseline["final_val_loss"].get(d, math.nan)], marker="x", color=line.get_color())
    ax_l.set(title="per-domain val loss, lower is better\n(x = uniform baseline at the end)" if baseline else
             "per-domain val loss, lower is better", xlabel="main-run tokens (millions)", ylabel="loss (nats/token)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
    return Path(out_png)
