"""Memory and candidates/s of the dense and the factored LoRA merge at the SmolLM2-135M shape.

    .venv/bin/python benchmarks/factored_merge.py [--adapters 7] [--rank 16] [--candidates 4]   # ~3 min, 2 cores

Random weights (the shape is what matters): a Llama with SmolLM2-135M's dimensions (hidden 576,
intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab 49152) and `--adapters` random LoRA
adapters of rank `--rank` on every default target module. Each mode runs in its own process, so its
peak RSS is its own: build the stack (dense: k x [out, in] per module; factored: A_cat, B_cat), make
the MergedModel, then time `--candidates` candidates (merge + a forward of 4 windows of 128 tokens;
one warm-up first). Writes benchmarks/results/factored_merge.json and prints one line per mode and
the largest logit difference between the two modes on the same candidate.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
         "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048, "tie_word_embeddings": True}
OUT = Path(__file__).resolve().parent / "results" / "factored_merge.json"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one_mode(mode: str, k: int, r: int, n: int, logits_to: str) -> dict:
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from opmix_ray.config import AdaptersSection
    from opmix_ray.engine.merge import MergedModel, stack_deltas, stack_factors
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    rss_model = _rss_mb()
    targets = AdaptersSection().target_modules
    rng = np.random.default_rng(0)
    factors = []
    for _ in range(k):  # one adapter: {module: (A [r, in], (alpha/r) B [out, r])}
        f = {}
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                out_f, in_f = mod.weight.shape
                f[name] = ((rng.standard_normal((r, in_f)) * 0.02).astype(np.float32),
                           (2.0 * rng.standard_normal((out_f, r)) * 0.02).astype(np.float32))
        factors.append(f)
    t0 = time.perf_counter()
    if mode == "dense":
        stacked = stack_deltas([{m: B @ A for m, (A, B) in f.items()} for f in factors])
    else:
        stacked = stack_factors(factors)
    del factors
    build_s = time.perf_counter() - t0
    stack_bytes = sum(D.nbytes for D in stacked.values())
    mm = MergedModel(model, stacked)
    x = torch.randint(0, SHAPE["vocab_size"], (4, 128), generator=torch.Generator().manual_seed(1))
    w = rng.dirichlet(np.ones(k), size=n + 1)
    times, merge_s = [], []
    with torch.no_grad():
        for i in range(n + 1):
            t = time.perf_counter()
            mm.apply(w[i])
            m_s = time.perf_counter() - t
            logits = model(input_ids=x).logits
            if i == 0:
                np.save(logits_to, logits[:, -8:].numpy())  # same candidate in both modes
            else:
                times.append(time.perf_counter() - t)
                merge_s.append(m_s)
    return {"mode": mode, "adapters": k, "rank": r, "stack_bytes": int(stack_bytes), "build_s": build_s,
            "peak_rss_mb": _rss_mb(), "rss_after_model_mb": rss_model, "candidates_per_s": n / sum(times),
            "merge_ms": 1000 * float(np.mean(merge_s)), "candidate_s": float(np.mean(times))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=7)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--mode", choices=["dense", "factored"], help=argparse.SUPPRESS)  # one child process
    ap.add_argument("--logits", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args.mode, args.adapters, args.rank, args.candidates, args.logits)))
        return 0
    import numpy as np
    rows, t0 = [], time.time()
    for mode in ("dense", "factored"):
        p = subprocess.run([sys.executable, __file__, "--mode", mode, "--adapters", str(args.adapters), "--rank",
                            str(args.rank), "--candidates", str(args.candidates), "--logits", f"/tmp/fm_{mode}.npy"],
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{mode:<9} stack {r['stack_bytes'] / 2**30:.3f} GiB, peak RSS {r['peak_rss_mb'] / 1024:.2f} GiB "
              f"(model alone {r['rss_after_model_mb'] / 1024:.2f}), merge {r['merge_ms']:.1f} ms, "
              f"{r['candidates_per_s']:.3f} candidates/s", flush=True)
    diff = float(np.abs(np.load("/tmp/fm_dense.npy") - np.load("/tmp/fm_factored.npy")).max())
    print(f"largest logit difference, same candidate: {diff:.2e}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"rows": rows, "max_logit_diff": diff, "shape": SHAPE, "wall_s": time.time() - t0,
                               "load_avg": os.getloadavg(), "cpus": os.cpu_count(), "machine": platform.machine(),
                               "command": " ".join(sys.argv)}, indent=1))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
