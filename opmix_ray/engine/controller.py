"""MixtureController: the named Ray actor that owns the live mixture and the run's history.

The main run asks it for the mixture, tells it when a round checkpoint is written and waits on it
for the winner; the driver waits on it for checkpoints and pushes winners into it. Each push and
the final report rewrite history.json and history.parquet atomically in the run dir, so a reader
never sees a half-written history and a killed driver loses at most the round in flight.

    ctl = MixtureController.options(name=controller_name(run)).remote(RunStore(run_dir), mixture)
    ray.get(ctl.get_mixture.remote())
"""
from __future__ import annotations

import asyncio

import ray

from opmix_ray import rundir
from opmix_ray.engine.records import BoundaryInfo
from opmix_ray.mixture import Mixture
from opmix_ray.storage import RunStore


def controller_name(run_name: str) -> str:
    return f"opmix_controller::{run_name}"


def flatten_record(rec: dict) -> dict:
    """{'weights': {'a': 1}} -> {'weights.a': 1}: one flat parquet row per round."""
    out = {}
    for k, v in rec.items():
        if isinstance(v, dict):
            for kk, vv in flatten_record(v).items():
                out[f"{k}.{kk}"] = vv
        else:
            out[k] = v
    return out


@ray.remote(num_cpus=0, max_concurrency=64)
class MixtureController:
    def __init__(self, store: RunStore | str, initial: Mixture, meta: dict | None = None,
                 history: list[dict] | None = None):
        """history: the rounds a resumed run already pushed (opmix-ray resume); they are kept as
        saved and count as pushed, and `initial` must be the last one's winner."""
        # a RunStore also mirrors each history write to the run's URI (storage.py)
        self.store = store if isinstance(store, RunStore) else RunStore(store)
        self.mixture = initial
        self.meta = dict(meta or {})
        self.history: list[dict] = [dict(r) for r in history or []]
        self.version = self.history[-1]["mixture_version"] if self.history else 0
        self.boundaries: dict[int, BoundaryInfo] = {}
        self.final: dict | None = None  # the end of run's BoundaryInfo, as history.json records it
        self._boundary_evt: dict[int, asyncio.Event] = {}
        self._push_evt: dict[int, asyncio.Event] = {}
        self.progress: list[dict] = []
        self.pending_domains: list[dict] = []  # engine/domains.py changes, taken by the driver at the next round
        self.shards_ref: list | None = None  # [ObjectRef, version] of the shards once the domain set changed
        self._persist()  # history.json from the start: a run that dies in round 0 can be resumed

    def _evt(self, table: dict, k: int) -> asyncio.Event:
        return table.setdefault(k, asyncio.Event())

    async def get_mixture(self) -> tuple[int, Mixture]:
        return self.version, self.mixture

    # --- main run side ---
    async def report_boundary(self, round_idx: int, info: BoundaryInfo) -> None:
        """The main run wrote round `round_idx`'s checkpoint; info has step, tokens, path, draws."""
        self.boundaries[round_idx] = info
        self._evt(self._boundary_evt, round_idx).set()

    async def reached(self) -> dict:
        """Boundaries the main run has reported so far, and whether it has finished."""
        return {"boundaries": sorted(self.boundaries), "final": self.final is not None}

    async def wait_push(self, round_idx: int) -> Mixture:
        """Block until the driver pushes round `round_idx`'s winner; return it."""
        await self._evt(self._push_evt, round_idx).wait()
        return self.mixture

    async def report_progress(self, info: dict) -> None:
        self.progress.append(info)

    async def get_progress(self, since: int = 0) -> list[dict]:
        return self.progress[since:]

    async def report_final(self, info: BoundaryInfo) -> None:
        self.final = info.as_dict()
        self._persist()

    # --- driver side ---
    async def wait_boundary(self, round_idx: int) -> BoundaryInfo:
        await self._evt(self._boundary_evt, round_idx).wait()
        return self.boundaries[round_idx]

    async def push(self, round_idx: int, mixture: Mixture, record: dict) -> int:
        """Make `mixture` the live one from round `round_idx` on and log the round."""
        self.mixture = mixture
        self.version += 1
        self.history.append({"round": round_idx, "mixture_version": self.version, **record})
        self._persist()
        self._evt(self._push_evt, round_idx).set()
        return self.version

    # --- domain-set changes in the live run (engine/domains.py) ---
    async def queue_changes(self, changes: list[dict]) -> int:
        """Queue changes ({"op": add|revise|remove, "name", "file"}) for the next round; returns
        how many are queued. Names are checked against the domains as they will be by then."""
        domains = list(self.mixture.domains)
        for c in self.pending_domains + changes:
            known = c["name"] in domains
            if (c["op"] == "add") == known:
                raise ValueError(f"the run {'already has' if known else 'has no'} domain '{c['name']}' "
                                 f"(fix: one of {domains} for remove/revise, a new name for add)")
            if c["op"] == "add":
                domains.append(c["name"])
            elif c["op"] == "remove":
                domains.remove(c["name"])
        self.pending_domains.extend(changes)
        return len(self.pending_domains)

    async def take_changes(self) -> list[dict]:
        out, self.pending_domains = self.pending_domains, []
        return out

    async def domains_changed(self, round_idx: int, mixture: Mixture, shards_ref: list,
                              changes: list[dict]) -> None:
        """The driver applied `changes` (new shards in shards_ref[0]); `mixture` is the old
        mixture over the new domain list until round `round_idx` pushes."""
        self.mixture = mixture
        version = self.shards_ref[1] + 1 if self.shards_ref else 1
        self.shards_ref = [shards_ref[0], version]
        self.meta["domains"] = list(mixture.domains)
        self.meta.setdefault("domain_changes", []).extend({**c, "round": round_idx} for c in changes)

    async def get_shards(self) -> list | None:
        """[ObjectRef of the shards, version] once the domain set changed, else None."""
        return self.shards_ref

    async def get_history(self) -> dict:
        return {"meta": self.meta, "rounds": self.history, "final": self.final}

    def _persist(self) -> None:
        self.store.write_json(rundir.HISTORY, {"meta": self.meta, "rounds": self.history, "final": self.final})
        rows = [flatten_record(r) for r in self.history]
        if self.final is not None:
            rows.append(flatten_record({"round": -1, **self.final}))  # -1 = end of run
        if rows:
            self.store.write_parquet(rundir.HISTORY_PARQUET, rows)
