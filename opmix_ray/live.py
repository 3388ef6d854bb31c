"""Domain-set changes in a running job: add, remove, revise or split a domain of a live run.

    opmix-ray run opmix_ray/configs/demo.yaml &                       # a live run
    opmix-ray add-domain    opmix_runs/demo ./legal.parquet            # a new domain
    opmix-ray remove-domain opmix_runs/demo fortunes                   # never drawn again, still scored
    opmix-ray revise-domain opmix_runs/demo python ./python_v2.parquet # new data for a domain
    opmix-ray split-domain  opmix_runs/demo manpages ./man1.parquet ./man8.parquet

A command checks new files with the run's own tokenizer and split rules (one-line error, exit 2),
copies them into <run_dir>/added_domains/ (atomically) and queues the change at the run's
MixtureController, found through <run_dir>/live.json (the driver's Ray address, namespace and auth
mode; written at start, removed at the end). At the next round boundary the driver applies the
queued changes (`arrive`): new or revised domains are "affected"; every other domain is collapsed
into the "old" coordinate with its ratios frozen (a removed domain drops out and the rest are
renormalised). The round trains adapters only for the affected domains plus one on the old
mixture, searches over {old, affected} and pushes the expanded mixture; the main run picks up the
new shards with that push, without a restart. A change with no affected domain (a removal) is
pushed as the renormalised mixture, with no adapters and no search (mixture reuse).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from opmix_ray import rundir
from opmix_ray.config import Config, ConfigError
from opmix_ray.storage import atomic_write_bytes, read_json

LIVE_FILE = rundir.LIVE
ADDED_DIR = rundir.ADDED_DOMAINS


def write_live(run_dir: Path, controller: str) -> None:
    """Where a second process finds this run's controller. Ray must be up in the driver."""
    import ray
    ctx = ray.get_runtime_context()
    atomic_write_bytes(run_dir / LIVE_FILE, json.dumps({
        "gcs_address": ctx.gcs_address, "namespace": ctx.namespace, "controller": controller,
        "host": socket.gethostname(), "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
        # "token" when the cluster wants ~/.ray/auth_token (never the token itself)
        "auth_mode": os.environ.get("RAY_AUTH_MODE", "")}).encode())


def clear_live(run_dir: Path) -> None:
    (run_dir / LIVE_FILE).unlink(missing_ok=True)


def apply_changes(cfg: Config, run_dir: Path, shards, changes: list[dict]):
    from opmix_ray.data.shards import revised_domain, with_domain, without_domain
    for c in changes:
        if c["op"] == "add":
            shards = with_domain(cfg, shards, c["name"], run_dir / c["file"])
        elif c["op"] == "revise":
            shards = revised_domain(cfg, shards, c["name"], run_dir / c["file"])
        else:
            shards = without_domain(shards, c["name"])
    return shards


def arrive(cfg: Config, run_dir: Path, shards, current, changes: list[dict]):
    """(new shards, the old mixture over them: affected domains at 0 and the rest renormalised,
    this round's config: adapters for the affected domains plus 'old', or None for no search)."""
    from opmix_ray.mixture import Mixture
    shards = apply_changes(cfg, run_dir, shards, changes)
    affected = list(dict.fromkeys(c["name"] for c in changes if c["op"] != "remove"))
    old = {d: 0.0 if d in affected else current.as_dict().get(d, 0.0) for d in shards.domains}
    if sum(old.values()) <= 0:  # every weighted domain changed: the old coordinate is uniform
        old = dict.fromkeys(shards.domains, 1.0)
    mix = Mixture.normalised(shards.domains, [old[d] for d in shards.domains], shards.data_hash)
    if not affected:
        return shards, mix, None
    round_cfg = cfg.model_copy(deep=True)
    round_cfg.adapters.domains, round_cfg.adapters.include_old = affected, True
    return shards, mix, round_cfg


def replay_changes(cfg: Config, run_dir: Path, shards, meta: dict):
    """The shards a resumed run had: its start domains with every live change applied in order."""
    return apply_changes(cfg, run_dir, shards, meta.get("domain_changes", []))


def _live_info(run_dir: Path) -> dict:
    if (run_dir / rundir.SUMMARY).is_file():
        raise ConfigError(f"config error at RUN_DIR: {run_dir} has finished (fix: start a new run, or use "
                          "`opmix-ray continual` with a schedule)")
    if not (run_dir / LIVE_FILE).is_file():
        raise ConfigError(f"config error at RUN_DIR: {run_dir} is not a live run (no {LIVE_FILE}) (fix: pass "
                          "the dir of a run that is still training)")
    return read_json(run_dir / LIVE_FILE)


def _copy_in(run_dir: Path, name: str, path: Path) -> str:
    """Copy a domain file into the run dir (temp file + rename); the name carries its hash, so a
    revision never overwrites the data an earlier change (and a resume) points at."""
    sha = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    rel = f"{ADDED_DIR}/{name}-{sha}.parquet"
    (run_dir / ADDED_DIR).mkdir(exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=run_dir / ADDED_DIR, delete=False) as tmp, path.open("rb") as src:
        shutil.copyfileobj(src, tmp)
    os.replace(tmp.name, run_dir / rel)
    return rel


def change_domains(run_dir: str | Path, changes: list[dict]) -> list[dict]:
    """Check, copy and queue changes for a live run: [{"op": "add"|"revise", "name", "path"} |
    {"op": "remove", "name"}], applied together at the next round. Returns what was queued."""
    run_dir = Path(run_dir).expanduser().resolve()
    live = _live_info(run_dir)
    if live.get("auth_mode"):  # before Ray is imported: it reads the mode once
        os.environ.setdefault("RAY_AUTH_MODE", live["auth_mode"])
    from opmix_ray.data.shards import build_shards
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
    # the run's domains now, then these changes: bad data or names fail here, before the run sees them
    shards = replay_changes(cfg, run_dir, build_shards(cfg), history.get("meta", {}))
    apply_changes(cfg, run_dir, shards, [{**c, "file": str(c.get("path", ""))} for c in queued])  # absolute paths
    queued = [{"op": c["op"], "name": c["name"], "file": _copy_in(run_dir, c["name"], c["path"])}
              if c["op"] != "remove" else {"op": "remove", "name": c["name"], "file": None} for c in queued]
    return _queue(live, queued)


def _queue(live: dict, changes: list[dict]) -> list[dict]:
    import ray
    # on the driver's host, join through its node (a local run's Ray binds 127.0.0.1 only)
    here = {"_node_ip_address": live["node_ip"]} if live.get("host") == socket.gethostname() else {}
    ray.init(address=live["gcs_address"], namespace=live["namespace"], log_to_driver=False,
             logging_level="ERROR", **here)
    try:
        ctl = ray.get_actor(live["controller"], namespace=live["namespace"])
    except ValueError:
        raise ConfigError("config error at RUN_DIR: the run's driver has exited (no live controller) "
                          "(fix: `opmix-ray resume` it, then retry)") from None
    try:
        ray.get(ctl.queue_changes.remote(changes))
    except ray.exceptions.RayTaskError as exc:  # a name clash the controller caught
        raise ConfigError(f"config error at NAME: {exc.cause} ") from None
    finally:
        ray.shutdown()
    return changes
