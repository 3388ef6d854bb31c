"""One round's search: a Ray Tune Tuner whose trials merge the adapters and score the result.

A candidate is a weight vector a over the adapters ({old, d_1..d_k}); a trial sets the model's
adapted weights to W0 + c * sum_i a_i * delta_i (engine/merge.py; c = search.delta_scale), measures
per-domain validation loss and reports the objective plus the mixture a stands for,
E(a)[d] = a_old * p_d + a_d. The space holds only mixtures within the repetition caps left
(search.caps). The base weights, the stacked deltas and the validation windows go into the object
store once (tune.with_parameters) and each reused trial actor builds its model once per round.
search.candidates_per_trial and search.scorer_pool share a trial's fixed cost (engine/trial_batch.py).
What the round then pushes is engine/decision.py's call (`decide`).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.search import ConcurrencyLimiter

from opmix_ray import rundir
from opmix_ray.config import Config
from opmix_ray.console import Progress, say
import opmix_ray.engine.trial_batch as trial_batch
from opmix_ray.engine.adapters import REPLICATE, adapter_tokens
from opmix_ray.engine.decision import (Decision, adapter_noise_var, matched_stay, reference_mixture, safe_rule,
                                      weighted)
from opmix_ray.engine.merge import (MergedModel, delta_norm, load_dense_deltas, load_full_delta, load_lora_factors,
                                   moved_by, stack_deltas, stack_factors)
from opmix_ray.engine.records import BoundaryInfo
from opmix_ray.engine.rerun import ActorDeaths, RetryCounter, candidate_records, rescore
from opmix_ray.engine.scoring import merged_model, candidate_mixture, merged_trial, score
from opmix_ray.engine.trial_batch import BATCH, ROWS, BatchSearcher, batch_trial, pooled_trial
from opmix_ray.engine.tracking import trial_callbacks
from opmix_ray.evaluate import domain_losses, objective, window_losses
from opmix_ray.mixture import Mixture
from opmix_ray.model import load_checkpoint
from opmix_ray.searchers import METRIC, MODE, create_searcher, journal
from opmix_ray.storage import sha256_file
from search_spaces import SimplexSpace

__all__ = ["TRIAL_RETRIES", "Candidates", "SearchOutcome", "build_candidates", "candidate_mixture", "cap_shares",
           "decide", "make_searcher", "run_search", "score", "warm_starts"]  # score: engine/scoring.py's

TRIAL_RETRIES = 2  # reruns of a trial whose process died, before it counts as failed


@dataclass
class Candidates:
    """Everything a trial needs, shared through the object store."""
    key: str
    coords: tuple[str, ...]
    model_config: dict
    base_state: dict[str, np.ndarray]
    stacked: dict  # module -> LowRankStack (LoRA) or dense [k, out, in] (full components)
    val: dict[str, np.ndarray]
    current: Mixture
    objective_weights: dict[str, float] | None
    max_tokens: int | None
    space: object = None  # the search space (plain simplex, or the cap polytope)
    extra: tuple[str, ...] = ()  # stacked after coords but never searched: the 'old' replicate
    scale: float = 1.0  # c, already applied to `stacked`
    driver_evals: int = 0  # evaluations outside the trials (choosing c, the decision): counted as search
    norm_to: float | None = None  # search.delta_norm: matched -> every merge has the 'old' delta's norm
    fingerprint: str = ""  # what trials are scored on (adapters, base, scale, space): a journal is reused only on it
    caps_share: dict[str, float] | None = None  # per domain, the share of the rest of the run its cap allows

    def full(self, a) -> np.ndarray:
        """Weights over coords + extra (the extra adapters at 0)."""
        return np.concatenate([np.asarray(a, dtype=np.float64), np.zeros(len(self.extra))])

    def unit(self, name: str) -> np.ndarray:
        """Weights with only adapter `name` at 1."""
        w = np.zeros(len(self.coords) + len(self.extra))
        w[(self.coords + self.extra).index(name)] = 1.0
        return w


def build_candidates(cfg: Config, key: str, base_path: str, adapter_dirs: dict[str, str], shards,
                     current: Mixture, info: BoundaryInfo | None = None, segment_tokens: int | None = None) -> Candidates:
    """info: the boundary's report (caps need drawn_tokens, total_steps, tokens_per_step, step);
    segment_tokens: the main-run tokens until the next decision (delta_scale: auto)."""
    if cfg.search.scorer_pool and ray.is_initialized():
        start_scorers(cfg)  # a no-op once the run started them; else their imports overlap the loading below
    model = load_checkpoint(base_path)
    coords = tuple(c for c in adapter_dirs if c != REPLICATE)
    extra = (REPLICATE,) if REPLICATE in adapter_dirs else ()
    if cfg.adapters.kind == "full":  # full components are dense by nature
        stacked = stack_deltas([load_full_delta(adapter_dirs[c], model) for c in coords + extra])
    else:  # LoRA stays factored: O(sum of ranks x (in + out)) per module, never k dense deltas
        stacked = stack_factors([load_lora_factors(adapter_dirs[c]) for c in coords + extra])
        dense = [load_dense_deltas(adapter_dirs[c], model) for c in coords + extra]
        if any(dense):  # adapters.embedding: the embedding's delta, merged in place (a tied head with it)
            stacked = {m: D for m, D in stacked.items() if not moved_by(model, m, dense[0])}
            stacked.update(stack_deltas(dense))
    base_state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    space = search_space(cfg, coords, current, shards, info)
    caps = cap_shares(cfg, shards, info) if cfg.search.caps and info is not None and info.has_caps_state else None
    # the key names this build only: a process that drives two runs of the same name (or the same
    # round twice) must never score one build's candidates on another's cached merged model
    key = f"{key}/{uuid.uuid4().hex}"
    cands = Candidates(key, coords, model.config.to_dict(), base_state, stacked, shards.selection(), current,
                       objective_weights(cfg, shards), cfg.search.eval_tokens_per_domain, space, extra, caps_share=caps)
    ratio = segment_tokens / adapter_tokens(cfg, shards.seq_len) if segment_tokens else None
    scale = delta_scale(cfg, cands, model, ratio)
    if scale != 1.0:
        cands.stacked = {m: (scale * D).astype(np.float32) for m, D in stacked.items()}
        cands.scale = scale
    if cfg.search.delta_norm == "matched" and "old" in coords:
        cands.norm_to = delta_norm(cands.stacked, coords.index("old"))
    cands.fingerprint = _fingerprint(cands, base_path, adapter_dirs)
    return cands


def _fingerprint(cands: Candidates, base_path: str, adapter_dirs: dict[str, str]) -> str:
    """sha256 over the adapters' weights, the base checkpoint, the scale and the space's caps: two
    builds with one fingerprint score every candidate alike (adapter training is deterministic, so
    a round redone on resume gets the fingerprint of the interrupted one)."""
    h = hashlib.sha256()
    for name in sorted(adapter_dirs):
        h.update(name.encode())
        for f in sorted(Path(adapter_dirs[name]).glob("*.safetensors")):
            h.update(sha256_file(f).encode())
    for f in sorted(Path(base_path).glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    h.update(json.dumps([cands.coords, cands.extra, cands.scale, cands.current.as_dict(), cands.max_tokens,
                         type(cands.space).__name__, getattr(cands.space, "caps_share", None)], sort_keys=True,
                        default=str).encode())
    return h.hexdigest()


def cap_shares(cfg: Config, shards, info: BoundaryInfo) -> dict[str, float]:
    """Per domain, the share of the tokens left that its repetition cap still allows."""
    left = (info.total_steps - info.step) * info.tokens_per_step
    caps = shards.cap_tokens(cfg)
    return {d: float(max(0.0, caps[d] - info.drawn_tokens.get(d, 0)) / left) if left > 0 else 1.0
            for d in shards.domains}


def search_space(cfg: Config, coords: tuple[str, ...], current: Mixture, shards, info: BoundaryInfo | None):
    """The plain simplex, or (search.caps) the polytope a_old * p_d + a_d <= cap share left."""
    plain = SimplexSpace(coords)
    if not cfg.search.caps or info is None or not info.has_caps_state:
        return plain
    from search_spaces import OLD, CollapsedSpace, PolytopeSimplex, cap_constraints
    shares = cap_shares(cfg, shards, info)
    try:
        if OLD in coords:
            space = CollapsedSpace(current.as_dict(), coords, shares)
        else:
            space = PolytopeSimplex(coords, *cap_constraints(coords, current.as_dict(), shares))
        return space if len(space.b_ub) else plain
    except ValueError as exc:  # the caps cannot all hold: the sampler will redistribute anyway
        say(f"repetition caps leave no feasible mixture ({exc}); searching the plain simplex")
        return plain


SCALE_GRID = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


def delta_scale(cfg: Config, cands: Candidates, model, token_ratio: float | None) -> float:
    """c for the merged delta. auto: the segment-to-adapter token ratio, but no larger than the c at
    which the 'old' adapter alone (stay) stops lowering the mean loss of the training domains on the
    selection windows: past it the merged model overshoots and every candidate's score is off."""
    if cfg.search.delta_scale != "auto":
        return float(cfg.search.delta_scale)
    if token_ratio is None or "old" not in cands.coords:
        return 1.0
    mm = MergedModel(model.eval(), cands.stacked)
    train = {d: cands.val[d] for d in cands.current.domains}
    grid = sorted({c for c in SCALE_GRID if c < token_ratio} | {max(1.0, token_ratio)})
    losses = []
    for c in grid:
        mm.apply(c * cands.unit("old"))
        losses.append(objective(domain_losses(mm.model, train, max_tokens=cands.max_tokens)))
        if len(losses) > 1 and losses[-1] > losses[-2]:
            break  # past the minimum along the stay direction
    mm.close()
    cands.driver_evals += len(losses)
    return float(grid[int(np.argmin(losses))])


def objective_weights(cfg: Config, shards) -> dict[str, float]:
    """The configured objective, or the mean over the training domains (never eval-only ones)."""
    return dict(cfg.search.objective_weights or {d: 1.0 for d in shards.domains})


def trial_weights(c: Candidates, metrics: dict) -> np.ndarray:
    """The adapter weights a trial scored (its `a_` metrics; `mix_` ones are only the record)."""
    return np.array([metrics[f"a_{k}"] for k in c.coords], dtype=np.float64)


class _SearchProgress(tune.Callback):
    """Trials done out of the round's budget and the best objective so far, as one progress line."""

    def __init__(self, round_idx: int, total: int, done: int = 0):
        self.bar, self.n, self.best = Progress(f"round {round_idx} search", total, "trials"), done, float("inf")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        value = last.get(METRIC)
        if value is not None and np.isfinite(value):
            self.best = min(self.best, float(value))
        self.n += len(last.get(ROWS) or trial.config.get(BATCH) or [None])  # candidates, not trials
        self.bar.update(self.n, f"best {self.best:.4f}" if np.isfinite(self.best) else "")

    def on_experiment_end(self, trials, **info):
        self.bar.close()


def warm_starts(cfg: Config, space) -> list[np.ndarray]:
    """Equal adapter weights (projected onto the caps), and under the safe rule stay (a_old = 1) first
    when it is feasible, so the searcher learns from the point the decision compares against."""
    if not cfg.search.warm_start:
        return []
    k = len(space.coords)
    points = [space.project(np.full(k, 1.0 / k)) if not space.contains(np.full(k, 1.0 / k)) else np.full(k, 1.0 / k)]
    if cfg.decision.rule == "safe" and "old" in space.coords:
        stay = np.eye(k)[space.coords.index("old")]
        if space.contains(stay, tol=1e-9):
            points.insert(0, stay)
    return points


def make_searcher(cfg: Config, candidates: Candidates, round_idx: int, warm: bool = True,
                  journal_path: str | None = None):
    """The round's searcher. objective_weights: the mixing law proposes for the objective's per-domain
    weights; journal_path: where an Optuna searcher records its study; a searcher whose __init__
    does not take one of them is built without it (CONTEXT_KWARGS)."""
    space = candidates.space or SimplexSpace(candidates.coords)
    return create_searcher(cfg.search.searcher, space=space, seed=cfg.run.seed * 1000 + round_idx,
                           points_to_evaluate=(warm_starts(cfg, space) or None) if warm else None,
                           objective_weights=candidates.objective_weights, journal_path=journal_path,
                           **cfg.search.searcher_options)


@dataclass
class SearchOutcome:
    mixture: Mixture
    weights: dict[str, float]
    objective: float
    losses: dict[str, float]
    n_trials: int
    n_failed: int
    wall_s: float
    trials: list[dict]
    n_retried: int = 0  # trial reruns after a worker died (FailureConfig)
    n_rescored: int = 0  # trials whose process died for good, scored again after the search (engine/rerun.py)


def run_search(cfg: Config, candidates: Candidates, round_idx: int, run_dir: str) -> SearchOutcome:
    t0 = time.time()
    journal_path = str(rundir.at(run_dir, rundir.optuna_journal(round_idx)))
    # a round redone on resume: the trials its interrupted search finished count, and are not rerun
    reused = journal.reusable(journal_path, candidates.fingerprint)
    searcher = make_searcher(cfg, candidates, round_idx, journal_path=journal_path)
    if getattr(searcher, "journal_path", None):
        journal.stamp(journal_path, candidates.fingerprint)
    if reused:
        say(f"round {round_idx}: {len(reused)} trials of the interrupted search reused from {journal_path}")
    budget, k = max(cfg.search.num_samples - len(reused), 0), cfg.search.candidates_per_trial
    batch = BatchSearcher(searcher, k, budget) if k > 1 else None
    searcher = ConcurrencyLimiter(batch or searcher, max_concurrent=cfg.search.max_concurrent)
    trainable, pool = _trainable(cfg, candidates)
    retries, progress = RetryCounter(), _SearchProgress(round_idx, cfg.search.num_samples, done=len(reused))
    deaths = ActorDeaths()
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, metric=METRIC, mode=MODE, reuse_actors=True,
                                    num_samples=budget),  # with k > 1 the searcher ends it sooner
        # A trial whose worker dies (OOM kill, node lost, kill -9) is rerun on a fresh actor: a
        # trial is one merge + one eval, so a retry is cheap. Tune 2.60 can count one death twice
        # and drop the rerun; such trials are scored again after the search (engine/rerun.py). A
        # NaN objective is no error and is not retried: the searcher records it failed (base.py).
        run_config=tune.RunConfig(storage_path=run_dir, name=rundir.search_job(round_idx), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES),
                                  # result.json + progress.csv per trial: Tune's own ResultGrid and
                                  # ExperimentAnalysis(<run>/search_round_k) read the trials back
                                  # (TensorBoard and the other auto loggers stay off: driver.py)
                                  callbacks=[retries, progress, deaths, JsonLoggerCallback(), CSVLoggerCallback(),
                                             *trial_callbacks(cfg, run_dir, round_idx)]),
    )
    try:
        grid = tuner.fit() if budget else []
        # one record per candidate; those of trials whose process died are scored again first
        ran = candidate_records(grid, batch, deaths, lambda configs: rescore(
            trainable, configs, run_dir, round_idx, cfg.search.max_concurrent, TRIAL_RETRIES))
    finally:
        if pool is not None:
            ray.get(pool.end_round.remote())
    trials = [r["metrics"] for r in reused if r["state"] == "complete"]
    trials += [m for m in ran if m and np.isfinite(m.get(METRIC, np.nan))]
    if not trials:
        raise RuntimeError(f"round {round_idx}: every search trial failed (fix: see the trial errors in "
                           f"{run_dir}/{rundir.search_job(round_idx)})")
    best = min(trials, key=lambda m: m[METRIC])
    weights = {k: best[f"a_{k}"] for k in candidates.coords}
    mixture = candidate_mixture(candidates, trial_weights(candidates, best))
    keep = lambda m: {k: v for k, v in m.items() if k in (METRIC, "node_id") or k[:2] in ("lo", "mi", "a_")}
    return SearchOutcome(mixture, weights, float(best[METRIC]), {k[5:]: v for k, v in best.items() if k.startswith("loss_")},
                         len(ran) + len(reused), len(ran) + len(reused) - len(trials), time.time() - t0,
                         [keep(m) for m in trials],
                         retries.n, len(deaths.trials))


def _trainable(cfg: Config, candidates: Candidates):
    """The round's Tune trainable, and the scorer pool's handle when search.scorer_pool is on."""
    cpus, pool = cfg.search.cpus_per_trial, None
    if cfg.search.scorer_pool:
        pool = start_scorers(cfg)
        fn = tune.with_parameters(pooled_trial, box=[ray.put(candidates), candidates.key], cpus=cpus)
    else:
        fn = tune.with_parameters(merged_trial if cfg.search.candidates_per_trial == 1 else batch_trial,
                                  candidates=candidates, cpus=cpus)
    return tune.with_resources(fn, {"cpu": cpus}), pool


def start_scorers(cfg: Config):
    """The scorer pool, with as many scorers started on this node as trials can run here at once
    (none are added once there are that many). The driver calls it when the main run starts, so a
    run's first round finds the scorers' imports done."""
    node = ray.get_runtime_context().get_node_id()
    here = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0)
    return trial_batch.pool(node, min(cfg.search.max_concurrent, math.floor(here / cfg.search.cpus_per_trial)))


def _law_leader(cfg: Config, candidates: Candidates, trials: list[dict], round_idx: int) -> dict | None:
    """The mixing law's KL-regularised proposal, refitted on every finished trial (a fresh searcher fed
    the trials' reports, so it does not depend on what Tune kept of the live one); None if unfit."""
    searcher = make_searcher(cfg, candidates, round_idx, warm=False)
    if not hasattr(searcher, "law_proposal"):
        return None
    for i, m in enumerate(trials):
        searcher.on_trial_complete(f"trial_{i}", m)
    return searcher.law_proposal()


def _l1(a: Mixture, b: Mixture) -> float:
    return float(np.abs(a.as_array() - b.as_array()).sum())


def decide(cfg: Config, candidates: Candidates, out: SearchOutcome, round_idx: int) -> Decision:
    """What the round pushes (engine/decision.py): the leader is the best trial within the trust region, or
    the mixing law's proposal when its leave-one-out fit is good; the safe rule then compares it with
    stay on the same windows, in this process."""
    cur = candidates.current
    pool = [m for m in out.trials if cfg.decision.max_l1_step is None or
            _l1(candidate_mixture(candidates, trial_weights(candidates, m)), cur) <= cfg.decision.max_l1_step]
    best = min(pool, key=lambda m: m[METRIC]) if pool else None
    a = trial_weights(candidates, best) if best else candidates.unit("old")[:len(candidates.coords)]
    source, law = "trial", None
    if cfg.decision.rule == "safe" and "old" in candidates.coords:
        law = _law_leader(cfg, candidates, out.trials, round_idx)
        if law and law.get("loo_spearman") is not None and law["loo_spearman"] >= cfg.decision.law_min_loo_spearman:
            w = np.asarray(law["w"], dtype=np.float64)
            if cfg.decision.max_l1_step is None or _l1(candidate_mixture(candidates, w), cur) <= cfg.decision.max_l1_step:
                a, source = w, "law"
    leader_mix = candidate_mixture(candidates, a) if best or source == "law" else cur
    named = {c: float(x) for c, x in zip(candidates.coords, a)}
    common = dict(rule=cfg.decision.rule, k=cfg.decision.k, leader_weights=named,
                  leader_mixture=leader_mix.as_dict(), leader_source=source)
    if cfg.decision.rule == "argmin" or "old" not in candidates.coords:
        reason = "argmin over the trials" if cfg.decision.rule == "argmin" else \
            "no 'old' adapter stands for stay: argmin over the trials"
        return Decision(moved=True, reason=reason, stay_objective=None, se=None, se_eval=None, se_adapter=None,
                        leader_objective=float(best[METRIC]) if best else None, **common)
    if best is None and source == "trial":
        return Decision(moved=False, reason=f"no candidate within decision.max_l1_step={cfg.decision.max_l1_step}",
                        stay_objective=None, leader_objective=None, se=None, se_eval=None, se_adapter=None, **common)
    ref = reference_mixture(cur.as_dict(), candidates.caps_share if cfg.decision.stay_within_caps else None)
    stay_a = matched_stay(named, cur.as_dict(), ref)
    mm = merged_model(candidates)
    scored = {}
    for name, w in (("stay", candidates.full([stay_a[c] for c in candidates.coords])),
                    ("stay_old", candidates.unit("old")), ("leader", candidates.full(a))):
        mm.apply(w)
        scored[name] = window_losses(mm.model, candidates.val, max_tokens=candidates.max_tokens)
    candidates.driver_evals += 3 + (REPLICATE in candidates.extra)
    noise = None
    if REPLICATE in candidates.extra:
        mm.apply(candidates.unit(REPLICATE))
        rep = {d: float(v.mean()) for d, v in window_losses(mm.model, candidates.val, max_tokens=candidates.max_tokens).items()}
        noise = adapter_noise_var({d: float(v.mean()) for d, v in scored["stay_old"].items()}, rep,
                                  candidates.objective_weights)
    mm.reset()
    moved, reason, figures = safe_rule(scored["stay"], scored["leader"], candidates.objective_weights, named,
                                       cfg.decision.k, noise, stay_a)
    figures["stay_old_objective"] = weighted(scored["stay_old"], candidates.objective_weights)
    stay_mix = None
    if any(abs(ref[d] - x) > 1e-12 for d, x in cur.as_dict().items()):
        stay_mix = candidate_mixture(candidates, np.array([stay_a[c] for c in candidates.coords])).as_dict()
        if not moved:
            reason = reason.replace("keeping the current mixture", "keeping the current mixture within its caps")
    if law:
        reason += f"; law loo_spearman {law.get('loo_spearman')}"
    return Decision(moved=moved, reason=reason, stay_mixture=stay_mix, **figures, **common)
