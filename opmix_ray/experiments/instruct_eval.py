"""Exact match and answer loss of a checkpoint on the instruction tasks (opmix_ray/data/instruct.py).

    sets = load_sets(data_dir, tok, eos, shards.train)        # held-out + trained sample per task
    scores = evaluate_checkpoint("continual_runs/instruct/stage_1/naive", sets, tok, eos)

The model sees <eos> + prompt: in training every example follows the previous one's <eos>.
- exact match (em): greedy decoding until <eos>, a newline or max_new tokens; the decoded text and
  the answer are compared after collapsing whitespace and casefolding.
- answer loss: teacher-forced NLL of the answer span's tokens plus the closing <eos> (knowing where
  the answer stops is part of it), averaged over every such token of the set.
Two samples per task: "heldout" (from documents no training data contains) and "trained" (examples
verified to be in the run's training stream, so their loss measures retention, the forgetting
signal). A batch holds prompts of one length, so nothing is padded on the left and no attention
mask or position ids can go wrong; results are deterministic on a given machine.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from opmix_ray.data.instruct import EVAL_FILE, MANIFEST


def _in_stream(ids: list[int], stream: np.ndarray, eos: int) -> bool:
    """Is <eos> ids <eos> a whole document of the token stream (on token, not byte, boundaries)?"""
    hay = np.concatenate([np.asarray([eos], stream.dtype), stream]).tobytes()
    needle = np.asarray([eos, *ids, eos], stream.dtype).tobytes()
    at = hay.find(needle)
    while at >= 0 and at % stream.dtype.itemsize:
        at = hay.find(needle, at + 1)
    return at >= 0


def load_sets(data_dir, tok, eos: int, train: dict[str, np.ndarray], n_trained: int = 200) -> dict:
    """{task: {"heldout": [(prompt, answer)], "trained": [...]}} for the tasks among train's domains;
    "trained" is the first n_trained candidates that really are in the task's training stream
    (the shards hold out a few whole examples for the val loss)."""
    blob = json.loads((Path(data_dir) / EVAL_FILE).read_text())["tasks"]
    sets = {}
    for task, s in blob.items():
        if task not in train:
            continue
        ok = [(p, a) for p, a in s["trained_candidates"] if _in_stream(tok.encode(p + a).ids, train[task], eos)]
        sets[task] = {"heldout": [tuple(x) for x in s["heldout"]], "trained": ok[:n_trained]}
    return sets


def majority_em(data_dir, sets: dict) -> dict:
    """{task: {split: exact match of always answering the commonest training answer}}: the floor."""
    tasks = json.loads((Path(data_dir) / MANIFEST).read_text())["tasks"]
    return {t: {split: sum(normalise(a) == normalise(tasks[t]["majority_answer"]) for _, a in ex) / max(1, len(ex))
                for split, ex in s.items()} for t, s in sets.items()}


def normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def _greedy(model, x: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps] greedy continuations, feeding one token at a time through the KV cache."""
    out = model(input_ids=x, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    gen = [nxt]
    for _ in range(steps - 1):
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        gen.append(nxt)
    return torch.cat(gen, dim=1)


def _answer_nll(model, x: torch.Tensor, answers: list[list[int]], eos: int) -> torch.Tensor:
    """Sum of NLL over each row's answer tokens + <eos>, given its prompt x (all rows one length)."""
    L, n = x.shape[1], max(len(a) for a in answers) + 1
    tail = torch.full((x.shape[0], n), eos, dtype=torch.long)  # right padding: causal, never seen by the span
    mask = torch.zeros(x.shape[0], n)
    for i, a in enumerate(answers):
        tail[i, : len(a)] = torch.as_tensor(a)
        mask[i, : len(a) + 1] = 1.0
    seq = torch.cat([x, tail], dim=1)
    logp = torch.log_softmax(model(input_ids=seq[:, :-1]).logits.float()[:, L - 1:], dim=-1)
    nll = -logp.gather(-1, seq[:, L:, None])[..., 0]
    return (nll * mask).sum()


@torch.no_grad()
def score(model, tok, eos: int, examples: list[tuple[str, str]], batch_size: int = 64) -> dict:
    """{"em", "answer_loss", "n"} of one example set."""
    enc = [([eos, *tok.encode(p).ids], tok.encode(a).ids) for p, a in examples]
    by_len: dict[int, list[int]] = {}
    for i, (p, _) in enumerate(enc):
        by_len.setdefault(len(p), []).append(i)
    hits, nll, n_tok = 0, 0.0, 0
    for _, idx in sorted(by_len.items()):
        for b in range(0, len(idx), batch_size):
            rows = idx[b : b + batch_size]
            x = torch.as_tensor([enc[i][0] for i in rows])
            answers = [enc[i][1] for i in rows]
            # two spare tokens: a right answer spelt with different tokens still fits
            gen = _greedy(model, x, max(len(a) for a in answers) + 2).tolist()
            for i, g in zip(rows, gen):
                g = g[: g.index(eos)] if eos in g else g
                text = tok.decode(g).split("\n")[0]
                hits += normalise(text) == normalise(examples[i][1])
            nll += float(_answer_nll(model, x, answers, eos))
            n_tok += sum(len(a) + 1 for a in answers)
    return {"em": hits / max(1, len(examples)), "answer_loss": nll / max(1, n_tok), "n": len(examples)}


def evaluate(model, sets: dict, tok, eos: int) -> dict:
    """{task: {"heldout": score, "trained": score}} for every task in sets."""
    was = model.training
    model.eval()
    out = {t: {split: score(model, tok, eos, ex) for split, ex in s.items()} for t, s in sets.items()}
    model.train(was)
    return out


def evaluate_checkpoint(path, sets: dict, tok, eos: int, threads: int = 1) -> dict:
    """evaluate() on an HF checkpoint dir, in `threads` torch threads: the continual driver shares the
    cores with Ray's workers, and two threads under contention measured 1.7x slower than one."""
    from opmix_ray.model import load_checkpoint
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return evaluate(load_checkpoint(path), sets, tok, eos)
    finally:
        torch.set_num_threads(before)


def markdown(rows: list[dict], tasks: list[str], majority: dict | None = None) -> str:
    """Tables for results.md: the final stage per method (and the majority-answer floor), then every stage."""
    def cell(r, t, what):
        s = r.get("instruct", {}).get(t)
        if not s:
            return "-"
        if what == "em":
            return f"{s['heldout']['em']:.3f} / {s['trained']['em']:.3f}"
        return f"{s['heldout']['answer_loss']:.3f} / {s['trained']['answer_loss']:.3f}"

    last = max(r["stage"] for r in rows)
    final = [r for r in rows if r["stage"] == last]
    head = "| method | " + " | ".join(f"{t} EM | {t} answer loss" for t in tasks) + " |"
    title = ("Instruction tasks after the last stage: held-out / trained-sample (exact match, higher is "
             "better; answer loss in nats/token, lower is better):")
    lines = [title, "", head, "|" + "---|" * (2 * len(tasks) + 1)]
    for r in final:
        cells = (f"{cell(r, t, 'em')} | {cell(r, t, 'loss')}" for t in tasks)
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    if majority:
        lines.append("| (majority answer) | " + " | ".join(
            f"{majority[t]['heldout']:.3f} / {majority[t]['trained']:.3f} | -" for t in tasks) + " |")
    lines += ["", "Exact match held-out / trained-sample after every stage (stage 0: before any task, zero-shot):",
              "", "| method | stage | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 2)]
    for r in sorted(rows, key=lambda r: (r["method"], r["stage"])):
        lines.append(f"| {r['method']} | {r['stage']} | " + " | ".join(cell(r, t, "em") for t in tasks) + " |")
    return "\n".join(lines) + "\n"
