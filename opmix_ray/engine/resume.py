"""`opmix-ray resume RUN_DIR`: continue a run whose driver died, from its last completed step.

    from opmix_ray.engine.resume import resume
    summary = resume("opmix_runs/tiny")      # {"already_finished": True, ...} if it had finished

What a run leaves (engine/driver.py, engine/main_run.py): history.json gets each round's record when the round
is pushed, and each round boundary k leaves main/round_k = the HF checkpoint + train_state.*
(AdamW moments, LR-schedule position, sampler streams, torch RNG; safetensors + JSON, no pickle),
train_state.json written last. From that:

- the last pushed round k with a resumable checkpoint: the main run restarts from main/round_k on
  round k's winner; rounds 0..k stay as saved (the controller is seeded with them);
- sync rounds, boundary k+1 reached but not pushed (the driver died mid-round): the main run
  restarts from main/round_{k+1} and round k+1 is redone on that checkpoint: its adapters are
  trained again, and when they come out the same (same machine and config: training is
  deterministic) the trials the interrupted search finished are read back from its Optuna
  journal and not rerun; an Optuna searcher goes on from them (searchers/journal.py). Otherwise a
  fresh searcher with the round's seed searches from the start;
- async rounds always restart from the last pushed round and apply its winner at once;
- nothing pushed and no checkpoint: the run starts over in the same dir;
- the main run already finished (final in history.json) but no summary.json: only the summary is written.

With search.max_concurrent: 1 the resumed history and final losses equal an uninterrupted run's
(tests/test_resume.py).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from opmix_ray import rundir
from opmix_ray.config import Config, ConfigError
from opmix_ray.engine.domains import replay_changes
from opmix_ray.engine.main_run import checkpoint_path
from opmix_ray.history import damaged, read_summary
from opmix_ray.mixture import Mixture
from opmix_ray.run_config import bad_run_dir, load_run_config
from opmix_ray.storage import RunStore, fetch_run, is_uri, missing_credentials, redact, unreadable


def resume_point(cfg: Config, run_dir: Path, rounds: list[dict]) -> dict | None:
    """{"round": k, "weights": pushed winner or None (redo round k)}, or None to start over."""
    pushed = {r["round"]: r for r in rounds}
    ok = lambda k: (Path(checkpoint_path(str(run_dir), k)) / rundir.STATE_JSON).is_file()
    last = max(pushed, default=-1)
    if cfg.rounds.mode == "sync" and ok(last + 1):
        return {"round": last + 1, "weights": None}
    if last >= 0 and ok(last):
        return {"round": last, "weights": pushed[last]["weights"]}
    if last >= 0:
        raise bad_run_dir(run_dir, f"has no resumable checkpoint {rundir.checkpoint(last)} ({rundir.STATE_JSON} missing: written "
                            "by an opmix-ray without resume support?)")
    return None


def _clear_after(run_dir: Path, point: dict | None, n_rounds: int) -> None:
    """Remove what the dead driver left for rounds that will be redone, so they are rewritten whole
    (and Ray Train's checkpoint list, which would name them, starts empty)."""
    first_redo = 0 if point is None else point["round"] + (point["weights"] is not None)
    keep_main = -1 if point is None else point["round"]
    for k in range(n_rounds):
        rels = [rundir.adapters_job(k), rundir.search_job(k), rundir.trials(k), rundir.manifest(k)] if k >= first_redo else []
        rels += [rundir.checkpoint(k)] if k > keep_main else []
        # the redone round's Optuna journal stays: its search reads the finished trials back when the
        # round's adapters come out the same (searchers/journal.py)
        journal = run_dir / rundir.optuna_journal(k)
        kept = journal.read_bytes() if k >= first_redo and journal.is_file() else None
        for rel in rels:
            p = run_dir / rel
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        if kept is not None:
            journal.parent.mkdir(parents=True, exist_ok=True)
            journal.write_bytes(kept)
    for rel in (rundir.checkpoint(rundir.FINAL), rundir.MAIN_SNAPSHOT, rundir.manifest(rundir.FINAL)):
        p = run_dir / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def resume(run_dir: str | Path) -> dict:
    """Continue the run in run_dir (a local dir, or a URI run's s3://.../NAME) to its end; return
    its summary (see the module docstring)."""
    from opmix_ray.console import say as _say
    from opmix_ray.data.read import build_shards
    from opmix_ray.engine.driver import drive, finish
    from opmix_ray.engine.preflight import (check_against_data, check_ray_address, check_resources, check_searcher,
                                             model_vocab)
    from opmix_ray.ray_init import init_ray
    t_start = time.time()
    if is_uri(run_dir):  # the run's bucket copy: resume in its staging dir, mirroring to the bucket
        try:
            run_dir = fetch_run(str(run_dir))
        except (OSError, ValueError) as exc:  # TimeoutError included: no answer within storage_timeout()
            creds = missing_credentials(str(run_dir))
            raise ConfigError(f"config error at RUN_DIR: cannot read the run at {redact(str(run_dir), query=False)} "
                              f"({type(exc).__name__}{': ' + creds if creds else ''}) (fix: pass "
                              "<storage_path>/<run.name> of a run; credentials come from the environment)") from None
    run_dir = Path(run_dir).expanduser().resolve()
    cfg, history = load_run_config(run_dir)
    if (run_dir / rundir.SUMMARY).is_file():
        return {**read_summary(run_dir), "already_finished": True}
    check_searcher(cfg)
    check_ray_address(cfg)
    check_resources(cfg)  # a local Ray's, before anything is cleared; a cluster's once joined, below
    shards = build_shards(cfg)
    check_against_data(cfg, shards, model_vocab(cfg))
    meta, rounds = history.get("meta", {}), list(history["rounds"])
    if meta.get("data_hash") != shards.data_hash:
        raise ConfigError(f"config error at data.path: the data no longer hashes to the run's "
                          f"{meta.get('data_hash')} (fix: restore the data the run started on)")
    shards = replay_changes(cfg, run_dir, shards, meta)  # the live domain-set changes (engine/domains.py)
    store = RunStore(run_dir, cfg.run.storage_path if is_uri(cfg.run.storage_path) else None, cfg.run.name)
    domains = tuple(meta["domains"])
    current = (Mixture.from_dict(rounds[-1]["weights"], domains, shards.data_hash) if rounds
               else Mixture.from_dict(meta["initial_mixture"], domains, shards.data_hash))
    if history.get("final") is not None:
        _say(f"resume '{cfg.run.name}': the main run had finished; writing the summary")
        return finish(cfg, store, shards, history, current, t_start)
    point = resume_point(cfg, run_dir, rounds)
    if point is not None:  # `opmix-ray check`'s test of what resume is about to load
        ckpt = Path(checkpoint_path(str(run_dir), point["round"]))
        bad = [f"{p.name} {why}" for p in sorted(ckpt.iterdir()) if p.is_file() and (why := unreadable(p))]
        if bad:
            raise damaged(run_dir, rundir.checkpoint(point["round"]), f"the checkpoint resume needs is damaged: "
                          f"{', '.join(bad)}")
    if point is not None and point["weights"] is not None:  # its checkpoint predates that round's changes
        point["revised"] = [c["name"] for c in meta.get("domain_changes", [])
                            if c["op"] == "revise" and c["round"] >= point["round"]]
    _clear_after(run_dir, point, len(meta["boundaries"]))
    if point is not None and point["weights"] is None:
        _say(f"resume '{cfg.run.name}': the driver died during round {point['round']}; redoing that round "
             f"(fresh adapters and searcher) on its checkpoint")
    elif point is not None:
        _say(f"resume '{cfg.run.name}': rounds 0..{point['round']} kept; continuing from round "
             f"{point['round']}'s checkpoint")
    else:
        _say(f"resume '{cfg.run.name}': no round checkpoint yet; starting the main run over")
    init_ray(cfg)
    check_resources(cfg)
    return drive(cfg, store, shards, current, meta, t_start, rounds=rounds, resume=point)
