"""`opmix-ray check RUN_DIR`: is every artifact a run left behind whole?

    opmix-ray check opmix_runs/tiny        # after a crash, a killed node, or a copy between machines
    from opmix_ray.cli.check import check_run_dir; problems = check_run_dir("opmix_runs/tiny")

Every JSON, YAML, parquet and safetensors file must parse (nothing is unpickled); no temp file of
an interrupted atomic write may be left; every pushed round must have its resumable checkpoint
and its adapters; every file a round's manifest lists (rounds/round_<k>_manifest.json, sha256,
written when the round was pushed) must be unchanged; history.json and summary.json must have
the shape every reader relies on; summary.json means the main run's end is in history.json.
"""
from __future__ import annotations

import json
from pathlib import Path

from opmix_ray import rundir
from opmix_ray.history import OWN_TRAINER, history_problems, summary_problems
from opmix_ray.rundir import STATE_JSON, STATE_TENSORS
from opmix_ray.storage import sha256_file, unreadable

# Tune names its pickled searcher state *.json; opmix never reads (or unpickles) it.
_NOT_OURS = ("search_gen_state-",)


def _unreadable(run_dir: Path) -> list[str]:
    out = []
    for p in sorted(run_dir.rglob("*")):
        if not p.is_file() or p.name.startswith(_NOT_OURS):
            continue
        rel = p.relative_to(run_dir)
        if p.name.startswith(".") and ".tmp" in p.name:
            out.append(f"{rel}: temp file of an interrupted write")
        elif (why := unreadable(p)) is not None:
            out.append(f"{rel}: {why}")
    return out


def _missing(run_dir: Path, history: dict) -> list[str]:
    out = []
    # a trainer of your own resumes from its own checkpoints, and may decide on one outside the run dir
    names = () if history.get("meta", {}).get("client") == OWN_TRAINER else \
        (STATE_JSON, STATE_TENSORS, "config.json", "model.safetensors")
    for rec in history.get("rounds", []):
        k = rec["round"]
        ckpt = rundir.at(run_dir, rundir.checkpoint(k))
        for name in names:
            if not (ckpt / name).is_file():
                out.append(f"{rundir.checkpoint(k)}/{name}: missing for pushed round {k}")
        root = rundir.at(run_dir, rundir.adapter_root(k))  # LoRA adapters, or full components (adapters.kind)
        if not list(root.glob("*/adapter_model.safetensors")) + list(root.glob("*/model.safetensors")):
            out.append(f"{rundir.adapters_job(k)}: no adapters for pushed round {k}")
    if (run_dir / rundir.SUMMARY).is_file() and history.get("final") is None:
        out.append(f"{rundir.SUMMARY}: present but {rundir.HISTORY} has no end of run")
    return out


def _checksums(run_dir: Path) -> list[str]:
    """Every file a round's manifest lists must still be there with the same sha256."""
    out = []
    for m in rundir.manifests(run_dir):
        try:
            listed = json.loads(m.read_bytes())
        except ValueError:
            continue  # _unreadable reports it
        for rel, sha in sorted(listed.items()):
            p = run_dir / rel
            if not p.is_file():
                out.append(f"{rel}: missing (listed in {m.relative_to(run_dir)})")
            elif sha256_file(p) != sha:
                out.append(f"{rel}: changed since it was written (sha256 differs from {m.relative_to(run_dir)})")
    return out


def check_run_dir(run_dir: str | Path) -> list[str]:
    """Problems found in a run dir (empty list: every artifact is whole)."""
    run_dir = Path(run_dir)
    if not (run_dir / rundir.HISTORY).is_file():
        return [f"{run_dir}: no {rundir.HISTORY} (not an opmix-ray run dir, or it never started)"]
    out = _unreadable(run_dir)
    if not any(o.startswith(rundir.HISTORY) for o in out):
        history = json.loads((run_dir / rundir.HISTORY).read_bytes())
        shape = history_problems(history)
        out += [f"{rundir.HISTORY}: {p}" for p in shape] or _missing(run_dir, history)
    out += _checksums(run_dir)
    if (run_dir / rundir.SUMMARY).is_file() and not any(o.startswith(f"{rundir.SUMMARY}: unreadable") for o in out):
        out += [f"{rundir.SUMMARY}: {p}" for p in summary_problems(json.loads((run_dir / rundir.SUMMARY).read_bytes()))]
    return out
