"""OpMix: OP-Mix decisions for a training loop you already have.

    opmix = OpMix("mine.yaml", total_steps=400)           # checks, reads the data, starts Ray
    sampler = opmix.sampler()                             # draw your batches from it
    decision = opmix.boundary(model, 80, sampler)         # a round on Ray at step 80; returns the decision
    sampler.push(decision.mixture)                        # applies at the next step (OpMixLoop does this)

What the object holds: the run's config (only the sections a round reads: data, model.device,
adapters, search, decision, rounds, ray, run), opmix-ray's token shards of your domains (what the
adapters train on and candidates are scored on), a run dir for the rounds' files, and the round
runner, a Ray actor that runs each round with the engine's own steps (engine/driver.run_round).
Your optimizer, schedule, precision, logging and checkpointing stay yours. It pickles small
(the shards travel as an ObjectRef), so a Ray Train worker can take it in its loop config.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from opmix_ray.config import Config, load_config, sampler_seed
from opmix_ray.data.feed import OpMixSampler
from opmix_ray.errors import BadInput, ConfigError, TrainerSetupError
from opmix_ray.mixture import Mixture

FIELDS = "own trainer"


@dataclass
class BoundaryDecision:
    """What a round decided: `mixture` is what to train on next (the current one when it stayed)."""
    round: int
    step: int
    moved: bool
    mixture: Mixture
    reason: str
    reused: bool = False  # the run dir already held this round's decision for this very checkpoint
    record: dict = field(default_factory=dict)  # the round's history.json entry

    @classmethod
    def from_dict(cls, d: dict) -> BoundaryDecision:
        return cls(d["round"], d["step"], d["moved"], Mixture.from_dict(d["weights"]), d["reason"],
                   d.get("reused", False), d.get("record", {}))


class PendingRound:
    """A round started in the background: poll `ready()`, then `result()`."""

    def __init__(self, ref, round_idx: int, step: int, request: dict | None = None):
        self.ref, self.round, self.step, self.request = ref, round_idx, step, request

    def ready(self) -> bool:
        import ray
        return bool(ray.wait([self.ref], timeout=0)[0])

    def result(self, timeout: float | None = None) -> BoundaryDecision:
        import ray
        try:
            return BoundaryDecision.from_dict(ray.get(self.ref, timeout=timeout))
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, BadInput):  # its one line, not the actor's traceback
                raise exc.cause from None
            raise


def _as_config(config) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, (str, os.PathLike, dict)):
        return load_config(config)
    raise ConfigError(f"config error at <config>: got a {type(config).__name__} (fix: a YAML path, a dict or a Config)")


def check_boundaries(boundaries, total_steps: int) -> list[int]:
    """Sorted distinct steps inside [0, total_steps), or a one-line TrainerSetupError."""
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise TrainerSetupError(f"{FIELDS}: total_steps={total_steps!r} (fix: your run's number of optimizer steps, >= 1)")
    out = []
    for b in boundaries:
        if not isinstance(b, int) or isinstance(b, bool) or b < 0:
            raise TrainerSetupError(f"{FIELDS}: boundary step {b!r} is not a step (fix: whole numbers >= 0)")
        if b >= total_steps:
            raise TrainerSetupError(f"{FIELDS}: boundary step {b} is past the end of the run ({total_steps} steps: the "
                                    f"last step is {total_steps - 1}) (fix: boundaries below {total_steps}, or raise "
                                    "total_steps / max_steps)")
        out.append(b)
    if len(set(out)) != len(out):
        raise TrainerSetupError(f"{FIELDS}: boundaries {list(boundaries)} name a step twice (fix: each step once)")
    return sorted(out)


class OpMix:
    """One OP-Mix run beside your trainer. total_steps: your run's optimizer steps; batch_size: rows
    (sequences or examples) per optimizer step over all ranks and accumulation (default main.batch_size);
    boundaries: the steps whose checkpoint a round decides on (default: rounds.uniform_prefix and
    rounds.num_rounds over total_steps, as the main run places them); overwrite: replace a run dir
    that holds another run. A run dir that holds this OpMix's own earlier rounds is continued: a
    round whose checkpoint and state come out the same reuses its recorded decision."""

    def __init__(self, config, *, total_steps: int, batch_size: int | None = None,
                 boundaries: list[int] | None = None, overwrite: bool = False):
        from opmix_ray.engine.main_run import round_steps
        from opmix_ray.engine.preflight import check_against_data, check_ray_address, check_searcher, model_vocab
        from opmix_ray.data.read import build_shards

        cfg = _as_config(config)
        if boundaries is None:
            check_boundaries([], total_steps)
            boundaries = round_steps(total_steps, cfg.rounds.uniform_prefix, cfg.rounds.num_rounds)
        self.boundaries = check_boundaries(boundaries, total_steps)
        self.total_steps = total_steps
        self.batch_size = batch_size or cfg.main.batch_size
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise TrainerSetupError(f"{FIELDS}: batch_size={batch_size!r} (fix: rows per optimizer step, >= 1)")
        self.cfg = cfg
        check_searcher(cfg)
        check_ray_address(cfg)
        shards = build_shards(cfg)
        check_against_data(cfg, shards, model_vocab(cfg))
        self._shards = shards
        from opmix_ray.own_trainer.runner import prepare_run_dir, start_runner
        self.run_dir = str(prepare_run_dir(cfg, shards, self, overwrite))
        self._shards_ref, self._runner = start_runner(cfg, shards, self.run_dir)

    # --- pickling: a Ray Train worker gets the handles, never a copy of the corpus ---
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_shards"] = None
        state["cfg"] = self.cfg.model_dump(mode="json")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.cfg = Config.model_validate(state["cfg"])

    @property
    def shards(self):
        """opmix-ray's token shards of the run's domains (fetched from the object store on first use)."""
        if self._shards is None:
            import ray
            self._shards = ray.get(self._shards_ref)
        return self._shards

    @property
    def domains(self) -> tuple[str, ...]:
        return self.shards.domains

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.shards.seq_len

    def initial_mixture(self) -> Mixture:
        from opmix_ray.engine.driver import initial_mixture
        return initial_mixture(self.cfg, self.shards)

    def sampler(self, datasets: dict | None = None, rows_per_step: int | None = None) -> OpMixSampler:
        """The sampler to draw your batches from, on rounds.initial, seeded like the main run's
        (run.data_seed or run.seed), with the repetition caps of data.max_epochs. datasets: your own
        map-style datasets by domain name (each example one unit of weight) instead of opmix-ray's
        token windows; their names must be the run's domains."""
        rows = rows_per_step or self.batch_size
        if datasets is None:
            return OpMixSampler.from_shards(self.shards, self.initial_mixture(), self.shards.cap_tokens(self.cfg),
                                            seed=sampler_seed(self.cfg.run), rows_per_step=rows)
        if not hasattr(datasets, "keys"):
            raise TrainerSetupError(f"{FIELDS}: datasets is a {type(datasets).__name__} (fix: a dict "
                                    "{domain name: map-style dataset})")
        missing = [d for d in self.domains if d not in datasets]
        extra = [d for d in datasets if d not in self.domains]
        if missing or extra:
            what = f"has no dataset for the run's domains {missing}" if missing else \
                f"has datasets for {extra}, which the run does not have"
            raise TrainerSetupError(f"{FIELDS}: the sampler {what} (the run's domains, from data.path: "
                                    f"{list(self.domains)}) (fix: one dataset per run domain, named alike)")
        caps = {d: self.cfg.data.max_epochs.get(d, self.cfg.data.default_max_epochs) for d in self.domains}
        return OpMixSampler.from_datasets(datasets, self.initial_mixture(), caps, seed=sampler_seed(self.cfg.run),
                                          rows_per_step=rows)

    def check_sampler(self, sampler) -> None:
        """A one-line TrainerSetupError unless `sampler` is an OpMixSampler over the run's domains."""
        if not isinstance(sampler, OpMixSampler):
            raise TrainerSetupError(f"{FIELDS}: got a {type(sampler).__name__} where the OP-Mix sampler belongs (fix: "
                                    "sampler = opmix.sampler(), and train on it)")
        if tuple(sampler.domains) != tuple(self.domains):
            raise TrainerSetupError(f"{FIELDS}: the sampler draws domains {list(sampler.domains)}, the run decides over "
                                    f"{list(self.domains)} (fix: build the sampler with opmix.sampler())")

    def check_model(self, model) -> None:
        """A one-line TrainerSetupError unless `model` is a Hugging Face causal LM whose modules
        match adapters.target_modules and whose vocabulary covers the tokenizer's."""
        from opmix_ray.engine.preflight import target_modules_problem
        model = getattr(model, "module", model)  # DDP
        if not hasattr(model, "save_pretrained") or not hasattr(model, "named_modules"):
            raise TrainerSetupError(f"{FIELDS}: the model is a {type(model).__name__}, not a Hugging Face model (fix: "
                                    "a transformers causal LM, e.g. AutoModelForCausalLM, or a saved checkpoint dir)")
        problem = target_modules_problem(self.cfg.adapters.target_modules, [n for n, _ in model.named_modules() if n])
        if problem:
            raise TrainerSetupError(f"{FIELDS}: adapters.target_modules: {problem}")
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if isinstance(vocab, int) and vocab < self.shards.vocab_size:
            raise TrainerSetupError(f"{FIELDS}: the model's vocab {vocab} < the tokenizer's {self.shards.vocab_size} "
                                    "(fix: data.tokenizer: the tokenizer the model was trained with)")

    def round_of(self, step: int) -> int:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0 or step >= self.total_steps:
            raise TrainerSetupError(f"{FIELDS}: boundary step {step!r} is past the end of the run or not a step "
                                    f"({self.total_steps} steps) (fix: one of the boundaries {self.boundaries})")
        if step not in self.boundaries:
            raise TrainerSetupError(f"{FIELDS}: step {step} is not a round boundary (fix: one of {self.boundaries}, or "
                                    "pass boundaries= to OpMix)")
        return self.boundaries.index(step)

    def boundary(self, model, step: int, sampler: OpMixSampler, lr: float | None = None,
                 background: bool | None = None):
        """Run the round of boundary `step` on Ray: the checkpoint is `model` saved now (or `model`
        itself when it is a saved Hugging Face checkpoint dir). Returns the BoundaryDecision, or with
        background=True (default: rounds.mode async) a PendingRound at once. lr: your optimizer's
        learning rate now (adapters.lr_schedule: current scales it; None: main.lr). The sampler
        reports what was drawn up to `step`; pushing the decision into it is yours (OpMixLoop does)."""
        pending = self.submit(self.request(model, step, sampler, lr))
        background = self.cfg.rounds.mode == "async" if background is None else background
        return pending if background else pending.result()

    def request(self, model, step: int, sampler: OpMixSampler, lr: float | None = None) -> dict:
        """What a round at `step` is asked (JSON): the checkpoint saved, the draws so far. Sending the
        same request again (submit) gets the same round, or its recorded decision."""
        k = self.round_of(step)
        self.check_sampler(sampler)
        path = self._checkpoint(model, k)
        seen = sampler.counters_at(step)
        info = {"step": step, "tokens": step * self.tokens_per_step, "path": path, "val_loss": {},
                "drawn": seen["drawn"], "mixture": seen["mixture"], "n_params": 0, "flops": 0.0,
                "epochs": seen["epochs"], "lr": None if lr is None else float(lr), "total_steps": self.total_steps,
                "tokens_per_step": self.tokens_per_step,
                # caps need tokens: a token sampler counts them, an example sampler does not
                "drawn_tokens": seen["drawn_total"] if sampler.examples is None else None}
        return {"round": k, "info": info, "next_step": next((b for b in self.boundaries if b > step), self.total_steps)}

    def submit(self, request: dict) -> PendingRound:
        """Start the requested round on the round runner; returns at once."""
        info = request["info"]
        current = Mixture.from_dict(info["mixture"], self.domains, self.shards.data_hash)
        ref = self._runner.round.remote(request["round"], info, current, request["next_step"])
        return PendingRound(ref, request["round"], info["step"], request)

    def _checkpoint(self, model, k: int) -> str:
        from opmix_ray import rundir
        if isinstance(model, (str, os.PathLike)):
            p = Path(model).expanduser()
            if not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
                raise TrainerSetupError(f"{FIELDS}: {p} is not a saved Hugging Face checkpoint (no config.json and "
                                        "*.safetensors) (fix: model.save_pretrained(dir), or pass the model itself)")
            return str(p.resolve())
        self.check_model(model)
        from opmix_ray.model import save_checkpoint
        path = rundir.at(self.run_dir, rundir.checkpoint(k))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(getattr(model, "module", model), path, self.shards.tokenizer_files)
        return str(path)

    def note_applied(self, round_idx: int, step: int) -> None:
        """Record in history.json the step a round's decision took effect (fire and forget)."""
        self._runner.note_applied.remote(round_idx, step)

    def close(self) -> None:
        """Stop the round runner (Ray itself stays up)."""
        import ray
        if self._runner is not None:
            ray.kill(self._runner)
            self._runner = None
