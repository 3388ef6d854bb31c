"""Your Hugging Face Trainer, with OP-Mix choosing what it trains on (docs/own_trainer.md).

    python examples/hf_trainer.py                  # the bundled corpus, a 1.4M-parameter Llama, 2 rounds
    python examples/hf_trainer.py --resume         # go on from the Trainer's last checkpoint
    python examples/hf_trainer.py --rule argmin    # push the search's best candidate, however small its lead

Yours, as in any Trainer script: the model, TrainingArguments (the Trainer's own AdamW, cosine
schedule, logging and checkpoints). What OP-Mix adds: the OpMix object, the sampler the Trainer
trains on, and the callback. At each boundary a round runs on local Ray on the model as it is
then; its decision is printed and pushed into the sampler. At the end the mixture per round is
printed as `opmix-ray results RUN_DIR` prints it.
"""
import argparse
import time

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from opmix_ray import OpMix, OpMixCallback
from opmix_ray.report import load_run, mixture_table

SEQ_LEN, BATCH = 128, 16
# The OP-Mix side only: where the data is, how rounds are placed, and how a round searches. Your
# training settings are in TrainingArguments below; main.* is not read by a trainer of your own.
CONFIG = {
    "run": {"name": "hf_trainer", "storage_path": "./opmix_runs", "seed": 0},
    "data": {"seq_len": SEQ_LEN, "val_tokens_per_domain": 4096, "selection_tokens_per_domain": 4096},  # bundled corpus
    "rounds": {"uniform_prefix": 0.25, "num_rounds": 2},
    "adapters": {"r": 16, "alpha": 32, "steps": 12, "batch_size": 16},
    "search": {"searcher": "optuna-tpe", "num_samples": 12, "max_concurrent": 2, "eval_tokens_per_domain": 2048},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=240, help="optimizer steps of the Trainer")
    ap.add_argument("--out", default="./opmix_runs/hf_trainer_out", help="the Trainer's output_dir")
    ap.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    ap.add_argument("--rule", choices=["safe", "argmin"], default="safe", help="decision.rule")
    args = ap.parse_args()
    t0 = time.time()

    opmix = OpMix({**CONFIG, "decision": {"rule": args.rule}}, total_steps=args.steps, batch_size=BATCH)
    sampler = opmix.sampler()  # a torch IterableDataset: one {"input_ids", "labels"} window per item
    print(f"domains {list(opmix.domains)}; rounds at steps {opmix.boundaries}; run dir {opmix.run_dir}")

    # your model: a 1.4M-parameter Llama over the bundled corpus's 4096-token vocabulary
    model = LlamaForCausalLM(LlamaConfig(vocab_size=opmix.shards.vocab_size, hidden_size=128, intermediate_size=384,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=SEQ_LEN + 1, tie_word_embeddings=True))
    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=BATCH,
                                 learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=20, weight_decay=0.1,
                                 logging_steps=40, save_steps=60, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=sampler, callbacks=[OpMixCallback(opmix, sampler)])
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    history, _ = load_run(opmix.run_dir)
    print(f"\nthe mixture per round (weights over tokens), {time.time() - t0:.0f} s in all:")
    print(mixture_table(history))
    for r in history["rounds"]:
        where = f"from step {r['applied_step']}" if r.get("applied_step") is not None else "kept"
        print(f"round {r['round']} at step {r['step']}: {where}; {r['decision']['reason']}")


if __name__ == "__main__":
    main()
