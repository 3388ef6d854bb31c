"""The round runner: a Ray actor that runs a trainer-of-your-own's rounds with the engine's steps.

One actor per OpMix holds the config and the token shards (from the object store) and runs each
boundary's round through engine/driver.run_round (adapters -> candidates -> search -> decision ->
confirmation), then writes the round into the run dir's history.json as the main run's
controller does, so `opmix-ray results RUN_DIR` and `opmix-ray check RUN_DIR` read it alike.
Rounds run one at a time, in the order they were asked for. The actor holds no CPU: the
adapter job, the trials and the confirmation take theirs from Ray.

A round remembers a fingerprint of what it decided on: the checkpoint's weights (sha256), the
step, the mixture and draws so far, the next boundary and the config. Asked again for the same
fingerprint (a resumed trainer that reached the boundary with the very same model) it returns
the recorded decision instead of paying for the round twice.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import ray

from opmix_ray import rundir
from opmix_ray.config import Config
from opmix_ray.errors import ConfigError
from opmix_ray.history import OWN_TRAINER
from opmix_ray.mixture import Mixture
from opmix_ray.storage import RunStore, checksums, is_uri, read_json, sha256_file

CLIENT = OWN_TRAINER  # history.json meta["client"]: the rounds of a trainer of your own


def prepare_run_dir(cfg: Config, shards, opmix, overwrite: bool) -> Path:
    """The run dir: created, continued (it holds this client's earlier rounds on the same data), or
    replaced with overwrite; anything else there is refused in one line before Ray starts."""
    from opmix_ray.data.shards import shard_manifest
    from opmix_ray.engine.preflight import check_storage, run_dir_of
    if is_uri(cfg.run.storage_path):
        raise ConfigError("config error at run.storage_path: a trainer of your own keeps its run dir on a local or "
                          "mounted path (fix: a directory; sync it to a bucket yourself)")
    run_dir = run_dir_of(cfg)
    history = _read_history(run_dir)
    ours = history is not None and history["meta"].get("client") == CLIENT and \
        history["meta"].get("data_hash") == shards.data_hash
    if not ours:
        check_storage(cfg, overwrite)  # refuses a used dir without overwrite, and a dir no run wrote
        if run_dir.exists():
            shutil.rmtree(run_dir)
        history = None
    store = RunStore(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    store.write_bytes(rundir.RUN_MARKER, b"opmix-ray run dir\n")
    store.write_yaml(rundir.CONFIG, cfg.model_dump(mode="json"))
    store.write_json(rundir.DATA_MANIFEST, shard_manifest(shards))
    meta = {"run": cfg.run.name, "client": CLIENT, "domains": list(shards.domains), "data_hash": shards.data_hash,
            "tokenizer_hash": shards.tokenizer_hash, "initial_mixture": opmix.initial_mixture().as_dict(),
            "total_steps": opmix.total_steps, "boundaries": opmix.boundaries, "baseline": "none",
            "tokens_per_step": opmix.tokens_per_step}
    rounds = [r for r in (history or {}).get("rounds", []) if r["round"] < len(opmix.boundaries)]
    store.write_json(rundir.HISTORY, {"meta": meta, "rounds": rounds, "final": None})
    return run_dir


def _read_history(run_dir: Path) -> dict | None:
    try:
        h = read_json(run_dir / rundir.HISTORY)
    except (OSError, ValueError):
        return None
    return h if isinstance(h, dict) and isinstance(h.get("meta"), dict) else None


def start_runner(cfg: Config, shards, run_dir: str):
    """Start Ray as a run does (ray_init.py), put the shards in the object store, start the actor."""
    from opmix_ray.ray_init import init_ray
    init_ray(cfg)
    ref = ray.put(shards)
    runner = RoundRunner.options(scheduling_strategy=_here()).remote(cfg, [ref], run_dir)
    return ref, runner


def _here():
    from opmix_ray.engine.faults import on_driver_node
    return on_driver_node()  # the run dir is this node's


def fingerprint(cfg: Config, k: int, info: dict, current: Mixture, next_step: int) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(info["path"]).glob("*.safetensors")):
        h.update(f"{f.name}:{sha256_file(f)}".encode())
    h.update(json.dumps([k, info["step"], current.as_dict(), info.get("drawn_tokens"), info.get("drawn"),
                         info.get("lr"), info["total_steps"], info["tokens_per_step"], next_step,
                         cfg.model_dump(mode="json")], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _clear_round(run_dir: Path, k: int) -> None:
    """What an earlier try of round k left, so the round is rewritten whole; its Optuna journal
    stays (a search whose adapters come out the same reads its finished trials back)."""
    journal = run_dir / rundir.optuna_journal(k)
    kept = journal.read_bytes() if journal.is_file() else None
    for rel in (rundir.adapters_job(k), rundir.search_job(k), rundir.trials(k), rundir.manifest(k)):
        p = run_dir / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if kept is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        journal.write_bytes(kept)


def _result(rec: dict, reused: bool) -> dict:
    dec = rec.get("decision") or {}
    return {"round": rec["round"], "step": rec["step"], "moved": bool(dec.get("moved", False)),
            "weights": rec["weights"], "reason": dec.get("reason", ""), "reused": reused, "record": rec}


@ray.remote(num_cpus=0)
class RoundRunner:
    def __init__(self, cfg: Config, shards_box: list, run_dir: str):
        self.cfg = cfg
        self.shards_ref = shards_box[0]
        self.shards = ray.get(self.shards_ref)
        self.store = RunStore(Path(run_dir))

    def round(self, k: int, info: dict, current: Mixture, next_step: int) -> dict:
        """Round k on the checkpoint info["path"]; the decision as a dict (BoundaryDecision's)."""
        from opmix_ray.compute import train_flops
        from opmix_ray.engine.driver import run_round
        from opmix_ray.engine.records import BoundaryInfo
        from opmix_ray.evaluate import domain_losses
        from opmix_ray.model import load_checkpoint, n_params, pick_device

        history = read_json(self.store.local_dir / rundir.HISTORY)
        fp = fingerprint(self.cfg, k, info, current, next_step)
        done = next((r for r in history["rounds"] if r["round"] == k), None)
        if done is not None and done.get("fingerprint") == fp:
            return _result(done, reused=True)
        _clear_round(self.store.local_dir, k)
        model = load_checkpoint(info["path"])
        device, _ = pick_device(self.cfg.model.device, self.cfg.model.precision)
        n = n_params(model)
        # the main run reports its val loss at a boundary; here the runner measures it, off the trainer's clock
        info = {**info, "n_params": n, "flops": train_flops(n, info["tokens"]),
                "val_loss": domain_losses(model.to(device), self.shards.val, batch_size=32, device=device)}
        del model
        pushed, record = run_round(self.cfg, k, BoundaryInfo.from_dict(info), current, self.shards, self.shards_ref,
                                   self.store, next_step=next_step)
        rec = {"round": k, **record.as_dict(), "fingerprint": fp, "applied_step": None}
        self._write_round(rec)
        self.store.write_json(rundir.manifest(k), checksums(self.store.local_dir, rundir.round_artifacts(k)))
        return _result(rec, reused=False)

    def note_applied(self, k: int, step: int) -> None:
        history = read_json(self.store.local_dir / rundir.HISTORY)
        for r in history["rounds"]:
            if r["round"] == k:
                r["applied_step"] = step
        self.store.write_json(rundir.HISTORY, history)

    def _write_round(self, rec: dict) -> None:
        history = read_json(self.store.local_dir / rundir.HISTORY)
        rounds = [r for r in history["rounds"] if r["round"] != rec["round"]] + [rec]
        rounds.sort(key=lambda r: r["round"])
        for i, r in enumerate(rounds):
            r["mixture_version"] = i + 1
        history["rounds"] = rounds
        self.store.write_json(rundir.HISTORY, history)
