"""What `opmix-ray run` and `opmix-ray demo` print when a run ends: the mixture per round, the
comparison with the baseline (with the measured noise of that comparison where the package ships
it) and the compute, and the plot they draw."""
from __future__ import annotations

from opmix_ray import rundir


def print_run(summary: dict, baseline: dict | None = None, cfg=None) -> None:
    from opmix_ray.report import comparison_line, load_run, mixture_table, objective_line, plot_history
    history, _ = load_run(summary["run_dir"])
    png = plot_history(history, rundir.at(summary["run_dir"], rundir.MIXTURE_PNG), baseline)
    print("\nmixture per round (token shares), tokens really drawn in the last segment, final val perplexity:")
    print(mixture_table(history, baseline))
    if baseline:
        print(comparison_line(summary, baseline))
        weights = cfg.search.objective_weights if cfg is not None else None
        if weights:
            print(objective_line(summary, baseline, weights, *measured_noise(cfg, weights)))
    print(f"search FLOPs {summary['search_flops']:.3g} vs main-run FLOPs {summary['main_flops']:.3g}; "
          f"wall {summary['wall_s']:.0f}s")
    rates = [f"round {k}: {r:.2f}" for k, r in enumerate(summary.get("candidates_per_s") or []) if r]
    if rates:
        print(f"candidates scored per second of search: {', '.join(rates)}")
    print(f"plot: {png}\nhistory: {summary['run_dir']}/{rundir.HISTORY} (+ {rundir.HISTORY_PARQUET})")


def measured_noise(cfg, weights: dict) -> tuple[float | None, str]:
    """The shipped headroom measurement's noise for this setting and objective, and where it is from."""
    from opmix_ray.experiments.headroom import shipped_headroom
    res = shipped_headroom(cfg)
    name = {frozenset(cfg.data.eval_only_domains): "target", frozenset(cfg.data.domains or ()): "mean"}.get(
        frozenset(weights))
    if res is None or name not in res["objectives"] or len(set(weights.values())) > 1:
        return None, ""
    return res["objectives"][name]["noise_sd"], f"{res['measured_by']}, opmix_ray/configs/{res['file']}"
