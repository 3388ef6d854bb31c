"""A run's history.json and summary.json read back, and checked before anything uses them.

    history = read_history("opmix_runs/demo")        # or s3://bucket/runs/demo
    summary = read_summary("opmix_runs/demo")        # None while the run trains

The driver writes both atomically, so a damaged one is a copy gone wrong, a full disk or a hand
edit. Whatever reads them (results, check, resume, fidelity, the domain commands) gets one line
naming the file and what is wrong, and pointing to `opmix-ray check`, never a KeyError.
"""
from __future__ import annotations

from pathlib import Path

from opmix_ray import rundir
from opmix_ray.errors import RunDirError
from opmix_ray.storage import is_file, join, read_json, redact

# meta["client"] of a run dir whose rounds a trainer of your own asked for (opmix_ray/own_trainer/):
# its main-run resume state lives in that trainer's own checkpoints, not in the run dir
OWN_TRAINER = "own_trainer"

# what `results` and the run's own report read from summary.json
SUMMARY_KEYS = ("run_dir", "final_val_loss", "final_val_ppl_mean", "main_flops", "search_flops", "wall_s")


def _is_mixture(x) -> bool:
    return isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                                       for k, v in x.items())


def history_problems(h) -> list[str]:
    """What is wrong with a parsed history.json (empty: the shape every reader relies on)."""
    if not isinstance(h, dict):
        return [f"is a JSON {type(h).__name__}, not an object"]
    out = []
    meta = h.get("meta")
    if not isinstance(meta, dict):
        out.append("has no 'meta' object")
    else:
        if not (isinstance(meta.get("domains"), list) and all(isinstance(d, str) for d in meta["domains"])):
            out.append("meta.domains is not a list of names")
        if not _is_mixture(meta.get("initial_mixture")):
            out.append("meta.initial_mixture is not a mixture")
    rounds = h.get("rounds")
    if not isinstance(rounds, list):
        out.append("has no 'rounds' list")
    else:
        for i, r in enumerate(rounds):
            if not isinstance(r, dict) or not isinstance(r.get("round"), int) or isinstance(r.get("round"), bool):
                out.append(f"rounds[{i}] has no round number")
            elif not _is_mixture(r.get("weights")):
                out.append(f"rounds[{i}] (round {r['round']}) has no pushed weights")
    final = h.get("final")
    if final is not None and not (isinstance(final, dict) and isinstance(final.get("val_loss"), dict)):
        out.append("'final' has no val_loss")
    return out


def summary_problems(s) -> list[str]:
    if not isinstance(s, dict):
        return [f"is a JSON {type(s).__name__}, not an object"]
    missing = [k for k in SUMMARY_KEYS if k not in s]
    return [f"lacks {missing}"] if missing else []


def damaged(run_dir, name: str, what: str) -> RunDirError:
    shown = redact(str(run_dir), query=False)
    return RunDirError(f"run dir error at {shown}/{name}: {what} (fix: `opmix-ray check {shown}` lists what is "
                       "damaged; restore the file from a copy, or start a new run)")


def _read(run_dir, name: str):
    try:
        return read_json(join(run_dir, name))
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise damaged(run_dir, name, f"unreadable ({type(exc).__name__})") from None


def read_history(run_dir: str | Path) -> dict:
    """history.json of a run dir or a run's URI, checked."""
    path = join(run_dir, rundir.HISTORY)
    try:
        found = is_file(path)
    except (ValueError, OSError) as exc:  # a URI pyarrow cannot open or reach
        raise RunDirError(f"run dir error at {redact(str(run_dir), query=False)}: cannot read it "
                          f"({str(exc).splitlines()[0][:200]}) (fix: check the URI, the credentials in the "
                          "environment and the endpoint)") from None
    if not found:
        raise RunDirError(f"run dir error at {redact(str(run_dir), query=False)}: no {rundir.HISTORY} (fix: pass "
                          "the run dir <storage_path>/<run.name> of a finished or running run)")
    h = _read(run_dir, rundir.HISTORY)
    problems = history_problems(h)
    if problems:
        raise damaged(run_dir, rundir.HISTORY, "; ".join(problems))
    return h


def read_summary(run_dir: str | Path) -> dict | None:
    """summary.json (None while the run trains), checked."""
    if not is_file(join(run_dir, rundir.SUMMARY)):
        return None
    s = _read(run_dir, rundir.SUMMARY)
    problems = summary_problems(s)
    if problems:
        raise damaged(run_dir, rundir.SUMMARY, "; ".join(problems))
    return s
