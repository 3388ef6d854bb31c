"""The benchmark's and a run's figures say what they show: titles, a legend with a distinct marker
per method, no point at a made-up "0 FLOPs", the oracle at the FLOPs of all its runs, tokens on the
x axis of a run's mixture plot."""
from pathlib import Path

import matplotlib
import pytest

from opmix_ray.experiments.bench_report import MARKERS, flops_figure, summarise
from opmix_ray.storage import read_json

matplotlib.use("Agg")
# a real bench kept in the archive: 7 methods x 3 seeds + 16 oracle runs
RESULTS = (Path(__file__).resolve().parent.parent / "benchmarks" / "archive" / "2026-12-05" / "results" / "bench"
           / "results.json")


def test_search_flops_figure():
    result = read_json(RESULTS)
    fig = flops_figure(result)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    summ = summarise(result)
    assert len(legend) == len(summ) and len(set(legend)) == len(legend)
    assert "uniform (n=3), no search" in legend and "natural (n=3), no search" in legend
    for ax in fig.axes:
        assert "lower is better" in ax.get_title() and ax.get_xscale() == "log"
        points = [line for line in ax.get_lines() if line.get_marker() not in (None, "None", "")]
        xs = [x for line in points for x in line.get_xdata()]
        assert xs and min(xs) > 1e9  # nothing drawn at a stand-in for 0
        styles = [(line.get_marker(), line.get_color()) for line in points if line.get_marker() in MARKERS]
        assert len(styles) == len(set(styles)) == len([s for s in summ if s["search_flops"] > 0])
    oracle = [s for s in summ if s["label"] == "oracle (mean)"][0]
    assert oracle["search_flops"] == pytest.approx(sum(r["main_flops"] for r in result["oracle"]))


def test_run_mixture_plot_is_over_tokens(tmp_path):
    import matplotlib.pyplot as plt

    from opmix_ray.report import plot_history
    meta = {"run": "r", "domains": ["a", "b"], "initial_mixture": {"a": 0.5, "b": 0.5}, "total_steps": 10,
            "boundaries": [4]}
    history = {"meta": meta, "rounds": [{"round": 0, "step": 4, "tokens": 4096, "weights": {"a": 0.7, "b": 0.3},
                                          "base_val_loss": {"a": 5.0, "b": 6.0}}],
               "final": {"step": 10, "tokens_per_step": 1024, "val_loss": {"a": 4.0, "b": 5.0}}}
    made = []
    orig = plt.subplots
    plt.subplots = lambda *a, **k: made.append(orig(*a, **k)) or made[-1]
    try:
        plot_history(history, tmp_path / "mixture.png")
    finally:
        plt.subplots = orig
    ax_w, ax_l = made[0][1]
    assert "tokens" in ax_w.get_xlabel() and "tokens" in ax_l.get_xlabel()
    assert max(ax_w.get_lines()[0].get_xdata()) == pytest.approx(10 * 1024 / 1e6)
    assert (tmp_path / "mixture.png").stat().st_size > 0
