"""The typed run config: one YAML file is the source of truth for a run.

    cfg = load_config("opmix_ray/configs/demo.yaml")      # or load_config(dict)

Every field carries a default and help text (shown by `opmix-ray config-help`). Validation lives
here and only here; a bad value raises ConfigError whose one-line message names the field and
the fix, e.g. "config error at search.max_concurrent: ... (fix: set it to >= 1)".
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from opmix_ray.config_base import SAFE_NAME, Section, name_problem  # noqa: F401 (re-exported)
from opmix_ray.config_placement import PlacementSection, placement_problem
from opmix_ray.config_round import AdaptersSection, DecisionSection, SearchSection
from opmix_ray.errors import ConfigError
from opmix_ray.yaml_load import safe_load_unique

def sampler_seed(run: "RunSection") -> int:
    """The main run's sampler seed: 1000 x the data-order seed (run.data_seed, else run.seed), so a
    fixed-mixture run with the same seeds draws exactly what the main run draws."""
    return 1000 * (run.seed if run.data_seed is None else run.data_seed)


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
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: a process that placement.* gives a "
                                                   "GPU share uses it (cuda, when torch sees it there), every other "
                                                   "one the CPU; cpu: CPUs only; cuda: every part on a GPU (each "
                                                   "placement.*_gpus > 0). A trainer of your own: cuda if present.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="bf16: matmuls of the main run, the "
                                                       "adapters, the candidates scored and their evaluation "
                                                       "autocast to bfloat16 (weights, "
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
                             "nccl on GPU). Each holds main.cpus_per_worker CPUs (and placement.main_gpus "
                             "GPUs) and trains batch_size / (num_workers x grad_accum_steps) sequences "
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
    initial_stay: dict[str, float] | None = Field(
        None, description="What the first round keeps when it does not move (decision.rule: safe), when not "
        "rounds.initial: weights per domain that give data rounds.initial leaves at 0 a prior share, so staying "
        "trains on it. The domains without their own adapter (adapters.domains) must keep rounds.initial's "
        "proportions among themselves. null: staying keeps rounds.initial. `opmix-ray continual` sets this "
        "per stage (schedule.stay).")


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
    num_gpus: int | None = Field(None, ge=0, description="GPUs a local Ray declares; null = the GPUs Ray finds on "
                                 "this machine. Declared GPUs that are not there rehearse a placement: the processes "
                                 "granted one run on the CPU.")


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
    placement: PlacementSection = Field(default_factory=PlacementSection)

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
        if problem := placement_problem(self):
            raise ValueError(problem)
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
