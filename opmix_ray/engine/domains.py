"""Domain-set changes in a running job: add, remove, revise or split a domain of a live run.

    opmix-ray run opmix_ray/configs/demo.yaml &                       # a live run
    opmix-ray add-domain    opmix_runs/demo ./legal.parquet            # a new domain
    opmix-ray remove-domain opmix_runs/demo fortunes                   # never drawn again, still scored
    opmix-ray revise-domain opmix_runs/demo python ./python_v2.parquet # new data for a domain
    opmix-ray split-domain  opmix_runs/demo manpages ./man1.parquet ./man8.parquet

This is the driver's half: live.json (the driver's Ray address, namespace and auth mode; written
at start, removed at the end) says where a command finds the run's MixtureController, and the
commands (opmix_ray/cli/live_domains.py) queue checked changes there. At the next round boundary the driver applies the
queued changes (`arrive`): new or revised domains are "affected"; every other domain is collapsed
into the "old" coordinate with its ratios frozen (a removed domain drops out and the rest are
renormalised). The round trains adapters only for the affected domains plus one on the old
mixture, searches over {old, affected} and pushes the expanded mixture; the main run picks up the
new shards with that push, without a restart. A change with no affected domain (a removal) is
pushed as the renormalised mixture, with no adapters and no search (mixture reuse).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from opmix_ray import rundir
from opmix_ray.config import Config
from opmix_ray.storage import atomic_write_bytes


def write_live(run_dir: Path, controller: str) -> None:
    """Where a second process finds this run's controller. Ray must be up in the driver."""
    import ray
    ctx = ray.get_runtime_context()
    atomic_write_bytes(run_dir / rundir.LIVE, json.dumps({
        "gcs_address": ctx.gcs_address, "namespace": ctx.namespace, "controller": controller,
        "host": socket.gethostname(), "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
        # "token" when the cluster wants ~/.ray/auth_token (never the token itself)
        "auth_mode": os.environ.get("RAY_AUTH_MODE", "")}).encode())


def clear_live(run_dir: Path) -> None:
    (run_dir / rundir.LIVE).unlink(missing_ok=True)


def apply_changes(cfg: Config, run_dir: Path, shards, changes: list[dict]):
    from opmix_ray.data.read import domain_file_reader
    from opmix_ray.data.shards import revised_domain, with_domain, without_domain
    read = domain_file_reader(cfg)  # data.reader's: with ray_data the new tokens stay in the object store
    for c in changes:
        if c["op"] == "add":
            shards = with_domain(cfg, shards, c["name"], run_dir / c["file"], read)
        elif c["op"] == "revise":
            shards = revised_domain(cfg, shards, c["name"], run_dir / c["file"], read)
        else:
            shards = without_domain(shards, c["name"])
    return shards


def arrive(cfg: Config, run_dir: Path, shards, current, changes: list[dict]):
    """(new shards, the old mixture over them: affected domains at 0 and the rest renormalised,
    the affected domains: this round trains adapters for them plus 'old'; none means no search,
    what staying stands for: the new data at a prior share, engine/rule.py prior_stay; None when
    nothing arrived). A revised domain keeps its weight; domains added with others removed in the
    same change (a split) share the removed weight by tokens; otherwise each added domain gets 1/n."""
    from opmix_ray.engine.rule import prior_stay
    from opmix_ray.mixture import Mixture
    shards = apply_changes(cfg, run_dir, shards, changes)
    affected = list(dict.fromkeys(c["name"] for c in changes if c["op"] != "remove"))
    old = {d: 0.0 if d in affected else current.as_dict().get(d, 0.0) for d in shards.domains}
    if sum(old.values()) <= 0:  # every weighted domain changed: the old coordinate is uniform
        old = dict.fromkeys(shards.domains, 1.0)
    mix = Mixture.normalised(shards.domains, [old[d] for d in shards.domains], shards.data_hash)
    if not affected:
        return shards, mix, affected, None
    added = [c["name"] for c in changes if c["op"] == "add"]
    removed = [c["name"] for c in changes if c["op"] == "remove"]
    replaced = {c["name"]: [c["name"]] for c in changes if c["op"] == "revise"}
    if added and removed:
        replaced.update({r: added for r in removed})
        added = []
    stay = prior_stay(current.as_dict(), shards.domains, added, replaced, shards.train_tokens())
    return shards, mix, affected, stay


def replay_changes(cfg: Config, run_dir: Path, shards, meta: dict):
    """The shards a resumed run had: its start domains with every live change applied in order."""
    return apply_changes(cfg, run_dir, shards, meta.get("domain_changes", []))
