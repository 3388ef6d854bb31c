"""The domain commands of a live run (add-domain, remove-domain, revise-domain, split-domain).

    opmix-ray add-domain    opmix_runs/demo ./legal.parquet            # a new domain
    opmix-ray remove-domain opmix_runs/demo fortunes                   # never drawn again, still scored

A command checks new files with the run's own tokenizer and split rules (one-line error, exit 2),
copies them into <run_dir>/added_domains/ (atomically) and queues the change at the run's
MixtureController, found through <run_dir>/live.json. What the driver then does with a change is
opmix_ray/engine/domains.py.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from opmix_ray import rundir
from opmix_ray.config import ConfigError, name_problem
from opmix_ray.engine.domains import apply_changes, replay_changes
from opmix_ray.storage import read_json, sha256_file

LIVE_FILE = rundir.LIVE
ADDED_DIR = rundir.ADDED_DOMAINS


def _live_info(run_dir: Path) -> dict:
    if (run_dir / rundir.SUMMARY).is_file():
        raise ConfigError(f"config error at RUN_DIR: {run_dir} has finished (fix: start a new run, or use "
                          "`opmix-ray continual` with a schedule)")
    if not (run_dir / LIVE_FILE).is_file():
        raise ConfigError(f"config error at RUN_DIR: {run_dir} is not a live run (no {LIVE_FILE}) (fix: pass "
                          "the dir of a run that is still training)")
    return read_json(run_dir / LIVE_FILE)


def _driver_gone(live: dict) -> str | None:
    """Why the driver that wrote live.json is not there any more (None: it answers). A dead driver's
    GCS address makes ray.init retry for minutes, so it is probed first, in seconds."""
    pid = live.get("pid")
    if live.get("host") == socket.gethostname() and pid:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return f"its driver (pid {pid}) is not running"
        except PermissionError:
            pass  # alive, another user's
    host, _, port = str(live.get("gcs_address", "")).rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError):
        return f"its Ray cluster at {live.get('gcs_address')} does not answer"
    return None


def _copy_in(run_dir: Path, name: str, path: Path) -> tuple[str, bool]:
    """Copy a domain file into the run dir (temp file + rename); the name carries its hash, so a
    revision never overwrites the data an earlier change (and a resume) points at. Returns (the
    relative path, whether this call created it)."""
    sha = sha256_file(path)[:12]
    rel = f"{ADDED_DIR}/{name}-{sha}.parquet"
    if (run_dir / rel).is_file():
        return rel, False
    (run_dir / ADDED_DIR).mkdir(exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=run_dir / ADDED_DIR, delete=False) as tmp, path.open("rb") as src:
        shutil.copyfileobj(src, tmp)
    os.replace(tmp.name, run_dir / rel)
    return rel, True


def change_domains(run_dir: str | Path, changes: list[dict]) -> list[dict]:
    """Check, copy and queue changes for a live run: [{"op": "add"|"revise", "name", "path"} |
    {"op": "remove", "name"}], applied together at the next round. Returns what was queued."""
    for c in changes:  # a name becomes a file name in the run dir: check it before anything else
        if problem := name_problem(c["name"]):
            raise ConfigError(f"config error at NAME: domain {problem}")
    run_dir = Path(run_dir).expanduser().resolve()
    live = _live_info(run_dir)
    if why := _driver_gone(live):
        raise ConfigError(f"config error at RUN_DIR: {run_dir} is not training any more: {why}, and its "
                          f"{LIVE_FILE} is left from a driver that died (fix: `opmix-ray resume {run_dir}`, then retry)")
    if live.get("auth_mode"):  # before Ray is imported: it reads the mode once
        os.environ.setdefault("RAY_AUTH_MODE", live["auth_mode"])
    from opmix_ray.data.read import build_shards
    from opmix_ray.run_config import load_run_config
    cfg, history = load_run_config(run_dir, need_history=False)
    queued = []
    for c in changes:
        if c["op"] != "remove":
            path = Path(c["path"]).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"config error at PATH: {path} does not exist (fix: pass a parquet file "
                                  f"with a '{cfg.data.text_column}' column)")
            c = {"op": c["op"], "name": c["name"], "path": path}
        queued.append(c)
    # the run's domains now, then these changes: bad data or names fail here, before the run sees them.
    # Read here, not with Ray Data: this process joins the run's cluster below and must not start Ray.
    here = cfg.model_copy(update={"data": cfg.data.model_copy(update={"reader": "driver"})})
    shards = replay_changes(cfg, run_dir, build_shards(here), history.get("meta", {}))
    apply_changes(cfg, run_dir, shards, [{**c, "file": str(c.get("path", ""))} for c in queued])  # absolute paths
    return _queue(run_dir, live, queued)


def _queue(run_dir: Path, live: dict, changes: list[dict]) -> list[dict]:
    """Reach the controller first; only then copy the files in and queue the changes (a refused
    change takes back the files it brought)."""
    import ray

    # on the driver's host, join as the address the driver's node has
    here = {"_node_ip_address": live["node_ip"]} if live.get("host") == socket.gethostname() else {}
    ray.init(address=live["gcs_address"], namespace=live["namespace"], log_to_driver=False,
             logging_level="ERROR", **here)
    copied = []
    try:
        try:
            ctl = ray.get_actor(live["controller"], namespace=live["namespace"])
            ray.get(ctl.reached.remote(), timeout=10)
        except (ValueError, ray.exceptions.RayError):
            raise ConfigError(f"config error at RUN_DIR: the run's driver has exited (no live controller) "
                              f"(fix: `opmix-ray resume {run_dir}`, then retry)") from None
        queued = []
        for c in changes:
            if c["op"] == "remove":
                queued.append({"op": "remove", "name": c["name"], "file": None})
                continue
            rel, new = _copy_in(run_dir, c["name"], c["path"])
            copied += [rel] if new else []
            queued.append({"op": c["op"], "name": c["name"], "file": rel})
        try:
            ray.get(ctl.queue_changes.remote(queued), timeout=30)
        except ray.exceptions.RayTaskError as exc:  # a name clash the controller caught
            for rel in copied:
                (run_dir / rel).unlink(missing_ok=True)
            raise ConfigError(f"config error at NAME: {exc.cause} ") from None
    finally:
        ray.shutdown()
    return queued
