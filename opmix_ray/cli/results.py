"""`opmix-ray results PATH [--json]`: a run's mixture table, or a bench or continual output dir's tables.

    opmix-ray results opmix_runs/demo --baseline opmix_runs/demo-uniform
    opmix-ray results opmix_runs/demo --json | python -m json.tool      # history + summary, one document
    opmix-ray results bench_runs/default                                # the bench's markdown tables
"""
from __future__ import annotations

import json
from pathlib import Path

from opmix_ray import rundir


def _experiment_result(path: str) -> tuple[str, dict] | None:
    """("bench" | "continual", results.json) when `path` is an output dir of `opmix-ray bench` or
    `opmix-ray continual` (not a run dir), else None."""
    p = Path(path)
    if "://" in path or not (p / "results.json").is_file() or (p / rundir.HISTORY).exists():
        return None
    from opmix_ray.errors import RunDirError
    from opmix_ray.storage import read_json
    try:
        result = read_json(p / "results.json")
    except (OSError, ValueError) as exc:
        raise RunDirError(f"config error at PATH: {p}/results.json is not readable JSON ({type(exc).__name__}) "
                          "(fix: pass a dir `opmix-ray bench` or `opmix-ray continual` wrote)") from None
    kind = "continual" if isinstance(result, dict) and "seen_by_stage" in result else \
        "bench" if isinstance(result, dict) and "oracle" in result else None
    if kind is None:
        raise RunDirError(f"config error at PATH: {p}/results.json was not written by bench or continual "
                          "(fix: pass a run dir or an output dir of those commands)")
    return kind, result


def cmd_results(args) -> int:
    exp = _experiment_result(args.path)
    if exp is not None:
        kind, result = exp
        if args.json:
            print(json.dumps(result, indent=1))
        elif kind == "bench":
            from opmix_ray.experiments.bench_report import markdown
            print(markdown(result))
        else:
            from opmix_ray.experiments.continual_report import markdown
            print(markdown(result))
        return 0
    from opmix_ray.report import load_run, mixture_table
    history, summary = load_run(args.path)
    base = load_run(args.baseline)[1] if args.baseline else None
    if args.json:  # one document: `opmix-ray results RUN --json | python -m json.tool`
        print(json.dumps({"history": history, "summary": summary, **({"baseline": base} if base else {})}, indent=1))
        return 0
    print(mixture_table(history, base))
    if summary:
        print(f"final mean val perplexity {summary['final_val_ppl_mean']:.3f}; wall {summary['wall_s']:.0f}s")
    return 0
