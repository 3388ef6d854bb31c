"""`opmix-ray continual CONFIG`: continual midtraining, domains arriving, leaving and changing in stages.

    opmix-ray continual opmix_ray/configs/continual.yaml --out continual_runs/default        # ~45 min, 2 cores
    opmix-ray continual opmix_ray/configs/continual_mixed.yaml --out continual_runs/mixed  # adds, removes, splits, revises

Stage 0 pretrains one model (uniform over its domains, from scratch or model.path); every method
starts from that checkpoint. Each later stage changes the domain set (add, remove, split into parts,
revise into a new version; schedule_steps) and each method trains `tokens` more from its own
previous checkpoint. A stage's new data is its added domains, split parts and revised versions;
its old domains are the rest of the current set:

| method          | stage mixture                                                               |
|-----------------|-----------------------------------------------------------------------------|
| opmix           | OP-Mix on the live checkpoint with the old domains collapsed: adapters only  |
|                 | for the new data plus one on the old mixture, search over {old, new}        |
|                 | (mixture reuse); a real engine run (Ray Train + adapters + Tune). A stage   |
|                 | with no new data (a removal) keeps the previous mixture, renormalised       |
| opmix-recompute | the same, with an adapter for every current domain (full recomputation)     |
| uniform-seen    | every current domain at an equal share, from the method's own last checkpoint |
| natural-seen    | every current domain at its token share, likewise                            |
| naive           | 100% new data                                                               |
| replay          | new data plus replay_share of the old domains (uniform over them)            |
| distill         | replay's draws; the old rows train toward the previous checkpoint's         |
|                 | predictions (KL, the teacher's forward passes counted) instead of their     |
|                 | tokens: the closest we run to the paper's on-policy distillation without    |
|                 | sampling from the student                                                    |
| retrain         | the stage-0 checkpoint retrained on every current domain (uniform), for     |
|                 | all tokens of stages 1..s                                                   |

Metric: mean val loss over the current domains (forgetting included; a removed or replaced domain
leaves the objective) and FLOPs, per stage. With `data.build_revisions: true` data.path is
first built with the bundled domains and the split and revised ones (opmix_ray/data/revisions.py).
With `schedule.instruct_eval: true` (continual instruction tuning, configs/continual_instruct.yaml)
the later stages add instruction tasks (opmix_ray/data/instruct.py), and every checkpoint is also
scored on the tasks seen so far: exact match and answer loss, held-out and trained-sample
(opmix_ray/experiments/instruct_eval.py); the stage-0 checkpoint is scored zero-shot on every task.
Fixed-mixture stages run as Tune trials (training.run_fixed_jobs) and restart AdamW with warmup at
each stage, as the engine's stage runs do. Every stage draws its own data order (stage_data_seed), the
same for every method of that stage.
"""
from __future__ import annotations

import math
import time
import zlib
from pathlib import Path

import numpy as np

from opmix_ray import rundir
from opmix_ray.compute import train_flops
from opmix_ray.config import ConfigError
from opmix_ray.console import say
from opmix_ray.experiments.experiment_config import ExperimentConfig
from opmix_ray.storage import atomic_write_bytes, write_json



def schedule_steps(cfg: ExperimentConfig) -> list[dict]:
    """Per stage: {"current": the domains trained and scored from then on, "new": its new data (added
    domains, split parts, revised versions), "label": the change}; one-line errors for a bad schedule."""
    stages = cfg.schedule.stages
    if len(stages) < 2:
        raise ConfigError("config error at schedule.stages: needs a pretraining stage and at least one more "
                          "(fix: list stages, each with add: [...] and tokens: N)")
    current, ever, out = [], set(), []
    for i, st in enumerate(stages):
        at = f"schedule.stages.{i}"
        if i == 0 and (st.remove or st.split or st.revise):
            raise ConfigError(f"config error at {at}: the pretraining stage can only add domains "
                              "(fix: move remove, split and revise to a later stage)")
        for field, names in (("remove", st.remove), ("split", list(st.split)), ("revise", list(st.revise))):
            if missing := [d for d in names if d not in current]:
                raise ConfigError(f"config error at {at}.{field}: {missing} not among the current domains "
                                  f"{current} (fix: name a domain the run has at that stage)")
        gone = [*st.remove, *st.split, *st.revise]
        if len(set(gone)) != len(gone):
            raise ConfigError(f"config error at {at}: a domain is removed, split or revised twice "
                              "(fix: change each domain once per stage)")
        arriving = {"add": list(st.add), "split": [p for ps in st.split.values() for p in ps],
                    "revise": list(st.revise.values())}
        seen_here: set[str] = set()
        for field, names in arriving.items():
            again = sorted((set(names) & (ever | seen_here)) | {d for d in names if names.count(d) > 1})
            if again:
                raise ConfigError(f"config error at {at}.{field}: {again} arrived in an earlier stage or twice "
                                  "(fix: every added domain, split part and revised version is new to the run)")
            seen_here |= set(names)
        nxt = []
        for d in current:
            nxt += st.split.get(d, [st.revise[d]] if d in st.revise else [] if d in st.remove else [d])
        nxt += st.add
        if not nxt:
            raise ConfigError(f"config error at {at}.remove: no domain is left (fix: keep at least one)")
        if i and set(nxt) <= seen_here:
            raise ConfigError(f"config error at {at}: every domain is new, none is left to reuse "
                              "(fix: keep at least one domain unchanged)")
        label = "; ".join([*(f"+{d}" for d in st.add), *(f"-{d}" for d in st.remove),
                           *(f"{d}>{'+'.join(ps)}" for d, ps in st.split.items()),
                           *(f"{d}>{v}" for d, v in st.revise.items())])
        ever |= seen_here
        out.append({"current": nxt, "new": [*arriving["add"], *arriving["split"], *arriving["revise"]],
                    "label": label})
        current = nxt
    return out


def check_schedule(cfg: ExperimentConfig) -> list[list[str]]:
    """The current domains after each stage (schedule_steps without the rest)."""
    return [s["current"] for s in schedule_steps(cfg)]


def _carry(prev: dict[str, float], current) -> dict[str, float]:
    """The previous mixture on the current domains, renormalised (uniform if none of it is left)."""
    kept = {d: prev.get(d, 0.0) for d in current}
    return kept if sum(kept.values()) > 0 else dict.fromkeys(current, 1.0)


def _weights(domains, parts: dict[str, float]) -> dict[str, float]:
    total = sum(parts.values())
    return {d: parts.get(d, 0.0) / total for d in domains}


def fixed_plans(cfg: ExperimentConfig, doms, train_tokens: dict[str, int], steps: list[dict], s: int,
                mix: dict[str, dict], ckpt: dict[str, str], pretrained: str) -> dict[str, tuple]:
    """Stage s of each fixed-mixture method: {method: (weights over doms, tokens, init checkpoint)}.
    uniform-seen and natural-seen are what a user would do without a mixing method: go on from the
    last checkpoint on every current domain, at equal shares or at their token shares."""
    seen, new, T = steps[s]["current"], steps[s]["new"], cfg.schedule.stages[s].tokens
    old = [d for d in seen if d not in new]
    r = cfg.schedule.replay_share
    replayed = lambda m: _weights(doms, {**{d: (1 - r) / len(new) for d in new}, **{d: r / len(old) for d in old}}
                                  if new and old else _carry(mix.get(m, {}), seen))
    return {"naive": (_weights(doms, dict.fromkeys(new, 1.0) if new else _carry(mix.get("naive", {}), seen)),
                      T, ckpt.get("naive")),
            "replay": (replayed("replay"), T, ckpt.get("replay")),
            # replay's draws, but the old rows train toward the previous checkpoint's predictions
            "distill": (replayed("distill"), T, ckpt.get("distill")),
            "uniform-seen": (_weights(doms, dict.fromkeys(seen, 1.0)), T, ckpt.get("uniform-seen")),
            "natural-seen": (_weights(doms, {d: float(train_tokens[d]) for d in seen}), T, ckpt.get("natural-seen")),
            "retrain": (_weights(doms, dict.fromkeys(seen, 1.0)),
                        sum(st.tokens for st in cfg.schedule.stages[1:s + 1]), pretrained)}


# How a result's stages drew their data; a seed's earlier result is kept only if it drew the same way.
DATA_ORDERS = "per stage"


def stage_data_seed(seed: int, stage: int, order: int = 0) -> int | None:
    """run.data_seed of stage `stage`, data order `order`. Stage 0 draws the run's own order; every
    later stage draws its own: a stage that restarted the seed's order would re-read, window for
    window, what the earlier stages of the same domains already trained on, instead of going on."""
    if stage == 0 and order == 0:
        return None
    return zlib.crc32(f"{seed}/stage{stage}/order{order}".encode())


def _fixed_job(cfg, shards, method, weights, tokens, init, save, stage, order: int = 0):
    from opmix_ray.training import fixed_job
    return fixed_job(cfg, cfg.run.seed, shards, weights, data_seed=stage_data_seed(cfg.run.seed, stage, order),
                     tokens=tokens, init_path=init, save_path=save, method=method, stage=stage, order=order)


def stage_stay(cfg: ExperimentConfig, doms, s: int, seen, previous: dict[str, float], tokens) -> dict | None:
    """What OP-Mix's stage-s round keeps when it does not move (schedule.stay): None = the previous
    mixture (new data at 0); prior = the new data at a prior share (engine/rule.py prior_stay)."""
    from opmix_ray.engine.rule import prior_stay
    st = cfg.schedule.stages[s]
    if cfg.schedule.stay != "prior" or not (st.add or st.split or st.revise):
        return None
    replaced = {**{d: list(ps) for d, ps in st.split.items()}, **{d: [v] for d, v in st.revise.items()}}
    prior = prior_stay(previous, list(seen), list(st.add), replaced, tokens)
    return {d: prior.get(d, 0.0) for d in doms}


def _opmix_stage(cfg, method, stage, seen, new, prev_mix, init, out, stay=None) -> dict:
    from opmix_ray.engine.driver import run
    c = cfg.run_config()
    c.run.name, c.run.storage_path, c.run.baseline = f"{method}-stage{stage}", str(out / "runs"), "none"
    c.run.data_seed = stage_data_seed(cfg.run.seed, stage)  # the stage's windows, as its fixed-mixture runs
    c.model.path = init
    c.main.total_tokens = cfg.schedule.stages[stage].tokens
    c.rounds.uniform_prefix, c.rounds.initial = 0.0, prev_mix  # the round at step 0 picks the stage's mixture
    c.rounds.initial_stay = stay
    c.adapters.domains = list(new) if method == "opmix" else list(seen)
    c.adapters.include_old = True
    c.search.objective_weights = {d: 1.0 for d in seen}
    s = run(c, overwrite=True)
    return {"val_loss": s["final_val_loss"], "mixture": s["final_mixture"], "drawn": s["drawn_last_segment"],
            "main_flops": s["main_flops"],
            "search_flops": s["search_flops"], "ckpt": str(rundir.at(s["run_dir"], rundir.checkpoint(rundir.FINAL))),
            "wall_s": s["wall_s"]}


def _instruct_scorer(cfg: ExperimentConfig, shards):
    """(checkpoint, domains) -> {"instruct": scores of the tasks among domains}, {} when there are none;
    and each task's majority-answer exact match."""
    from opmix_ray.data.shards import load_tokenizer, resolve_data_paths
    from opmix_ray.experiments import instruct_eval
    tok, _ = load_tokenizer(resolve_data_paths(cfg)[2])
    sets = instruct_eval.load_sets(cfg.data.path, tok, shards.eos_id, shards.train)

    def scorer(ckpt: str, domains) -> dict:
        todo = {t: s for t, s in sets.items() if t in domains}
        return {"instruct": instruct_eval.evaluate_checkpoint(ckpt, todo, tok, shards.eos_id)} if todo else {}
    return scorer, instruct_eval.majority_em(cfg.data.path, sets)


def run_continual(cfg: ExperimentConfig, out_dir: str | Path, overwrite: bool = False) -> dict:
    """The sequence on run.seed into OUT, or on each of schedule.seeds into OUT/seed_N with every
    seed's rows together in OUT/results.json (continual_report.combine)."""
    from opmix_ray.experiments.continual_report import combine, markdown
    from opmix_ray.storage import read_json
    t0, out = time.time(), Path(out_dir).expanduser().resolve()
    steps = schedule_steps(cfg)
    if not cfg.schedule.seeds:
        return _sequence(cfg, out, steps, overwrite)
    _refuse_finished(out, overwrite)
    results = {}
    for seed in cfg.schedule.seeds:
        c = cfg.model_copy(deep=True)
        c.run.seed, c.schedule.seeds = seed, []
        d = out / f"seed_{seed}"
        prior = read_json(d / "results.json") if (d / "results.json").is_file() else None
        if (prior and prior.get("config") == _expanded(c, steps).model_dump(mode="json")
                and prior.get("data_orders") == DATA_ORDERS):
            say(f"seed {seed}: keeping {d / 'results.json'} (the same config)")
            results[seed] = prior
        else:
            say(f"seed {seed}: the whole sequence -> {d}")
            results[seed] = _sequence(c, d, steps, overwrite)
    result = {**combine(results), "wall_s": time.time() - t0, "config": cfg.model_dump(mode="json")}
    write_json(out / "results.json", result)
    atomic_write_bytes(out / "results.md", markdown(result).encode())
    return result


def _refuse_finished(out: Path, overwrite: bool) -> None:
    if (out / "results.json").exists() and not overwrite:
        raise ConfigError(f"config error at --out: {out} holds a finished run (fix: --overwrite or another --out)")


def _expanded(cfg: ExperimentConfig, steps: list[dict]) -> ExperimentConfig:
    """cfg with data.domains = every domain of the sequence, in order of arrival (what a run records)."""
    cfg = cfg.model_copy(deep=True)
    cfg.data.domains = list(dict.fromkeys(d for st in steps for d in st['new'] + st['current']))
    return cfg


def _sequence(cfg: ExperimentConfig, out: Path, steps: list[dict], overwrite: bool) -> dict:
    """One seed's whole sequence into `out`: its rows, FLOPs, uniform-seen's data-order noise."""
    from opmix_ray.data.read import build_shards
    from opmix_ray.engine.preflight import check_against_data
    from opmix_ray.experiments.continual_report import markdown, stage_noise
    from opmix_ray.ray_init import init_ray
    from opmix_ray.training import run_fixed_jobs
    t0 = time.time()
    _refuse_finished(out, overwrite)
    seen_by_stage = [st['current'] for st in steps]
    cfg = _expanded(cfg, steps)
    if cfg.schedule.instruct_eval:
        from opmix_ray.data.instruct import ensure_built
        ensure_built(cfg.data.path)  # deterministic, seconds; verifies the sha256s when already built
    shards = build_shards(cfg)
    check_against_data(cfg, shards, None)
    scorer, majority = _instruct_scorer(cfg, shards) if cfg.schedule.instruct_eval else (lambda ckpt, doms: {}, None)
    doms, methods = shards.domains, cfg.schedule.methods
    out.mkdir(parents=True, exist_ok=True)
    init_ray(cfg)
    st0 = cfg.schedule.stages[0]
    say(f"stage 0: pretraining on {st0.add} for {st0.tokens} tokens")
    pre = run_fixed_jobs([_fixed_job(cfg, shards, "pretrain", _weights(doms, dict.fromkeys(st0.add, 1.0)), st0.tokens,
                                     cfg.model.path, str(out / "stage_0" / "pretrained"), 0)],
                         shards, str(out / "tune"), "stage_0", 1)[0]
    ckpt = dict.fromkeys(methods, str(out / "stage_0" / "pretrained"))
    mix = dict.fromkeys(methods, _weights(doms, dict.fromkeys(st0.add, 1.0)))
    flops = {m: {"main": train_flops(pre["n_params"], st0.tokens), "search": 0.0} for m in methods}
    zero_shot = scorer(str(out / "stage_0" / "pretrained"), doms)  # every task, before any is trained on
    rows = [{"method": m, "stage": 0, "seed": cfg.run.seed, "val_loss": pre["val_loss"], "mixture": mix[m],
             "total_flops": flops[m]["main"],
             **_score(pre["val_loss"], st0.add), **zero_shot} for m in methods]
    noise: list[dict] = []
    for s in range(1, len(steps)):
        seen, new, T = steps[s]["current"], steps[s]["new"], cfg.schedule.stages[s].tokens
        old = [d for d in seen if d not in new]
        plans = fixed_plans(cfg, doms, shards.train_tokens(), steps, s, mix, ckpt, str(out / "stage_0" / "pretrained"))
        if not new and "opmix" in methods:  # nothing to search: mixture reuse keeps the renormalised mixture
            plans["opmix"] = (_weights(doms, _carry(mix["opmix"], seen)), T, ckpt["opmix"])
        jobs = [_fixed_job(cfg, shards, m, w, tok, init, str(out / f"stage_{s}" / m), s)
                for m, (w, tok, init) in plans.items() if m in methods]
        for j in jobs:
            if j["method"] == "distill" and new and old:
                j["distill"] = {"teacher": ckpt["distill"], "old": old, "kl_weight": cfg.schedule.distill_kl_weight}
        # uniform-seen's stage again from the same checkpoint on more data orders: the stage's noise
        w, tok, init = plans["uniform-seen"]
        # with instruction tasks the orders' checkpoints are kept and scored too: the answer losses' noise
        keep = lambda k: str(out / f"stage_{s}" / f"uniform-seen_order_{k}") if cfg.schedule.instruct_eval else None
        orders = [_fixed_job(cfg, shards, "uniform-seen", w, tok, init, keep(k), s, order=k)
                  for k in range(1, cfg.schedule.noise_orders + 1)] if "uniform-seen" in methods else []
        results = {}
        if jobs:
            say(f"stage {s}: {steps[s]['label']}; {', '.join(j['method'] for j in jobs)} as Tune trials"
                + (f", and uniform-seen on {len(orders)} more data orders" if orders else ""))
            done = run_fixed_jobs(jobs + orders, shards, str(out / "tune"), f"stage_{s}", 2)
            if orders:
                ui = [j["method"] for j in jobs].index("uniform-seen")
                runs = [(jobs[ui], done[ui]), *zip(orders, done[len(jobs):])]
                noise.append(stage_noise(s, [_score(r["val_loss"], seen)["mean_loss"] for _, r in runs],
                                         [scorer(j["save_path"], seen).get("instruct", {}) for j, _ in runs]
                                         if cfg.schedule.instruct_eval else None))
            for j, res in zip(jobs, done):
                results[j["method"]] = {"val_loss": res["val_loss"], "mixture": j["weights"], "drawn": res["drawn"],
                                        "ckpt": j["save_path"],
                                        # distill: the teacher's forward passes on the old rows count too
                                        "main_flops": train_flops(res["n_params"], j["tokens"]) + res["teacher_flops"],
                                        "search_flops": 0.0,
                                        "wall_s": res["wall_s"]}
        for m in [m for m in methods if m.startswith("opmix") and m not in results]:
            say(f"stage {s}: {steps[s]['label']}; {m} (adapters for {new if m == 'opmix' else seen} + old)")
            results[m] = _opmix_stage(cfg, m, s, seen, new, _weights(doms, _carry(mix[m], old)), ckpt[m], out,
                                      stage_stay(cfg, doms, s, seen, mix[m], shards.train_tokens()))
        for m, res in results.items():
            ckpt[m], mix[m] = res["ckpt"], res["mixture"]
            flops[m]["main"] += res["main_flops"]
            flops[m]["search"] += res["search_flops"]
            rows.append({"method": m, "stage": s, "seed": cfg.run.seed, "val_loss": res["val_loss"],
                         "mixture": res["mixture"], "drawn": res["drawn"], "stage_search_flops": res["search_flops"],
                         "stage_main_flops": res["main_flops"], "flops_so_far": dict(flops[m]),
                         "total_flops": flops[m]["main"] + flops[m]["search"],
                         "wall_s": res["wall_s"], **_score(res["val_loss"], seen), **scorer(res["ckpt"], seen)})
            em = ", ".join(f"{t} {v['heldout']['em']:.2f}/{v['trained']['em']:.2f}"
                           for t, v in rows[-1].get("instruct", {}).items())
            say(f"stage {s}: {m} mean val loss over {len(seen)} seen domains {rows[-1]['mean_loss']:.4f}"
                 + (f"; EM held-out/trained {em}" if em else ""))
        write_json(out / "rows_partial.json", rows)
    last = noise[-1] if noise and noise[-1]["stage"] == len(steps) - 1 else None
    result = {"rows": rows, "flops": flops, "seen_by_stage": seen_by_stage, "seed": cfg.run.seed,
              "noise": last["noise"] if last else None, "noise_by_stage": noise,
              "changes": [st["label"] for st in steps], "wall_s": time.time() - t0, "data_orders": DATA_ORDERS,
              "config": cfg.model_dump(mode="json"), **({"instruct_majority_em": majority} if majority else {})}
    write_json(out / "results.json", result)
    (out / "rows_partial.json").unlink(missing_ok=True)
    atomic_write_bytes(out / "results.md", markdown(result).encode())
    return result


def _score(val_loss: dict[str, float], seen) -> dict:
    return {"mean_loss": float(np.mean([val_loss[d] for d in seen])),
            "mean_ppl": float(np.mean([math.exp(val_loss[d]) for d in seen]))}
