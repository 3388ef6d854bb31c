"""Sharing a round's fixed trial cost: several candidates per trial, and scorer processes that outlive a round.

search.candidates_per_trial = k: `BatchSearcher` asks the round's searcher for k suggestions per Tune
trial and packs them into one config ({"candidates": [params, ...]}); the trial scores them in order
and reports them as one result whose "batch" holds each candidate's own metrics, and each candidate
then goes back to the searcher as a trial of its own (id "<tune trial id>_c<j>"), so the searcher,
its Optuna journal and the round's records see one entry per candidate, as with k = 1.

search.scorer_pool: a fresh trial process spends seconds importing torch and transformers before
it scores anything, and Tune starts fresh ones every round. With the pool, the Tune trial only
forwards its candidates to a `_Scorer` actor on its own node, held by a named `_Pool` actor that the
driver owns, so the imports are paid once per run and not once per round. A scorer holds no Ray CPU:
the Tune trial holds them while it waits, which keeps Tune's placement and the CPU accounting as
they are. The driver starts the scorers with the main run (engine/driver.py), so their imports
overlap the first segment and the adapters' training and a run's first round finds them ready; a
search run on its own starts them when its candidates are built (engine/candidates.py). This module
imports no torch: a pooled trial process never loads it.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import ray
from ray import tune
from ray.tune.search import Searcher

if TYPE_CHECKING:
    from opmix_ray.config import Config

BATCH = "candidates"  # trial config key: the batch's params, one dict per candidate
ROWS = "batch"  # result key: each candidate's metrics, in the batch's order
POOL = "opmix_scorer_pool"


class BatchSearcher(Searcher):
    """A searcher's suggestions, k per Tune trial; `total` candidates in all (the last batch takes the rest)."""

    def __init__(self, inner: Searcher, per_trial: int, total: int):
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner, self.k, self.left = inner, int(per_trial), int(total)
        self.batches: dict[str, list[str]] = {}  # tune trial id -> the candidates' ids
        self.records: list[tuple[str, dict | None]] = []  # (candidate id, metrics or None = failed), finish order
        self._finished = False

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        ok = self.inner.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.inner.metric, self.inner.mode
        return ok

    def suggest(self, trial_id: str):
        if self._finished or self.left <= 0:
            return Searcher.FINISHED
        ids, params = [], []
        while len(params) < min(self.k, self.left):
            cid = f"{trial_id}_c{len(params)}"
            out = self.inner.suggest(cid)
            if isinstance(out, str) and out == Searcher.FINISHED:
                self._finished = True
                break
            if out is None:  # not ready for more now: ship what there is, ask again next trial
                break
            ids.append(cid)
            params.append(out)
        if not params:
            return Searcher.FINISHED if self._finished else None
        self.left -= len(params)
        self.batches[trial_id] = ids
        return {BATCH: params}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        rows = (result or {}).get(ROWS) if not error else None
        for j, cid in enumerate(self.batches.pop(trial_id, [])):
            row = rows[j] if isinstance(rows, list) and j < len(rows) else None
            self.inner.on_trial_complete(cid, row, error=row is None)
            self.records.append((cid, row))

    def save(self, checkpoint_path: str) -> None:
        self.inner.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.inner.restore(checkpoint_path)


def pack(rows: list[dict], extra: dict) -> dict:
    """One trial's result for a batch: the best candidate's metrics at the top (what Tune, the
    progress line and the trial loggers read) and every candidate's under ROWS."""
    from opmix_ray.searchers import METRIC
    rows = [{**r, **extra} for r in rows]
    finite = [r for r in rows if isinstance(r.get(METRIC), float) and math.isfinite(r[METRIC])]
    best = min(finite, key=lambda r: r[METRIC]) if finite else rows[0]
    return {**best, ROWS: rows}


def _params(config: dict) -> list[dict]:
    return config[BATCH] if BATCH in config else [config]


def _report(config: dict, rows: list[dict]) -> None:
    extra = {"node_id": ray.get_runtime_context().get_node_id()}
    tune.report(pack(rows, extra) if BATCH in config else {**rows[0], **extra})


def batch_trial(config: dict, candidates, cpus: float, gpus: float = 0.0, device_pref: str = "auto") -> None:
    """The Tune trainable for k > 1 in the trial's own process: the batch's candidates in order, on
    the trial's device (engine/scoring.py)."""
    from opmix_ray.engine.scoring import score_all
    _report(config, score_all(candidates, _params(config), cpus, gpus, device_pref))


def pooled_trial(config: dict, box: list, cpus: float) -> None:
    """The Tune trainable with search.scorer_pool: box = [ObjectRef of the Candidates, their key];
    the ref stays unresolved here, so this process never deserialises the model."""
    ref, key = box
    pool = ray.get_actor(POOL)
    node, trial = ray.get_runtime_context().get_node_id(), tune.get_context().get_trial_id()
    scorer = ray.get(pool.acquire.remote(node, trial))
    try:
        rows = ray.get(scorer.score.remote(key, [ref], _params(config), cpus))
    except ray.exceptions.RayActorError:
        ray.get(pool.release.remote(trial, dead=True))  # the rerun gets a fresh scorer
        raise
    ray.get(pool.release.remote(trial))
    _report(config, rows)


class _Scorer:
    """A warm process that scores candidates; it builds a round's model once and keeps it until release()."""

    def __init__(self):
        self.key, self.cands = None, None

    def ready(self) -> float:
        """Import what a cold trial would import, ahead of it; the time it was done (time.time())."""
        import importlib
        importlib.import_module("opmix_ray.engine.scoring")
        return time.time()

    def score(self, key: str, box: list, params: list[dict], cpus: float) -> list[dict]:
        from opmix_ray.engine.scoring import score_all
        if key != self.key:
            self.cands, self.key = ray.get(box[0]), key
        return score_all(self.cands, params, cpus)

    def release(self) -> None:
        """Drop the round's model and inputs (the object store can free them); the imports stay."""
        import opmix_ray.engine.scoring as scoring
        scoring._CACHE.clear()
        self.key = self.cands = None


class _Pool:
    """Scorers per node: a trial leases one for its whole run; a rerun of the same trial gets the
    same one back (a killed trial process never released it)."""

    def __init__(self):
        self.free: dict[str, list] = {}
        self.leased: dict[str, tuple[str, object]] = {}
        self.readied: list = []  # each started scorer's ready() ref
        self.lease_times: list[float] = []

    def _new(self, node: str):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        return _ScorerActor.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            node, soft=False)).remote()

    def warm(self, node: str, n: int) -> int:
        free = self.free.setdefault(node, [])
        have = len(free) + sum(1 for nd, _ in self.leased.values() if nd == node)
        for _ in range(max(0, n - have)):
            free.append(self._new(node))
            self.readied.append(free[-1].ready.remote())
        return len(free)

    def acquire(self, node: str, trial: str):
        if trial not in self.leased:
            self.lease_times.append(time.time())
            free = self.free.setdefault(node, [])
            self.leased[trial] = (node, free.pop() if free else self._new(node))
        return self.leased[trial][1]

    def release(self, trial: str, dead: bool = False) -> None:
        node, scorer = self.leased.pop(trial, (None, None))
        if scorer is not None and not dead:
            self.free.setdefault(node, []).append(scorer)

    def end_round(self) -> None:
        """Every scorer drops its model; leases a killed trial left behind return to the free lists."""
        for trial in list(self.leased):
            self.release(trial)
        for node, free in self.free.items():
            done = [(s, s.release.remote()) for s in free]
            self.free[node] = [s for s, ref in done if _alive(ref)]  # a dead scorer is dropped, not fatal

    def timeline(self, timeout: float = 60.0) -> dict:
        """When each scorer started so far had its imports done, and when trials leased one
        (time.time(), in start and lease order): whether the trials waited for the imports."""
        done, _ = ray.wait(self.readied, num_returns=len(self.readied), timeout=timeout)
        return {"ready_at": [_value(r) if r in done else None for r in self.readied],
                "leased_at": list(self.lease_times)}

    def size(self) -> int:
        return sum(len(f) for f in self.free.values()) + len(self.leased)


def _value(ref):
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError:
        return None


def _alive(ref) -> bool:
    try:
        ray.get(ref)
        return True
    except ray.exceptions.RayActorError:
        return False


_ScorerActor, _PoolActor = ray.remote(_Scorer), ray.remote(_Pool)
_HELD: dict = {}


def pool(warm_node: str | None = None, n: int = 0):
    """The driver's pool actor (created on first use; it lives as long as the driver), with n
    scorers started on warm_node ahead of the trials."""
    try:
        handle = ray.get_actor(POOL)
    except ValueError:  # none yet, or Ray was restarted
        handle = _PoolActor.options(name=POOL, num_cpus=0).remote()
        # Ray ends an actor once its creator drops the handle it got at creation, named or not
        _HELD["pool"] = handle
    if warm_node and n:
        handle.warm.remote(warm_node, n)
    return handle


def start_scorers(cfg: Config):
    """The scorer pool, with as many scorers started on this node as trials can run here at once
    (none are added once there are that many). The driver calls it when the main run starts, so a
    run's first round finds the scorers' imports done."""
    node = ray.get_runtime_context().get_node_id()
    here = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0)
    return pool(node, min(cfg.search.max_concurrent, math.floor(here / cfg.search.cpus_per_trial)))
