"""Your Ray Train loop on 2 workers, with OP-Mix choosing what it trains on (docs/own_trainer.md).

    python examples/ray_train_loop.py                     # the bundled corpus, a 1.4M-parameter Llama, 2 rounds
    python examples/ray_train_loop.py --resume DIR        # go on from a checkpoint this script reported
    python examples/ray_train_loop.py --rule argmin       # push the search's best candidate, however small its lead

Yours, as in any train_loop_per_worker: the model (DDP through prepare_model), AdamW, a cosine
schedule, the loss, and the checkpoints (weights, optimizer and schedule with torch.save, through
ray.train.report). What OP-Mix adds: the OpMix object in the loop config, a sampler and an
OpMixLoop on every rank, `loop.before_step` once per step and `loop.rows()` for this rank's rows,
and the loop's state in your checkpoint. Rank 0 calls out at a boundary; every rank switches at the
same step.
"""
import argparse
import json
import math
import os
import tempfile
import time

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from transformers import LlamaConfig, LlamaForCausalLM

from opmix_ray import OpMix, OpMixLoop
from opmix_ray.report import load_run, mixture_table

SEQ_LEN, BATCH, WORKERS = 128, 16, 2
CONFIG = {
    "run": {"name": "ray_train_loop", "storage_path": "./opmix_runs", "seed": 0},
    "data": {"seq_len": SEQ_LEN, "val_tokens_per_domain": 4096, "selection_tokens_per_domain": 4096},  # bundled corpus
    "main": {"num_workers": WORKERS, "batch_size": BATCH},  # only so local Ray counts your workers' CPUs
    "rounds": {"uniform_prefix": 0.25, "num_rounds": 2},
    "adapters": {"r": 16, "alpha": 32, "steps": 12, "batch_size": 16},
    "search": {"searcher": "optuna-tpe", "num_samples": 12, "max_concurrent": 2, "eval_tokens_per_domain": 2048},
}


def train_loop(config: dict) -> None:
    opmix, total = config["opmix"], config["opmix"].total_steps
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=opmix.shards.vocab_size, hidden_size=128, intermediate_size=384,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=SEQ_LEN, tie_word_embeddings=True))
    model = ray.train.torch.prepare_model(model)
    plain = getattr(model, "module", model)  # DDP's wrapped module: what is saved and loaded
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    cosine = lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / total)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    sampler = opmix.sampler()                       # the same seed on every rank: one global batch
    loop = OpMixLoop(opmix, sampler)
    start = 0
    # Ray Train's own restore after a failure, else the checkpoint --resume names (Ray 2.60
    # deprecates TorchTrainer(resume_from_checkpoint=...) in favour of this)
    ckpt = ray.train.get_checkpoint() or config.get("resume_from")
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "train.pt"), weights_only=True)
            plain.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            with open(os.path.join(d, "opmix.json")) as f:
                loop.load_state_dict(json.load(f))
            start = state["step"]
    rank = ray.train.get_context().get_world_rank()
    for step in range(start, total):
        loop.before_step(step, model, lr=sched.get_last_lr()[0])  # rank 0 runs a round at a boundary
        (rows,) = loop.rows()                                     # this rank's half of the global batch
        x = torch.as_tensor(rows)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0 and step % 40 == 0:
            print(f"step {step}: loss {loss.item():.3f} on {sampler.mixture}", flush=True)
        if (step + 1) % config["save_every"] == 0 or step + 1 == total:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save({"model": plain.state_dict(), "opt": opt.state_dict(),
                                "sched": sched.state_dict(), "step": step + 1}, os.path.join(d, "train.pt"))
                    with open(os.path.join(d, "opmix.json"), "w") as f:
                        json.dump(loop.state_dict(), f)  # the sampler and the rounds: the same on every rank
                ray.train.report({"step": step + 1, "loss": loss.item()},
                                 checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)
    loop.finish()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=240, help="optimizer steps")
    ap.add_argument("--resume", default=None, help="a checkpoint dir this script reported")
    ap.add_argument("--rule", choices=["safe", "argmin"], default="safe", help="decision.rule")
    args = ap.parse_args()
    t0 = time.time()
    opmix = OpMix({**CONFIG, "decision": {"rule": args.rule}}, total_steps=args.steps)  # starts local Ray
    print(f"domains {list(opmix.domains)}; rounds at steps {opmix.boundaries}; run dir {opmix.run_dir}")
    trainer = TorchTrainer(
        train_loop, train_loop_config={"opmix": opmix, "save_every": 60,
                                       "resume_from": Checkpoint.from_directory(args.resume) if args.resume else None},
        scaling_config=ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=os.path.abspath("./opmix_runs/ray_train_loop_out"), name="train"))
    result = trainer.fit()
    history, _ = load_run(opmix.run_dir)
    print(f"\nthe mixture per round (weights over tokens), {time.time() - t0:.0f} s in all; last checkpoint "
          f"{result.checkpoint.path if result.checkpoint else None}:")
    print(mixture_table(history))
    for r in history["rounds"]:
        where = f"from step {r['applied_step']}" if r.get("applied_step") is not None else "kept"
        print(f"round {r['round']} at step {r['step']}: {where}; {r['decision']['reason']}")


if __name__ == "__main__":
    main()
