"""A whole OP-Mix run: data -> main run -> per round (adapters -> merge/search -> push) -> report.

    from opmix_ray.config import load_config
    from opmix_ray.engine.driver import run
    summary = run(load_config("opmix_ray/configs/demo.yaml"))

Each step lives in its own module: data/ (shards, sampler), engine/main_run.py, engine/adapters.py, engine/merge.py,
engine/candidates.py, engine/search.py + searchers/, engine/decision.py, engine/controller.py (push); engine/domains.py applies domain-set changes queued on a
live run, engine/faults.py what a lost node does. This file only sequences them.
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import ray

from opmix_ray import rundir
from opmix_ray.compute import round_search_flops
from opmix_ray.config import Config, ConfigError
from opmix_ray.console import Progress
from opmix_ray.console import say as _say
from opmix_ray.data.shards import shard_manifest
from opmix_ray.engine.adapters import adapter_lr, adapter_plan, adapter_tokens, train_adapters
from opmix_ray.engine.budget import eval_tokens, sized
from opmix_ray.engine.confirm import confirm_move
from opmix_ray.engine.controller import MixtureController, controller_name
from opmix_ray.engine.domains import arrive, clear_live, write_live
from opmix_ray.engine.faults import alive_nodes, interrupted, lost_since, on_driver_node, run_failed
from opmix_ray.engine.main_run import launch_main_run, steps_and_boundaries
from opmix_ray.engine.preflight import check_resources, preflight
from opmix_ray.engine.records import BoundaryInfo, RoundRecord
from opmix_ray.engine.candidates import build_candidates, cap_shares
from opmix_ray.engine.decision import decide
from opmix_ray.engine.search import run_search
from opmix_ray.engine.trial_batch import start_scorers
from opmix_ray.errors import BadInput, failing_step
from opmix_ray.evaluate import mean_perplexity
from opmix_ray.mixture import Mixture
from opmix_ray.ray_init import init_ray
from opmix_ray.storage import RunStore, checksums, is_uri


def _prepare_run_dir(cfg: Config, run_dir: Path, overwrite: bool) -> RunStore:
    """Create the run dir preflight validated (it already refused a used one without overwrite).
    With a URI, run_dir is the local staging dir: a leftover from an earlier run is never wanted
    there, and the remote run dir is emptied only with overwrite."""
    uri = cfg.run.storage_path if is_uri(cfg.run.storage_path) else None
    if (overwrite or uri) and run_dir.exists():
        if overwrite and not uri and any(run_dir.iterdir()):  # preflight checked the marker
            _say(f"--overwrite: removing the earlier run at {run_dir}")
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        field = "run.storage_path" if not uri else "run.storage_path (its local staging dir, env OPMIX_RAY_STAGING)"
        raise ConfigError(f"config error at {field}: cannot create {run_dir} ({exc.strerror}) "
                          "(fix: use a writable directory)") from None
    store = RunStore(run_dir, uri, cfg.run.name)
    if overwrite and uri:
        _say(f"--overwrite: removing the earlier run at {store.location}")
        store.clear_remote()
    store.write_bytes(rundir.RUN_MARKER, b"opmix-ray run dir\n")
    return store


class _MainProgress:
    """The main run's progress reports (every 25 steps, from the controller) as one progress line."""

    def __init__(self, total: int):
        self.seen, self.bar = 0, Progress("main run", total, "steps")

    def show(self, ctl) -> None:
        for p in ray.get(ctl.get_progress.remote(self.seen)):
            self.seen += 1
            self.bar.update(p["step"], f"loss {p['loss']:.3f}")


def _wait(ref, main_ref, ctl, seen: _MainProgress):
    """ray.get(ref), showing the main run's progress meanwhile and failing fast if it died."""
    while True:
        ready, _ = ray.wait(list({ref, main_ref}), num_returns=1, timeout=2.0)
        seen.show(ctl)
        if ref in ready:
            return ray.get(ref)
        if main_ref in ready:
            ray.get(main_ref)  # raises the main run's error
            raise RuntimeError("the main run ended before reaching the next round boundary")


def _latest_boundary(ctl, k: int, n: int) -> int | None:
    """async: the newest boundary already reached (>= k), k if none yet, None once the run ended."""
    reached = ray.get(ctl.reached.remote())
    if reached["final"]:
        return None
    later = [j for j in reached["boundaries"] if k <= j < n]
    return max(later) if later else k


def initial_mixture(cfg: Config, shards) -> Mixture:
    """The mixture a run starts on: the baseline's, else rounds.initial."""
    kind = cfg.run.baseline if cfg.run.baseline != "none" else cfg.rounds.initial
    if isinstance(kind, dict):
        return Mixture.from_dict(kind, shards.domains, shards.data_hash)
    return shards.natural() if kind == "natural" else shards.uniform()


def _domain_changes(cfg: Config, ctl, k: int, shards, current: Mixture, store: RunStore):
    """Apply the domain-set changes queued since the last round (engine/domains.py): (shards, their new
    ObjectRef or None, the old mixture over the new domains, the affected domains (adapters for them
    plus 'old'; [] when nothing needs a search; None when nothing changed), the changes)."""
    changes = ray.get(ctl.take_changes.remote())
    if not changes:
        return shards, None, current, None, [], None
    shards, current, affected, stay = arrive(cfg, store.local_dir, shards, current, changes)
    ref = ray.put(shards)
    ray.get(ctl.domains_changed.remote(k, current, [ref], changes))
    store.write_json(rundir.DATA_MANIFEST, shard_manifest(shards))
    what = ", ".join(f"{c['op']} {c['name']}" for c in changes)
    _say(f"round {k}: domain changes ({what}); " + (f"adapters for {affected} plus 'old' "
         "(the other domains, ratios frozen)" if affected else "no new data: pushing the renormalised mixture"))
    return shards, ref, current, affected, changes, stay


def run_round(cfg: Config, k: int, info: BoundaryInfo, current: Mixture, shards, shards_ref, store: RunStore,
              affected: list[str] | None = None, next_step: int | None = None,
              stay: dict[str, float] | None = None) -> tuple[Mixture, RoundRecord]:
    """One round on the boundary checkpoint info.path: adapters -> candidates -> search -> decision ->
    confirmation; returns (the mixture to train on next, the round's record). next_step: the step of
    the next decision (the run's next boundary or its end; None: from the config's schedule), which
    sizes the segment a candidate stands for; stay: what staying stands for when new data arrived
    (None: the current mixture). The main run's driver and a trainer of your own
    (opmix_ray/own_trainer/) both run rounds through here."""
    run_dir = store.local_dir
    t0 = time.time()
    if next_step is None:
        total, boundaries = steps_and_boundaries(cfg)
        next_step = next((b for b in boundaries if b > info.step), total)
    segment = (next_step - info.step) * (info.tokens_per_step or cfg.main.batch_size * shards.seq_len)
    available = [v.shape[0] * shards.seq_len for v in shards.selection().values()]  # selection tokens per domain
    n_adapters = len(adapter_plan(current, cfg, affected))
    cfg, budget = sized(cfg, info.n_params, shards.seq_len, n_adapters, segment, available)
    if budget:
        _say(f"round {k}: search.budget_fraction {cfg.search.budget_fraction:g}: {budget['adapter_steps']} adapter "
             f"steps, {budget['num_samples']} candidates, {budget['eval_tokens_per_domain']} selection tokens per "
             "domain" + (" (the minimum: over budget)" if budget["at_minimum"] else ""))
    _say(f"round {k}: training {n_adapters} LoRA adapters on the step-{info.step} checkpoint")
    with failing_step(f"round {k}: training the adapters"):
        dirs = train_adapters(cfg, shards_ref, info.path, current, k, str(run_dir), info.lr, affected)
    t_adapters = time.time() - t0
    with failing_step(f"round {k}: loading the adapters and the checkpoint"):
        cands = build_candidates(cfg, f"{cfg.run.name}/{k}", info.path, dirs, shards, current, info, segment, stay)
    _say(f"round {k}: adapters done in {t_adapters:.0f}s; searching {cfg.search.num_samples} merged "
         f"candidates with {cfg.search.searcher}")
    with failing_step(f"round {k}: the search"):
        out = run_search(cfg, cands, k, str(run_dir))
    with failing_step(f"round {k}: the decision"):
        decision = decide(cfg, cands, out, k)
    confirmed = decision.moved and cfg.decision.rule == "safe" and cfg.decision.confirm and "old" in dirs
    if confirmed:
        # a stay that is not the current mixture (the caps left, new data's prior share) gets its own adapter
        stay_mix = decision.stay_mixture
        _say(f"round {k}: {decision.reason}; confirming with an adapter trained on the leader's mixture"
             + (" against one trained on the stay" if stay_mix else ""))
        with failing_step(f"round {k}: the confirmation adapter"):
            decision = decision.with_confirmation(*confirm_move(
                cfg, shards_ref, info.path, decision.leader_mixture, adapter_lr(cfg, info.lr), k, dirs,
                cands.objective_weights, stay_mix))
    n_confirm = decision.confirm["adapters"] if decision.confirm else 0
    doms = current.domains
    # A stay on the current mixture changes nothing: the sampler keeps its weights, counters and cap
    # handling, so a run that always stays is the fixed-mixture run bit for bit (docs/DECISIONS.md). A
    # stay whose caps would run out pushes the current mixture within them (engine/decision.py).
    kept = decision.stay_mixture
    if decision.moved:
        pushed = Mixture.normalised(doms, [decision.leader_mixture[d] for d in doms], current.data_hash)
    else:
        pushed = Mixture.normalised(doms, [kept[d] for d in doms], current.data_hash) if kept else current
    with failing_step(f"round {k}: writing the round's files"):
        store.write_parquet(rundir.trials(k), out.trials)
        # With a URI, mirror the round's checkpoint, adapters and trial results now: a run that dies
        # later still leaves every finished round in the bucket.
        for rel in (rundir.checkpoint(k), rundir.adapter_root(k), rundir.search_job(k)):
            store.upload_dir(rel)
    flops = round_search_flops(info.n_params, adapter_tokens(cfg, shards.seq_len),
                               len(dirs) + n_confirm, out.n_trials + cands.driver_evals + 3 * confirmed + (n_confirm > 1),
                               eval_tokens(cfg.search.eval_tokens_per_domain, available),
                               full=cfg.adapters.kind == "full")
    record = RoundRecord(
        step=info.step, tokens=info.tokens, weights=pushed, adapter_weights=out.weights, objective=out.objective,
        merged_val_loss=out.losses, decision=decision.as_dict(), delta_scale=cands.scale,
        search_space=type(cands.space).__name__,
        cap_shares=cap_shares(cfg, shards, info) if cfg.search.caps and info.has_caps_state else None,
        base_val_loss=info.val_loss, drawn_before=info.drawn, mixture_before=info.mixture,
        n_trials=out.n_trials, n_failed=out.n_failed,
        flops={"main_so_far": info.flops, "adapters": flops["adapters"], "search": flops["trials"]},
        wall_s={"adapters": t_adapters, "search": out.wall_s,
                **({"confirm": decision.confirm["wall_s"]} if decision.confirm else {})},
        searcher=cfg.search.searcher, budget=budget)
    _say(f"round {k}: best objective {out.objective:.4f} after {out.n_trials} trials ({out.wall_s:.0f}s); "
         f"{decision.reason}; pushing {pushed}")
    return pushed, record


def run(cfg: Config, overwrite: bool = False) -> dict:
    """Run OP-Mix (or a fixed-mixture baseline) end to end; return the summary dict."""
    t_start = time.time()
    run_dir, shards = preflight(cfg, overwrite)  # bad input fails here: nothing written, no Ray yet (data.reader: driver)
    init_ray(cfg)
    check_resources(cfg)  # a cluster joined by ray.address is known only now; still nothing written
    store = _prepare_run_dir(cfg, run_dir, overwrite)
    store.write_yaml(rundir.CONFIG, cfg.model_dump(mode="json"))
    store.write_json(rundir.DATA_MANIFEST, shard_manifest(shards))
    staged = f" (staged in {run_dir})" if store.remote else ""
    _say(f"run '{cfg.run.name}' -> {store.location}{staged}; domains {list(shards.domains)}; "
         f"train tokens {shards.train_tokens()}")
    current = initial_mixture(cfg, shards)
    total, boundaries = steps_and_boundaries(cfg)
    meta = {"run": cfg.run.name, "domains": list(shards.domains), "data_hash": shards.data_hash,
            "tokenizer_hash": shards.tokenizer_hash, "initial_mixture": current.as_dict(),
            "total_steps": total, "boundaries": boundaries, "baseline": cfg.run.baseline}
    return drive(cfg, store, shards, current, meta, t_start)


def drive(cfg: Config, store: RunStore, shards, current: Mixture, meta: dict, t_start: float,
          rounds: list[dict] | None = None, resume: dict | None = None) -> dict:
    """Start the controller and the main run, run rounds from the first one not in `rounds` (the
    rounds a resumed run already pushed; engine/resume.py), then write the summary. Ray must be up."""
    run_dir = store.local_dir
    shards_ref = ray.put(shards)
    total, boundaries = meta["total_steps"], meta["boundaries"]
    namespace = ray.get_runtime_context().namespace
    nodes = alive_nodes()
    ctl = MixtureController.options(name=controller_name(cfg.run.name), namespace=namespace,
                                    scheduling_strategy=on_driver_node()).remote(store, current, meta, rounds)
    write_live(run_dir, controller_name(cfg.run.name))
    main_ref = launch_main_run(cfg, shards_ref, str(run_dir), namespace, resume=resume)
    if cfg.search.scorer_pool and boundaries:
        start_scorers(cfg)  # their imports overlap the first segment: the first round's trials find them ready
    seen = _MainProgress(total)
    k = max((r["round"] for r in rounds or []), default=-1) + 1
    _say(f"main run: {total} steps, rounds at steps {boundaries}, " +
         (f"resumed at round {resume['round']}'s checkpoint, " if resume else "") +
         f"{'starting' if k == 0 else f'from round {k} on'} on {current}")
    try:
        while k < len(boundaries):
            if cfg.rounds.mode == "async":
                k = _latest_boundary(ctl, k, len(boundaries))  # skip snapshots a long round overtook
                if k is None:
                    break  # the main run ended while the last round ran
            info = _wait(ctl.wait_boundary.remote(k), main_ref, ctl, seen)
            shards, new_ref, current, affected, changes, stay = _domain_changes(cfg, ctl, k, shards, current, store)
            shards_ref = new_ref or shards_ref
            if stay is None and k == 0:
                stay = cfg.rounds.initial_stay  # new data at a prior share from the start (opmix-ray continual)
            if changes and not affected:
                record = RoundRecord.reuse(info, current)
            else:
                current, record = run_round(cfg, k, info, current, shards, shards_ref, store, affected, stay=stay)
            if changes:
                record.domain_changes = [f"{c['op']} {c['name']}" for c in changes]
            ray.get(ctl.push.remote(k, current, record.as_dict()))
            with failing_step(f"round {k}: writing the round's checksums"):
                store.write_json(rundir.manifest(k), checksums(run_dir, rundir.round_artifacts(k)))
            k += 1
        _wait(main_ref, main_ref, ctl, seen)
    except Exception as exc:
        lost = lost_since(nodes)
        where = f"round {k}" if k < len(boundaries) else "the main run's last segment"
        if lost:
            raise interrupted(lost, where, store.location, exc) from exc
        if isinstance(exc, BadInput):
            raise
        raise run_failed(exc, getattr(exc, "opmix_step", where), run_dir, store.location) from exc
    finally:
        clear_live(run_dir)
    late = ray.get(ctl.take_changes.remote())  # queued after the last round: never applied
    if late:
        _say(f"domain changes queued after the last round were not applied: {[c['op'] + ' ' + c['name'] for c in late]}")
    summary = finish(cfg, store, shards, ray.get(ctl.get_history.remote()), current, t_start, late)
    ray.kill(ctl)
    return summary


def finish(cfg: Config, store: RunStore, shards, history: dict, current: Mixture, t_start: float,
           unapplied: list[dict] | None = None) -> dict:
    """Write summary.json from the history of a run whose main run has ended; return it."""
    final = history["final"]
    store.upload_dir(rundir.checkpoint(rundir.FINAL))
    if store.remote:  # the plot goes to the bucket too (the CLI re-plots locally, with a baseline)
        from opmix_ray.report import plot_history
        store.write_bytes(rundir.MIXTURE_PNG, plot_history(history, store.local_dir / rundir.MIXTURE_PNG).read_bytes())
    summary = {"run": cfg.run.name, "run_dir": str(store.local_dir), "baseline": cfg.run.baseline,
               "final_val_loss": final["val_loss"],
               "final_val_ppl_mean": mean_perplexity({d: final["val_loss"][d] for d in shards.domains}),
               "final_target_ppl": {d: math.exp(final["val_loss"][d]) for d in shards.eval_only},
               "final_mixture": current.as_dict(), "drawn_last_segment": final["drawn"],
               "main_flops": final["flops"], "n_params": final["n_params"], "rounds_mode": cfg.rounds.mode,
               "main_stall_s": sum(final.get("stall_s", {}).values()), "applied_step": final.get("applied_step", {}),
               "search_flops": sum(r["flops"]["adapters"] + r["flops"]["search"] for r in history["rounds"]),
               "main_train_s": final.get("train_s", 0.0), "main_tokens": final["tokens"],
               "main_tokens_per_s": final["tokens"] / final["train_s"] if final.get("train_s") else None,
               "candidates_per_s": [r["n_trials"] / r["wall_s"]["search"] if r["wall_s"].get("search") else None
                                    for r in history["rounds"]],  # per round: the search's throughput
               "wall_s": time.time() - t_start}
    if unapplied:
        summary["unapplied_domain_changes"] = unapplied
    if store.remote:  # run_dir stays local (the staging dir): callers read and plot from it
        summary["run_uri"] = store.location
    store.write_json(rundir.SUMMARY, summary)  # its presence means the run finished
    store.write_json(rundir.manifest(rundir.FINAL), checksums(store.local_dir, rundir.round_artifacts(rundir.FINAL)))
    return summary
