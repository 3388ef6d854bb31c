"""Per-domain LoRA adapters trained on the live checkpoint, as one Ray Train job per round
(adapters.kind: full trains full component models instead, DeMix's; everything else is the same).

The plan (the paper's): one adapter on the current mixture p ("old"), and one per domain d on
probe data that is `probe_domain_share` d and the rest p. The job has as many workers as free CPUs
allow and rank r trains adapters r, r + W, r + 2W, ... side by side with the other ranks; one job
per round rather than one per adapter because a Ray Train fit costs 11-17 s to start on CPU (see
docs/DECISIONS.md). Each adapter is a real PEFT adapter dir (adapter_model.safetensors +
adapter_config.json) plus opmix_meta.json with the data and tokenizer hashes, written by every
rank into the round's Ray Train checkpoint <run_dir>/adapters_round_<k>/adapters/<name>/.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
import ray
import ray.train
import torch
from peft import LoraConfig, get_peft_model
from ray.train import Checkpoint, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer

from opmix_ray import rundir
from opmix_ray.config import Config
from opmix_ray.console import Progress, say
from opmix_ray.data.sampler import MixtureSampler
from opmix_ray.engine.faults import alive_nodes, lost_since, on_driver_node
from opmix_ray.engine.placement import adapter_scaling, adapter_torch_config, adapter_workers, worker_device
from opmix_ray.mixture import Mixture
from opmix_ray.model import lm_loss, load_checkpoint, n_params, on_device, set_threads
from opmix_ray.storage import write_json
from opmix_ray.training import optimizer_step

REPLICATE = "old#2"  # a second adapter on the current mixture, another data seed: the adapter-noise probe


def adapter_plan(current: Mixture, cfg: Config, affected: list[str] | None = None) -> list[tuple[str, dict[str, float]]]:
    """[(adapter name, probe mixture)]: 'old' on p, then each domain on share*d + (1-share)*p, then
    the replicate of 'old' (never a search coordinate; engine/candidates.py keeps it out of the space).
    affected: the domains a live change touched (engine/domains.py); only they get their own adapter,
    and 'old' carries the rest, whatever adapters.domains and include_old say."""
    include_old = cfg.adapters.include_old or affected is not None
    plan = [("old", current.as_dict())] if include_old else []
    share = cfg.adapters.probe_domain_share
    own = affected if affected is not None else cfg.adapters.domains
    for i, d in enumerate(current.domains):
        if own is not None and d not in own:
            continue  # collapsed into 'old'
        w = (1.0 - share) * current.as_array()
        w[i] += share
        plan.append((d, Mixture.normalised(current.domains, w).as_dict()))
    if include_old and cfg.adapters.replicate_old:
        plan.append((REPLICATE, current.as_dict()))
    return plan


def adapter_lr(cfg: Config, main_lr_now: float | None) -> float:
    """lr_multiplier x the main run's lr at the checkpoint (lr_schedule: current) or at its peak."""
    base = main_lr_now if cfg.adapters.lr_schedule == "current" and main_lr_now is not None else cfg.main.lr
    return cfg.adapters.lr_multiplier * base


def adapter_tokens(cfg: Config, seq_len: int) -> int:
    """Tokens one adapter trains on (its FLOPs in compute.lora_flops)."""
    return cfg.adapters.steps * cfg.adapters.batch_size * seq_len


def adapter_seeds(cfg: Config, round_idx: int | str, name: str) -> tuple[int, int]:
    """(LoRA init seed, data seed). A shared init is one seed per round: every adapter starts from
    the same A, so merged deltas differ by what each adapter's data taught, not by its init."""
    order = "" if cfg.run.data_seed is None else f"order{cfg.run.data_seed}/"  # run.data_seed: another order
    data = zlib.crc32(f"{cfg.run.seed}/{order}{round_idx}/{name}".encode())
    init = zlib.crc32(f"{cfg.run.seed}/{round_idx}/lora-init".encode()) if cfg.adapters.init == "shared" else data
    return init, data


def embedding_modules(model) -> tuple[list[str], bool]:
    """(module names for PEFT's modules_to_save, tied?): the input embedding, plus the output head when
    it is not tied to it (a tied head follows the embedding through ensure_weight_tying)."""
    names = {m: n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is None or head.weight is emb.weight
    out = [names[emb].rsplit(".", 1)[-1]] + ([] if tied else [names[head].rsplit(".", 1)[-1]])
    return out, tied


def lora_config(cfg: Config, model) -> LoraConfig:
    """The round's LoRA: r, alpha and target_modules from adapters.*; with adapters.embedding: full the
    embedding (and an untied head) train in full beside it, a tied head kept tied."""
    extra, targets = {}, list(cfg.adapters.target_modules)
    if cfg.adapters.embedding != "frozen":
        modules, tied = embedding_modules(model)
        if cfg.adapters.embedding == "full":
            extra = {"modules_to_save": modules, "ensure_weight_tying": tied}
        else:
            targets, extra = targets + modules, {"ensure_weight_tying": tied}
    return LoraConfig(r=cfg.adapters.r, lora_alpha=cfg.adapters.alpha, lora_dropout=0.0, bias="none",
                      target_modules=targets, init_lora_weights=True, **extra)


def train_one(cfg: Config, shards, base_path: str, name: str, weights: dict, seeds: tuple[int, int], lr: float,
              device: torch.device = torch.device("cpu")) -> dict:
    """One LoRA adapter (adapters.kind: full: one fully fine-tuned component model) on `base_path`
    trained on mixture `weights`; returns the model and stats."""
    init_seed, seed = seeds
    model = on_device(load_checkpoint(base_path), cfg.model, device)
    full = cfg.adapters.kind == "full"
    if not full:
        torch.manual_seed(init_seed)  # LoRA's A is drawn from torch's global RNG
        model = get_peft_model(model, lora_config(cfg, model))
    sampler = MixtureSampler(shards.train, Mixture.from_dict(weights, shards.domains), shards.seq_len, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.adapters.weight_decay)
    model.train()
    losses = []
    for _ in range(cfg.adapters.steps):
        batch, _ = sampler.next_batch(cfg.adapters.batch_size)
        losses.append(optimizer_step(model, opt, None, lm_loss(model, torch.as_tensor(batch, device=device))))
    return {"model": model, "first_loss": losses[0], "final_loss": float(np.mean(losses[-5:])),
            "drawn": sampler.segment_fractions(), "n_params": n_params(model if full else model.get_base_model()),
            "tokens": adapter_tokens(cfg, shards.seq_len)}


def save_component(model, out_dir: str) -> None:
    """A full component as a HF model dir (config.json + model.safetensors, tied weights once).
    Not save_pretrained: under Ray Train's process group it writes on rank 0 only, and here every
    rank trains components of its own."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    model.config.save_pretrained(out_dir)
    save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def _base_relative_to_run(adapter_dir: str, base_path: str, run_dir: str) -> None:
    """adapter_config.json names its base checkpoint relative to the run dir (main/round_k), so the
    run dir can move: from inside it, AutoPeftModelForCausalLM.from_pretrained(<adapter dir>) loads."""
    conf_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(conf_path) as f:
        conf = json.load(f)
    conf["base_model_name_or_path"] = os.path.relpath(base_path, run_dir)
    with open(conf_path, "w") as f:
        json.dump(conf, f, indent=2)


def adapter_loop(loop_cfg: dict) -> None:
    """Ray Train worker loop: rank r trains its share of the plan and reports them as one checkpoint."""
    cfg: Config = loop_cfg["config"]
    shards = ray.get(loop_cfg["shards_ref"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_threads(cfg.placement.adapter_cpus)
    device = worker_device(cfg, cfg.placement.adapter_gpus)
    with tempfile.TemporaryDirectory() as tmp:
        for name, weights in loop_cfg["plan"][rank::world]:
            t0 = time.time()
            seeds = adapter_seeds(cfg, loop_cfg["round"], name)
            out = train_one(cfg, shards, loop_cfg["base_path"], name, weights, seeds, loop_cfg["lr"], device)
            out_dir = os.path.join(tmp, name)
            model = out.pop("model")
            if cfg.adapters.kind == "full":
                save_component(model, out_dir)
            else:
                # the base embedding is the round's checkpoint's: not saved again beside its LoRA
                model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
                _base_relative_to_run(out_dir, loop_cfg["base_path"], loop_cfg["run_dir"])
            write_json(os.path.join(out_dir, rundir.ADAPTER_META), {
                "name": name, "probe_mixture": weights, "round": loop_cfg["round"],
                "base_checkpoint": loop_cfg["base_path"], "data_hash": shards.data_hash,
                "tokenizer_hash": shards.tokenizer_hash, "domains": list(shards.domains),
                "wall_s": time.time() - t0, "node_id": ray.get_runtime_context().get_node_id(),
                "lr": loop_cfg["lr"], "init_seed": seeds[0], "data_seed": seeds[1], **out})
            if loop_cfg.get("progress") is not None:  # the driver's progress line: best effort only
                try:
                    loop_cfg["progress"].put_nowait(name)
                except Exception:
                    pass
        ray.train.report({"rank": rank}, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name="adapters")


ADAPTER_NODE_RETRIES = 1  # reruns of a round's adapter job after a node died under it (engine/faults.py)


def _fit_adapters(cfg: Config, shards_ref, base_path: str, plan, round_idx: int, run_dir: str, lr: float):
    from ray.util.queue import Queue
    # each worker puts an adapter's name when it is saved; on the driver's node, which a run never loses
    done = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": on_driver_node()})
    workers = adapter_workers(cfg, len(plan), ray.available_resources())
    trainer = TorchTrainer(
        adapter_loop,
        train_loop_config={"config": cfg, "shards_ref": shards_ref, "plan": plan,
                           "base_path": base_path, "round": round_idx, "lr": lr,
                           "run_dir": run_dir, "progress": done},
        scaling_config=adapter_scaling(cfg, workers), torch_config=adapter_torch_config(),
        # controller_failure_limit: Train's default retries a worker group that cannot start
        # forever, which after a node loss means a hang; one more try, then it is ours to handle.
        run_config=RunConfig(storage_path=run_dir, name=rundir.adapters_job(round_idx),
                             failure_config=FailureConfig(max_failures=0, controller_failure_limit=1)),
    )
    # Off the main thread: from the main thread fit() installs Train's own SIGINT handler, which
    # turns Ctrl-C into a "graceful abort" of this job instead of stopping the run (cli/main.py).
    bar = Progress(f"round {round_idx} adapters", len(plan), "trained")
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="adapter-fit") as pool:
            fit = pool.submit(trainer.fit)
            n = 0
            while True:
                try:
                    result = fit.result(timeout=1.0)
                    break
                except FutureTimeout:
                    pass
                try:
                    got = len(done.get_nowait_batch(done.qsize())) if done.qsize() else 0
                except Exception:  # progress is best effort; the fit's own result decides
                    got = 0
                if got:
                    n += got
                    bar.update(n)
            bar.close()
            return result
    finally:
        try:
            ray.kill(done.actor)
        except Exception:
            pass


def train_adapters(cfg: Config, shards_ref, base_path: str, current: Mixture, round_idx: int,
                   run_dir: str, main_lr_now: float | None = None,
                   affected: list[str] | None = None) -> dict[str, str]:
    """Train the round's adapters on `base_path`; return {adapter name: adapter dir}. If a Ray node
    dies under the job, it is rerun from scratch on the nodes left (ADAPTER_NODE_RETRIES times).
    main_lr_now: the main run's lr at the checkpoint (adapters.lr_schedule: current); affected: see
    adapter_plan."""
    plan = adapter_plan(current, cfg, affected)
    lr = adapter_lr(cfg, main_lr_now)
    for attempt in range(ADAPTER_NODE_RETRIES + 1):
        nodes = alive_nodes()
        try:  # Train V2 raises from fit(); result.error is the V1 way
            result = _fit_adapters(cfg, shards_ref, base_path, plan, round_idx, run_dir, lr)
            if result.error:
                raise result.error
            break
        except Exception:
            lost = lost_since(nodes)
            if not lost or attempt == ADAPTER_NODE_RETRIES:
                raise
        say(f"round {round_idx}: node(s) {sorted(n[:12] for n in lost)} died under the adapter job; "
            "rerunning it on the nodes left")
        shutil.rmtree(os.path.join(run_dir, rundir.adapters_job(round_idx)), ignore_errors=True)
    root = result.checkpoint.path
    dirs = {name: os.path.join(root, name) for name, _ in plan}
    weights_file = "model.safetensors" if cfg.adapters.kind == "full" else "adapter_model.safetensors"
    missing = [n for n, p in dirs.items() if not os.path.isfile(os.path.join(p, weights_file))]
    if missing:
        raise RuntimeError(f"adapters {missing} missing from {root} after training (fix: check the "
                           "adapter job's logs under /tmp/ray/, or the Ray temp dir you set)")
    return dirs
