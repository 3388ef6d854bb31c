"""The config of `opmix-ray bench` and `opmix-ray continual`: a run config plus their own sections.

    cfg = load_experiment_config("opmix_ray/configs/bench.yaml")
    cfg.bench.seeds, cfg.schedule.stages       # the experiment's sections
    cfg.run_config()                          # the plain run Config a single run of it takes

`opmix-ray run` reads the same file and skips `bench` and `schedule` (Config.experiment_sections).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from opmix_ray.config import Config, ModelSection, Section, load_config
from opmix_ray.errors import ConfigError


# RegMix's LightGBM on a swarm of a few dozen runs: LightGBM's defaults (20 rows per leaf) cannot
# split it, so the trees are small and regularised.
LGBM_PARAMS = {"objective": "regression", "learning_rate": 0.05, "num_leaves": 7, "min_data_in_leaf": 3,
               "bagging_fraction": 0.8, "bagging_freq": 1, "verbose": -1, "num_threads": 1}
LGBM_ROUNDS = 300


class BenchSection(Section):
    """`opmix-ray bench` only: every method on the same data, model, main-run budget and seeds."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, description="Seeds; each "
                             "method runs once per seed (data split, init, sampling and search all follow it).")
    methods: list[Literal["uniform", "natural", "uniform-capped", "regmix", "regmix-linear", "olmix", "doremi", "aioli", "opmix",
                        "opmix-v1", "demix", "uniform-long"]] = Field(
        default_factory=lambda: ["uniform", "natural", "regmix", "olmix", "doremi", "aioli", "opmix"], min_length=1,
        description="Methods to compare; uniform-capped is uniform held to the repetition caps for the whole "
        "run (a capped domain at the share its cap allows, the rest equal); regmix/olmix share one proxy swarm per seed; opmix-v1 is OP-Mix with "
        "its first settings (per-adapter init, peak lr, no caps, argmin decision), for side-by-side comparison; "
        "aioli is online: its own run is its row; demix is the engine with full component models "
        "(adapters.kind: full); uniform-long is uniform trained for as many FLOPs as OP-Mix spent in all (main run + "
        "search), per seed: what training longer instead of searching gives.")
    swarm_size: int = Field(24, ge=4, description="Proxy runs per seed (RegMix/Olmix swarm), Ray Tune trials.")
    proxy_model: ModelSection = Field(default_factory=lambda: ModelSection(hidden_size=64, num_layers=2, num_heads=2,
                                      intermediate_size=192), description="The small model of proxy runs.")
    proxy_tokens: int = Field(102_400, gt=0, description="Training tokens per proxy run (swarm and DoReMi).")
    regmix_simulations: int = Field(100_000, gt=0, description="Mixtures the RegMix regressor scores.")
    regmix_top_k: int = Field(128, gt=0, description="RegMix output = mean of the top-k predicted mixtures.")
    regmix_lgbm_params: dict[str, Any] = Field(default_factory=lambda: dict(LGBM_PARAMS), description="LightGBM "
                                               "parameters of the RegMix regressor (lightgbm.train's params).")
    regmix_lgbm_rounds: int = Field(LGBM_ROUNDS, gt=0, description="LightGBM boosting rounds of the RegMix regressor.")
    doremi_eta: float = Field(1.0, gt=0, description="Group DRO step size (DoReMi: 1).")
    doremi_smoothing: float = Field(1e-3, ge=0, lt=1, description="Mix-in of uniform weights (DoReMi: 1e-3).")
    # Aioli (experiments/baselines/_aioli.py); defaults = the reference implementation's README example
    aioli_eta: float = Field(0.2, gt=0, description="Aioli step size: p <- p * exp(eta * A^T 1).")
    aioli_ema: float | None = Field(0.1, ge=0, lt=1, description="Weight of the previous A in its EMA; null = none.")
    aioli_lp_rounds: int = Field(4, ge=1, description="Aioli LearnParams sweeps over the domains per update.")
    aioli_lp_steps: int = Field(4, ge=1, description="Training steps on each probe mixture in a sweep.")
    aioli_update_steps: int = Field(250, ge=1, description="Steps per Aioli update round, LearnParams included.")
    aioli_one_hot_factor: float = Field(0.625, gt=0, le=1, description="Weight of the probed domain in its "
                                        "smoothed one-hot probe mixture (the rest shared equally).")
    aioli_normalize: bool = Field(True, description="Shift A to be non-negative and scale it to sum 1 "
                                    "before the update (the reference's aioli_normalize).")
    oracle_runs: int = Field(16, ge=0, description="Fixed mixtures the headroom measurement (`opmix-ray headroom`, "
                             "the bench's oracle) trains for the full budget on the first seed: uniform, natural, one "
                             "leaning on each training domain, then Dirichlet draws within the caps (at least 2 + the "
                             "number of domains). The best of them is the oracle. 0 = no oracle and no noise.")
    noise_orders: int = Field(3, ge=2, description="Data orders (run.data_seed) on which uniform and the oracle's "
                              "pick are each trained again, paired: the sd of their differences is the noise of "
                              "a one-seed comparison (`opmix-ray headroom`, the bench's `noise`).")
    fidelity_mixtures: int = Field(16, ge=0, description="Mixtures for the merged-adapter fidelity check "
                                   "on the first seed's OP-Mix round 0; 0 = skip.")
    max_concurrent: int = Field(2, ge=1, description="Fixed-mixture runs (Tune trials) in flight.")


class Stage(Section):
    """One update of the domain set; the parts of a split and a revised version are domains of data.path
    new to the run (opmix_ray/data/revisions.py builds a dir with some)."""
    add: list[str] = Field(default_factory=list, description="Domains that arrive at this stage.")
    remove: list[str] = Field(default_factory=list, description="Domains that leave: never drawn again and "
                              "no longer part of the objective.")
    split: dict[str, list[str]] = Field(default_factory=dict, description="A domain replaced by its parts, "
                                        "e.g. {bible: [bible_ot, bible_nt]}.")
    revise: dict[str, str] = Field(default_factory=dict, description="A domain replaced by its new version, "
                                   "e.g. {python: python_v2}.")
    tokens: int = Field(gt=0, description="Training tokens in this stage.")

    @model_validator(mode="after")
    def _changes_something(self):
        if not (self.add or self.remove or self.split or self.revise):
            raise ValueError("a stage changes no domain (fix: give it add, remove, split or revise)")
        for d, parts in self.split.items():
            if len(parts) < 2:
                raise ValueError(f"split.{d} has {len(parts)} part (fix: split a domain into 2 or more)")
        return self


class ScheduleSection(Section):
    """`opmix-ray continual` only: domains arriving in stages (continual midtraining)."""
    stages: list[Stage] = Field(default_factory=list, description="Stage 0 pretrains (uniform over its "
                                "domains, shared by every method); each later stage adds, removes, splits or "
                                "revises domains.")
    methods: list[Literal["opmix", "opmix-recompute", "uniform-seen", "natural-seen", "naive", "replay", "distill",
                          "retrain"]] = Field(
        default_factory=lambda: ["opmix", "opmix-recompute", "uniform-seen", "naive", "replay", "retrain"], min_length=1,
        description="New data = the stage's added domains, split parts and revised versions. opmix: adapters "
        "for the new data + old, search over {old, new} (mixture reuse; a stage with no new data keeps the "
        "previous mixture, renormalised, with no search); opmix-recompute: adapters for every current domain; "
        "uniform-seen / natural-seen: every current domain at an equal / token share, from the method's own last "
        "checkpoint (what a user does without a mixing method); naive: 100% new; replay: new + replay_share old; "
        "distill: replay's draws, the old rows trained toward the previous checkpoint's predictions (KL, "
        "distill_kl_weight) instead of their tokens; retrain: the stage-0 checkpoint retrained on every current "
        "domain.")
    replay_share: float = Field(0.1, gt=0, lt=1, description="Old-data share of the replay and distill baselines.")
    distill_kl_weight: float = Field(1.0, gt=0, description="distill: weight of the KL term on the old data's rows "
                                     "against the cross-entropy on the new data's.")
    stay: Literal["prior", "current"] = Field(
        "prior", description="What an OP-Mix stage keeps when its round does not move: prior = the new data at a "
        "prior share (an added domain 1/n of the mixture, the parts of a split their parent's weight by tokens, a "
        "revised version the old one's weight; rounds.initial_stay); current = the previous mixture, the new "
        "data at 0 (docs/DECISIONS.md).")
    seeds: list[int] = Field(default_factory=list, description="Init and split seeds to run the whole sequence "
                             "on, each into OUT/seed_N (a seed whose results.json is there for the same config is "
                             "kept), their rows together in OUT/results.json; empty = run.seed alone, into OUT.")
    noise_orders: int = Field(0, ge=0, le=16, description="At every later stage uniform-seen also trains from its own "
                              "previous checkpoint on this many more data orders (run.data_seed; not kept): the sd "
                              "over its orders of the stage's mean val loss is the data-order noise of one stage, "
                              "x sqrt(2) the noise of a one-order comparison of two methods. 0 = not measured; "
                              "use 3 or more to read it.")
    instruct_eval: bool = Field(False, description="Continual instruction tuning: score every stage's checkpoints "
                                "on the instruction tasks in data.path (exact match and answer loss, held-out and "
                                "trained-sample); the tasks are built there by `python -m opmix_ray.data.instruct` "
                                "when data.path has no instruct.json.")

    @model_validator(mode="after")
    def _seeds_once(self):
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeats a seed (fix: list each seed once)")
        return self


class ExperimentConfig(Config):
    bench: BenchSection = Field(default_factory=BenchSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)

    def run_config(self) -> Config:
        """The same settings as a run's Config (what a run dir saves and resumes from)."""
        return Config.model_validate(self.model_dump(exclude=set(Config.experiment_sections)))


def load_experiment_config(source: str | Path | dict, overrides: dict | None = None) -> ExperimentConfig:
    """load_config for the experiments: the run sections plus `bench` and `schedule`."""
    return load_config(source, overrides, schema=ExperimentConfig)


def prepare_out(out_dir: str | Path, result_file: str, overwrite: bool) -> Path:
    """The resolved --out dir; refuses a file, and a dir holding a finished result unless overwrite."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config error at --out: {out} is a file (fix: pass a directory for the runs and results)")
    if (out / result_file).exists() and not overwrite:
        raise ConfigError(f"config error at --out: {out} holds a finished {result_file} (fix: pass --overwrite "
                          "or another --out)")
    return out


def seed_config(cfg: ExperimentConfig, seed: int, out_dir: Path) -> ExperimentConfig:
    """One seed's config: its run sections are what that seed's runs save and resume from
    (`.run_config()`), its bench section what the baselines read."""
    c = cfg.model_copy(deep=True)
    c.run.seed, c.run.storage_path, c.run.baseline = seed, str(out_dir / "runs"), "none"
    return c
