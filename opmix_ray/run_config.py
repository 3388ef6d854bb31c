"""A run dir's own config: read back from <run_dir>/config.yaml and re-pointed at where the dir is now
(it may have moved), for resume, add-domain and fidelity."""
from __future__ import annotations

from pathlib import Path

import yaml

from opmix_ray import rundir
from opmix_ray.config import Config, load_config
from opmix_ray.errors import RunDirError
from opmix_ray.history import damaged, history_problems
from opmix_ray.storage import is_uri, read_json


def bad_run_dir(run_dir: Path, why: str) -> RunDirError:
    return RunDirError(f"config error at RUN_DIR: {run_dir} {why} (fix: pass a run dir that `opmix-ray run` "
                       "wrote, e.g. opmix_runs/NAME)")


def load_run_config(run_dir: Path, need_history: bool = True) -> tuple[Config, dict]:
    """The run's own config (re-pointed at run_dir, which may have moved) and its history (a live
    run has none before its first push: need_history=False gives {"rounds": []} then)."""
    if not run_dir.is_dir():
        raise bad_run_dir(run_dir, "is not a directory")
    if not need_history and not (run_dir / rundir.HISTORY).is_file():
        return load_run_config_only(run_dir), {"rounds": []}
    missing = [f for f in (rundir.CONFIG, rundir.HISTORY) if not (run_dir / f).is_file()]
    if missing:
        raise bad_run_dir(run_dir, f"is not an opmix-ray run dir (no {' or '.join(missing)})")
    try:
        raw = yaml.safe_load((run_dir / rundir.CONFIG).read_text()) or {}
        history = read_json(run_dir / rundir.HISTORY)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise bad_run_dir(run_dir, f"has an unreadable {rundir.CONFIG} or {rundir.HISTORY} ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise bad_run_dir(run_dir, f"has a {rundir.CONFIG} opmix-ray did not write")
    if problems := history_problems(history):
        raise damaged(run_dir, rundir.HISTORY, "; ".join(problems))
    return _repointed(raw, run_dir), history


def load_run_config_only(run_dir: Path, overrides: dict | None = None) -> Config:
    """A run dir's own config (repointed at where the dir is now), plus `overrides`."""
    try:
        raw = yaml.safe_load((run_dir / rundir.CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise bad_run_dir(run_dir, f"has no readable {rundir.CONFIG} ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise bad_run_dir(run_dir, f"has a {rundir.CONFIG} opmix-ray did not write")
    return _repointed(raw, run_dir, overrides)


def _repointed(raw: dict, run_dir: Path, overrides: dict | None = None) -> Config:
    run = raw.setdefault("run", {})
    # A run written before selection windows existed scored its candidates on val; its saved config
    # has no such field, and today's default would split its data differently (another data hash).
    if isinstance(raw.get("data"), dict) and "selection_tokens_per_domain" not in raw["data"]:
        raw["data"]["selection_tokens_per_domain"] = 0
    if not is_uri(run.get("storage_path", "")):  # a URI run resumes from its local staging dir
        run["storage_path"], run["name"] = str(run_dir.parent), run_dir.name
    return load_config(raw, overrides)
