"""The config sections of a round's middle: the adapters (adapters:), the search over their merges
(search:) and the decision (decision:). Every field's help is what `opmix-ray config-help` prints."""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator

from opmix_ray.config_base import Section

class AdaptersSection(Section):
    kind: Literal["lora", "full"] = Field("lora", description="lora: one PEFT LoRA adapter per probe mixture "
                                          "(OP-Mix); full: one fully fine-tuned component model per probe mixture, "
                                          "merged as sum_i w_i theta_i over every parameter (DeMix, "
                                          "arXiv 2602.00747; the full-rank ablation). Same steps, data and lr.")
    r: int = Field(16, gt=0, description="LoRA rank (paper: 16).")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (paper: 32).")
    lr_multiplier: float = Field(2.0, gt=0, description="Adapter lr = this * the main run's lr (paper: 2).")
    lr_schedule: Literal["current", "peak"] = Field(
        "current", description="current: lr_multiplier x the main run's lr at the checkpoint, on its "
        "schedule (the reference's choice); peak: lr_multiplier x main.lr, which after warmup and decay "
        "is a far larger step than the main run takes (docs/DECISIONS.md).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay of the adapters (reference: 0.01).")
    init: Literal["shared", "per_adapter"] = Field(
        "shared", description="shared: every adapter of a round starts from the same LoRA A (one seed per "
        "round, as the reference does), so the merged deltas differ only by what the data taught; "
        "per_adapter: a seed per adapter (measured worse: benchmarks/RESULTS.md).")
    replicate_old: bool = Field(True, description="Also train a second 'old' adapter on another data "
                                "seed; how far the two disagree is the adapter-noise term of the decision "
                                "rule (decision.k). Costs one adapter per round.")
    steps: int = Field(40, gt=0, description="Training steps per adapter.")
    batch_size: int = Field(16, gt=0, description="Sequences per adapter step.")
    probe_domain_share: float = Field(0.9, gt=0, le=1, description="Share of an adapter's tokens from "
                                      "its own domain; the rest follow the current mixture (paper: 0.9).")
    include_old: bool = Field(True, description="Also train an adapter on the current mixture and search "
                              "over {old, d_1..d_k} (the paper's collapse).")
    embedding: Literal["frozen", "full", "lora"] = Field(
        "frozen", description="full: each adapter also trains the input embedding (and the output head it is tied "
        "to; an untied head too), as PEFT's modules_to_save with ensure_weight_tying, and that dense delta is merged "
        "exactly beside the factored LoRA terms. A domain's token statistics live mostly there: without it an "
        "adapter sees about half of what full fine-tuning learns on its domain and little of what it costs the "
        "others (docs/DECISIONS.md). lora: LoRA of rank r on the embedding too (PEFT keeps a tied head's LoRA "
        "tied), fewer trainable parameters at a large vocabulary. frozen: LoRA on target_modules only (the "
        "OP-Mix reference's adapters). full and lora hold vocab x hidden floats per adapter while candidates "
        "are scored.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers that get LoRA adapters.")
    domains: list[str] | None = Field(None, description="Domains that get their own adapter; null = every "
                                      "domain. The others move only with 'old' (the collapse on a domain-set "
                                      "change: adapters for the affected domains plus one on the old mixture).")
    num_workers: int | None = Field(None, ge=1, description="Ray Train workers training adapters side by "
                                    "side; null = as many as free CPUs allow.")


class SearchSection(Section):
    searcher: str = Field("optuna-tpe", description="Registered searcher name (optuna-tpe, optuna-gp, "
                          "random, grid, mixing-law) or a dotted path 'pkg.mod:Class' (docs/custom_searcher.md).")
    searcher_options: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments "
                                             "for the searcher, e.g. {n_init: 12} for mixing-law, "
                                             "{n_startup_trials: 8} for optuna-*, {resolution: 3} for grid.")
    num_samples: int = Field(24, gt=0, description="Candidates (Tune trials) per round.")
    budget_fraction: float | None = Field(
        None, gt=0, le=10, description="At most this fraction of the main-run FLOPs of the segment a round "
        "decides (its boundary to the next decision) goes to the round's search: adapter training plus scoring "
        "the candidates. A round whose adapters.steps, search.num_samples and selection tokens per domain would "
        "cost more scales all three down by one factor (to at least 5 steps, 4 candidates and 4 windows per "
        "domain) and records what it used in its round record (budget). null: no limit.")
    max_concurrent: int = Field(2, ge=1, description="Trials in flight; Bayesian search degrades toward "
                                "random as this grows, so keep it small.")
    eval_tokens_per_domain: int | None = Field(None, gt=0, description="Val tokens per domain a trial "
                                               "scores; null = all held-out tokens.")
    objective_weights: dict[str, float] | None = Field(None, description="Objective = sum_d v_d * loss_d "
                                                       "over these domains (normalised); null = mean over all.")
    cpus_per_trial: float = Field(1.0, gt=0, description="Ray CPUs per trial.")
    warm_start: bool = Field(True, description="Score equal adapter weights first (with the old adapter "
                             "that is a small step from the current mixture).")
    delta_scale: float | Literal["auto"] = Field(
        1.0, description="Step size c: a candidate's merged delta is c * sum_i a_i delta_i. An adapter trains "
        "fewer tokens than the segment it stands for, so c = 1 under-states every move. auto: c = the "
        "segment-to-adapter token ratio, lowered to the c that minimises the 'old' adapter's own loss when "
        "larger c would overshoot (scored on the selection windows).")
    delta_norm: Literal["raw", "matched"] = Field(
        "raw", description="raw: the plain weighted sum of the deltas. matched: every merged delta is rescaled "
        "to the norm of the 'old' adapter's delta, so a candidate differs from stay in direction only (a blend "
        "of adapters trained apart moves the weights less than one adapter does). Measured worse on the "
        "bench's round 0 (benchmarks/RESULTS.md), so not the default.")
    caps: bool = Field(True, description="Search only mixtures within the repetition caps left for the rest "
                       "of the run: a_old * p_d + a_d <= (cap_d - drawn_d) / tokens_left for every domain d.")
    candidates_per_trial: int = Field(1, description="Candidates one Tune trial scores, one after another on "
                                      "one model build (the last trial takes the rest of num_samples); each is "
                                      "still its own record for the searcher, the Optuna journal and the decision. "
                                      "Shares Tune's per-trial cost; the searcher has up to max_concurrent x this "
                                      "suggestions in flight, so Bayesian search sees results later.")
    scorer_pool: bool = Field(False, description="Score candidates in processes that outlive a round (one per "
                              "trial slot and node, started with the main run, holding no Ray CPU while the trial "
                              "holds them), so the trial processes' torch and transformers imports are paid once "
                              "per run, before the first round, not per round; "
                              "each keeps its imports (a few hundred MB) while adapters train.")

    @field_validator("delta_scale")
    @classmethod
    def _scale(cls, v):
        if v != "auto" and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"delta_scale={v!r} (fix: a positive number, e.g. 1.0, or 'auto')")
        return v

    @field_validator("candidates_per_trial")
    @classmethod
    def _per_trial(cls, v):
        if v < 1:
            raise ValueError(f"candidates_per_trial={v} (fix: a whole number >= 1; 1 = one candidate per trial)")
        return v

    @field_validator("searcher_options")
    @classmethod
    def _option_names(cls, v):
        reserved = {"space", "seed", "points_to_evaluate", "objective_weights"}
        bad = [k for k in v if not str(k).isidentifier() or k in reserved]
        if bad:
            raise ValueError(f"searcher_options keys {bad} are not keyword arguments a searcher can take "
                             f"(fix: use identifiers other than {sorted(reserved)}; those are set by the run)")
        return v


class DecisionSection(Section):
    """What a round pushes once its candidates are scored."""
    rule: Literal["safe", "argmin"] = Field(
        "safe", description="safe: score 'stay' (the current mixture, a_old = 1) on the same windows and push "
        "the leader only if it beats stay by more than k standard errors of their paired difference, adapter "
        "noise included; otherwise keep the current mixture. argmin: push the best-scoring trial, however "
        "small its lead.")
    k: float = Field(2.0, ge=0, description="Standard errors the leader must beat stay by (safe rule).")
    max_l1_step: float | None = Field(None, gt=0, le=2, description="Trust region: only candidates whose "
                                      "mixture is within this L1 distance of the current one can lead; null = none.")
    stay_within_caps: bool = Field(True, description="safe rule: when the current mixture would spend a "
                                   "repetition cap before the end of the run, staying means the current mixture "
                                   "within the caps left (a capped domain at the share its cap allows for the rest of "
                                   "the run, the excess spread over the others), compared with the leader and pushed "
                                   "when the round does not move; false: stay keeps the current mixture, and the "
                                   "capped domains are drawn until their caps are spent, then never again "
                                   "(docs/DECISIONS.md).")
    confirm: bool = Field(True, description="safe rule: before a move is pushed, train one more adapter on the "
                          "leader's mixture and push only if it beats the stay's adapter by k standard errors: "
                          "'old' (trained on the current mixture), or, when staying pushes another mixture (caps "
                          "left, new data's prior share), one more adapter trained on that; costs one or two "
                          "adapter trainings per move (engine/confirm.py).")
    law_min_loo_spearman: float = Field(0.7, ge=-1, le=1, description="mixing-law searcher: its KL-regularised "
                                        "proposal leads when the law's leave-one-out Spearman on the trials "
                                        "reaches this; below it the best trial leads.")
