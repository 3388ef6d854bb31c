"""The typed run config: one YAML file is the source of truth for a run.

    cfg = load_config("opmix_ray/configs/demo.yaml")      # or load_config(dict)

Every field carries a default and help text (shown by `opmix-ray config-help`). Validation lives
here and only here; a bad value raises ConfigError whose one-line message names the field and
the fix, e.g. "config error at search.max_concurrent: ... (fix: set it to >= 1)".
"""
from __future__ import annotations

import math
import re
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from opmix_ray.errors import ConfigError
from opmix_ray.yaml_load import safe_load_unique

# A name that becomes a path component (run dirs, adapter dirs, added-domain files): no separators,
# no "..", nothing a shell or a filesystem treats specially.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]{0,127}")


def name_problem(name: object) -> str | None:
    """Why `name` cannot name a run or a domain, or None when it can."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        return (f"{name!r} is not a safe name (fix: letters, digits and _ . = + -, starting with a letter "
                "or digit, no '..', at most 128 characters)")
    return None


def sampler_seed(run: "RunSection") -> int:
    """The main run's sampler seed: 1000 x the data-order seed (run.data_seed, else run.seed), so a
    fixed-mixture run with the same seeds draws exactly what the main run draws."""
    return 1000 * (run.seed if run.data_seed is None else run.data_seed)


def _takes_bool(annotation) -> bool:
    """True where a bool may appear in the value: a bool field, Any, or a section (it checks its own)."""
    if annotation is bool or annotation is Any or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return True
    return any(_takes_bool(a) for a in typing.get_args(annotation))


def _bool_inside(v) -> bool:
    return isinstance(v, bool) or (isinstance(v, dict) and any(_bool_inside(x) for x in v.values())) or \
        (isinstance(v, list) and any(_bool_inside(x) for x in v))


class Section(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored; allow_inf_nan=False: an
    # infinite or NaN number anywhere is refused here, not found as NaN trials minutes later.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _a_bool_is_not_a_number(cls, v, info):
        # pydantic would read `batch_size: true` as 1
        if _bool_inside(v) and not _takes_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("true/false where a number or name is expected (fix: give the value itself)")
        return v


class RunSection(Section):
    name: str = Field("opmix", description="Run name; the run's files go to <storage_path>/<name>.")
    storage_path: str = Field("./opmix_runs", description="Local or mounted dir, or a pyarrow.fs URI (s3://b/p, gs://b/p) mirrored from a local staging dir.")
    seed: int = Field(0, ge=0, lt=2**32, description="Seed for the data split, the model's init, the searcher and "
                      "(unless data_seed is set) the data order.")
    data_seed: int | None = Field(None, ge=0, lt=2**32, description="Seed for the data order alone: which windows the "
                                  "main run and the adapters draw, and when. Same init and split, another order: "
                                  "how far two runs of one mixture differ is the noise of a comparison "
                                  "(`opmix-ray headroom`); null = run.seed.")
    baseline: Literal["none", "uniform", "natural"] = Field(
        "none", description="'none' runs OP-Mix rounds; 'uniform'/'natural' trains the same budget "
        "on a fixed mixture (no rounds) for comparison.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v):
        if problem := name_problem(v):
            raise ValueError(problem)
        return v


class DataSection(Section):
    path: str | None = Field(None, description="Dir with <domain>.parquet files and/or hive dirs "
                             "domain=<domain>/ of parquet files (data/layout.py); null = bundled corpus.")
    domains: list[str] | None = Field(None, description="Domain names in a fixed order; null = every "
                                      "parquet file and domain=<name>/ dir in `path`, sorted.")
    build_revisions: bool = Field(False, description="Build data.path first, when it has no revisions.json, with the "
                                  "bundled domains plus three derived from them: bible_ot and bible_nt (bible by "
                                  "testament, disjoint documents) and python_v2 (python without comment lines); "
                                  "`python -m opmix_ray.data.revisions`. Seconds; an existing build is checked "
                                  "against its sha256s instead.")
    text_column: str = Field("text", description="Parquet column holding the documents (or token ids).")
    tokenizer: str | None = Field(None, description="A tokenizer.json, or a Hugging Face fast-tokenizer dir; null = "
                                  "model.path's own tokenizer.json if it has one, else the bundled BPE. The end-of-text "
                                  "token is the eos_token of a tokenizer_config.json beside it, else <|endoftext|>.")
    seq_len: int = Field(128, gt=7, description="Tokens per training/eval sequence.")
    val_tokens_per_domain: int = Field(8192, gt=0, description="Held-out tokens per domain: what every "
                                       "report (run, bench, fidelity) scores.")
    selection_tokens_per_domain: int = Field(4096, ge=0, description="More held-out tokens per domain, apart "
                                             "from val and train, that the search and the decision score "
                                             "candidates on, so the windows that choose a mixture are not the "
                                             "ones that report it; 0 = score candidates on val.")
    max_epochs: dict[str, float] = Field(default_factory=dict, description="Repetition caps: a domain "
                                         "is never drawn past available_tokens * max_epochs.")
    default_max_epochs: float = Field(8.0, gt=0, description="Cap for domains not in max_epochs.")
    eval_only_domains: list[str] = Field(default_factory=list, description="Held-out target domains: "
                                         "scored on validation, never trained on and never mixed (as RegMix "
                                         "targets Pile-CC); name them in search.objective_weights to optimise for them.")
    reader: Literal["driver", "ray_data"] = Field("driver", description="Who reads and tokenizes the domains: "
                                                  "driver = this process (fastest on a small corpus); ray_data = "
                                                  "Ray Data tasks on the cluster (read_parquet + map_batches), the "
                                                  "train tokens stored by those tasks so the driver never holds the "
                                                  "corpus (also a domain added or revised in a live run); every node "
                                                  "must see data.path at the same path (a shared filesystem). Both "
                                                  "give the same tokens and data hash.")

    @model_validator(mode="after")
    def _revisions_need_a_dir(self):
        if self.build_revisions and not self.path:
            raise ValueError("build_revisions: true needs a dir to build into (fix: set data.path to a new dir, "
                             "e.g. opmix_runs/data)")
        return self

    @field_validator("domains", "eval_only_domains")
    @classmethod
    def _safe_unique_names(cls, v):
        for name in v or []:
            if problem := name_problem(name):
                raise ValueError(f"domain {problem}")
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"{v} names a domain twice (fix: list each domain once)")
        return v

    @field_validator("max_epochs")
    @classmethod
    def _positive_caps(cls, v):
        for k, x in v.items():
            if not x > 0:  # also rejects NaN
                raise ValueError(f"max_epochs[{k}]={x} must be > 0 (fix: use a positive number of epochs)")
        return v


class ModelSection(Section):
    path: str | None = Field(None, description="Local Hugging Face checkpoint dir; null = build the "
                             "small Llama below from config (random init).")
    hidden_size: int = Field(128, gt=0, description="Width of the from-config Llama.")
    num_layers: int = Field(4, gt=0, description="Decoder layers.")
    num_heads: int = Field(4, gt=0, description="Attention heads (must divide hidden_size into heads of an even "
                           "width: rotary position embeddings turn pairs of dimensions).")
    intermediate_size: int = Field(384, gt=0, description="MLP width.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if present, else cpu.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="bf16: matmuls of the main run, the "
                                                       "adapters and their evaluation autocast to bfloat16 (weights, "
                                                       "optimizer state and the loss stay fp32); auto = bf16 on "
                                                       "cuda, fp32 on cpu.")

    @model_validator(mode="after")
    def _heads_divide(self):
        h, n = self.hidden_size, self.num_heads
        if h % n:
            raise ValueError(f"num_heads={n} does not divide hidden_size={h} "
                             "(fix: pick num_heads that divides hidden_size)")
        if (h // n) % 2:  # else the model builds, and the first forward pass fails inside Ray
            fits = [k for k in range(1, h + 1) if h % k == 0 and (h // k) % 2 == 0]
            fix = f"num_heads in {fits[-4:]}" if fits else f"an even hidden_size such as {2 * n * math.ceil(h / (2 * n))}"
            raise ValueError(f"hidden_size={h} / num_heads={n} gives heads {h // n} wide, an odd width that rotary "
                             f"position embeddings cannot take (fix: {fix})")
        return self


class MainSection(Section):
    total_tokens: int = Field(1_000_000, gt=0, description="Main-run training budget in tokens.")
    batch_size: int = Field(16, gt=0, description="Sequences per optimizer step, over all workers and "
                            "accumulation steps (the global batch): the run's steps, rounds and draws do "
                            "not depend on how it is split.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers of the main run (DDP: gloo on CPU, "
                             "nccl on GPU). Each holds main.cpus_per_worker CPUs (a GPU each on a GPU "
                             "cluster) and trains batch_size / (num_workers x grad_accum_steps) sequences "
                             "per micro-step.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step on each worker "
                                  "(gradients summed before the step): the same global batch in less memory.")
    lr: float = Field(2e-3, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine", description="cosine: decay to 10% of the peak over the run. wsd: warmup-stable-decay with a "
        "short linear anneal to 10% before every round boundary and the end, so each decision is taken at an "
        "annealed checkpoint (as the OP-Mix paper does), then back to the peak.")
    wsd_decay_fraction: float = Field(0.1, gt=0, lt=1, description="wsd: share of each segment spent annealing.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs each main-run worker holds.")

    @model_validator(mode="after")
    def _batch_splits(self):
        parts = self.num_workers * self.grad_accum_steps
        if self.batch_size % parts:
            raise ValueError(f"batch_size={self.batch_size} does not split into num_workers x grad_accum_steps "
                             f"= {parts} equal micro-batches (fix: make batch_size a multiple of {parts})")
        return self


class RoundsSection(Section):
    uniform_prefix: float = Field(0.2, ge=0, lt=1, description="Fraction of tokens trained on the initial "
                                  "mixture before the first round (paper: 0.2).")
    num_rounds: int = Field(2, ge=0, description="Rounds of adapters -> search -> push, evenly spaced "
                            "over the tokens after the prefix.")
    mode: Literal["sync", "async"] = Field("sync", description="sync: the main run waits at each boundary "
                                           "for the round's winner. async: it keeps training on the current "
                                           "mixture while the round runs on the boundary's checkpoint, and "
                                           "switches at the first step after the push (it waits only if a "
                                           "round is still running at the next boundary).")
    initial: Literal["uniform", "natural"] | dict[str, float] = Field(
        "uniform", description="Mixture for the prefix: uniform, natural, or explicit weights per domain "
        "(zeros allowed: a domain that has not arrived yet; `opmix-ray continual` sets this per stage).")


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
                          "leader's mixture and push only if it beats the 'old' adapter (trained on the current "
                          "mixture) by k standard errors; costs one adapter training per move (engine/confirm.py).")
    law_min_loo_spearman: float = Field(0.7, ge=-1, le=1, description="mixing-law searcher: its KL-regularised "
                                        "proposal leads when the law's leave-one-out Spearman on the trials "
                                        "reaches this; below it the best trial leads.")


class TrackingSection(Section):
    """Where a run's metrics also go while it trains, each backend the same: the main run's loss,
    mixture weights and val loss per step and its pushes, and every search trial's metrics."""
    tensorboard: bool = Field(False, description="TensorBoard events: the main run under <run>/tracking/main, "
                              "each trial in its trial dir (Tune's TBX logger); `tensorboard --logdir <run dir>`.")
    mlflow: bool = Field(False, description="MLflow: experiment run.name, one MLflow run 'main' and one per "
                         "search trial (Tune's MLflow logger); needs `pip install mlflow-skinny`.")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking URI; null = a SQLite store in the "
                                            "run dir, `mlflow ui --backend-store-uri sqlite:///<run>/tracking/mlflow.db`.")
    wandb: bool = Field(False, description="Weights & Biases: one W&B run for the main run and one per search trial "
                        "(Tune's W&B logger), grouped by run.name; needs `pip install wandb`.")
    wandb_mode: Literal["offline", "online"] = Field("offline", description="offline: written under "
                                                     "<run>/tracking/wandb, upload later with `wandb sync`; "
                                                     "online: needs `wandb login` (or WANDB_API_KEY).")
    wandb_project: str = Field("opmix-ray", min_length=1, description="W&B project the runs go to.")

    @model_validator(mode="after")
    def _backends_installed(self):
        import importlib.util
        for field, module, pkg in (("mlflow", "mlflow", "mlflow-skinny"), ("wandb", "wandb", "wandb")):
            if getattr(self, field) and importlib.util.find_spec(module) is None:
                raise ValueError(f"tracking.{field}: true but {module} is not installed (fix: pip install {pkg}, "
                                 f"or set tracking.{field}: false)")
        return self


class RaySection(Section):
    address: str | None = Field(None, description="Ray address; null = start Ray on this machine, without "
                         "a dashboard (what it listens on: cluster/README.md).")
    num_cpus: int | None = Field(None, gt=0, description="Logical CPUs for local Ray; null = cores + "
                                 "main.cpus_per_worker (the main run idles while a round runs).")


class Config(Section):
    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    main: MainSection = Field(default_factory=MainSection)
    rounds: RoundsSection = Field(default_factory=RoundsSection)
    adapters: AdaptersSection = Field(default_factory=AdaptersSection)
    search: SearchSection = Field(default_factory=SearchSection)
    decision: DecisionSection = Field(default_factory=DecisionSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    ray: RaySection = Field(default_factory=RaySection)

    # Sections of a config file that only `opmix-ray bench` and `opmix-ray continual` read
    # (opmix_ray/experiments/experiment_config.py validates them). A run skips them, so one file serves both,
    # and a run dir written when the run config still carried them resumes.
    experiment_sections: ClassVar[tuple[str, ...]] = ("bench", "schedule")

    @model_validator(mode="after")
    def _cross_checks(self):
        steps = self.main.total_tokens // (self.main.batch_size * self.data.seq_len)
        if steps < max(2, 2 * self.rounds.num_rounds):
            raise ValueError(f"main.total_tokens={self.main.total_tokens} gives {steps} steps, too few for "
                             f"{self.rounds.num_rounds} rounds (fix: raise main.total_tokens)")
        if self.search.objective_weights is not None:
            bad = {k: v for k, v in self.search.objective_weights.items() if not (v >= 0 and math.isfinite(v))}
            if bad or not sum(self.search.objective_weights.values()) > 0:
                raise ValueError(f"search.objective_weights={self.search.objective_weights} needs finite "
                                 "weights >= 0 with a positive sum (fix: e.g. {python: 1.0})")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _one_line(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "<root>"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key (fix: remove it or check its spelling; `opmix-ray config-help` lists the keys)"
    elif "fix:" not in msg:
        msg += f" (fix: see `opmix-ray config-help` for {loc})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"config error at {loc}: {msg}{more}"


def load_config(source: str | Path | dict, overrides: dict | None = None, schema: type[Config] | None = None) -> Config:
    """Parse and validate a YAML path or a dict; raise ConfigError with a one-line message.

    `schema` is Config (a run) or a subclass that adds sections (experiments.experiment_config.ExperimentConfig);
    the experiment sections a schema does not declare are skipped, not refused."""
    if isinstance(source, dict):
        raw = source
    else:
        p = Path(source)
        if not p.is_file():
            raise ConfigError(f"config error at <file>: {p} does not exist (fix: pass a YAML config path)")
        try:
            raw = safe_load_unique(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config error at <yaml>{where}: malformed YAML (fix: check indentation "
                              "and colons)") from None
    if raw is None:  # an empty file (or only comments) is a mistake, not a request for a default run
        raise ConfigError(f"config error at <file>: {source} is empty (fix: give at least `run: {{name: NAME}}`; "
                          "opmix_ray/configs/demo.yaml is a complete example)")
    if not isinstance(raw, dict):
        raise ConfigError("config error at <root>: expected a mapping of sections (fix: start with `run:`)")
    schema = schema or Config
    raw = {k: v for k, v in _deep_merge(raw, overrides or {}).items()
           if k in schema.model_fields or k not in Config.experiment_sections}
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out.get(k) or {}, v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
