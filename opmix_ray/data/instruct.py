"""Instruction tasks built deterministically from the bundled corpus (continual instruction tuning).

    python -m opmix_ray.data.instruct --out DIR      # a few seconds; same bytes every time

Each task is a domain whose documents are single examples, prompt + answer span: the prompt ends
with the delimiter "\\nAnswer:", the span starts with a space and is at most 5 tokens.

| task      | source     | example                                                             | answers            |
|-----------|------------|---------------------------------------------------------------------|--------------------|
| dict_pos  | dictionary | "Part of speech of: Slender\\nAnswer: a."                           | n. or a., balanced |
| bible_end | bible      | "Finish the verse: And the LORD spake unto Moses,\\nAnswer: saying" | 40 commonest words |
| py_doc    | python     | "First docstring word of: get_loop\\nAnswer: Return"                | any word           |

The answers were chosen so that the demo's 1.4M-parameter model learns something beyond the
majority answer within ~100 CPU steps (docstring -> function name and verse -> book did not).
Held-out examples come from whole source documents (a chapter, a group of dictionary entries, a
source file) that are removed from everything written. A held-out example is also dropped when a
training document gives it away (its verse, or its headword's entry line, occurs in one) or its
prompt is a training example, and a prompt with two different answers is dropped everywhere.
DIR gets the raw domains without the held-out documents (stage 0 pretrains on them), one parquet
per task, instruct_eval.json (the held-out examples and candidates for the trained sample) and
instruct.json (formats, counts, the majority-answer baseline, the sha256 of every file).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from opmix_ray.data.build import open_built
from opmix_ray.data.shards import BUNDLED_DIR, DataError, load_tokenizer
from opmix_ray.storage import atomic_write, sha256_file

DELIM = "\nAnswer:"
MANIFEST, EVAL_FILE = "instruct.json", "instruct_eval.json"
FORMAT = "opmix-instruct/2"  # bumped whenever the same arguments build different files
MAX_ANSWER_TOKENS = 5  # short answers: a ~1M-param model can get some of them exactly right
MAX_PROMPT_TOKENS = 48


def _dict_pos(doc: str) -> list[tuple[str, str]]:
    # Entry heads sit at column 0, "Hereditary, a. [L. ...]". Only the five common parts of speech
    # (TASKS keeps two), and only when nothing else follows the tag ("Auric, a. & n." is skipped).
    pat = re.compile(r"^([A-Z][a-z'-]+), (n\.|a\.|v\. t\.|v\. i\.|adv\.)(?: *$| +[\[(])", re.MULTILINE)
    return [(m[1], m[2]) for m in pat.finditer(doc)]


def _verses(doc: str) -> list[str]:
    # a chapter: "Song of Solomon 3", then one verse per line, "16 For God so loved ..."
    verses = (re.match(r"\d+ (.+)", ln) for ln in doc.split("\n")[1:])
    return [v[1] for v in verses if v and 20 <= len(v[1]) <= 160]


def _bible_end(doc: str) -> list[tuple[str, str]]:
    # the verse without its last word -> that word (punctuation after it dropped)
    ends = (re.fullmatch(r"(.*\S)\s+([A-Za-z]+)[.,;:!?']*", v) for v in _verses(doc))
    return [(m[1], m[2]) for m in ends if m]


_DEF = re.compile(r"\s*(?:async\s+)?def\s+(\w+)\s*\(")
_DOC = re.compile(r"""\s*[rRuU]?("{3}|'{3})\s*(.*)$""")


def _py_doc(doc: str) -> list[tuple[str, str]]:
    # function name -> first word of its docstring. Line-based, not ast: most bundled python
    # documents are 8 KB chunks that do not parse.
    lines, out = doc.split("\n"), []
    for i, line in enumerate(lines):
        m = _DEF.match(line)
        j = next((j for j in range(i, min(i + 6, len(lines))) if lines[j].rstrip().endswith(":")), None) if m else None
        d = _DOC.match(lines[j + 1]) if j is not None and j + 1 < len(lines) else None
        first = d and (d[2] or (lines[j + 2] if j + 2 < len(lines) else ""))
        word = first and re.match(r"\s*([A-Za-z]+)\b", first)
        if word:
            out.append((m[1], word[1]))
    return out


class TaskSpec(NamedTuple):
    source: str  # bundled domain the examples come from
    instruction: str  # the prompt is f"{instruction}: {question}{DELIM}"
    extract: Callable[[str], list[tuple[str, str]]]  # document -> [(question, answer)]
    what: str
    # text that gives a held-out answer away if any training document contains it; None: a training
    # example with the same prompt is the only give-away (checked for every task)
    fact: str | None = "{q}"
    answers: int | None = None  # keep only the examples of the N answers most common in training
    balanced: bool = False  # as many examples of each answer (so the majority answer is 1/N)


TASKS: dict[str, TaskSpec] = {
    "dict_pos": TaskSpec("dictionary", "Part of speech of", _dict_pos,
                         "Webster headword -> noun or adjective (n. or a., balanced)", "\n{q},{a}", 2, True),
    "bible_end": TaskSpec("bible", "Finish the verse", _bible_end,
                          "KJV verse (20-160 chars) without its last word -> that word (one of the 40 "
                          "commonest last words)", "{q}{a}", 40),
    "py_doc": TaskSpec("python", "First docstring word of", _py_doc,
                       "stdlib function name -> the first word of its docstring", None),
}


def example(task: str, question: str, answer: str) -> tuple[str, str]:
    """(prompt, answer span); the document is prompt + answer span, the span starts with a space."""
    return f"{TASKS[task].instruction}: {question}{DELIM}", f" {answer}"


def _pairs(task: str, doc: str, tok) -> set[tuple[str, str]]:
    """(prompt, answer) pairs of one document whose answer tokens are exactly the tail of the example's."""
    out = set()
    for q, a in TASKS[task].extract(doc):
        p, s = example(task, q, a)
        pi, si = tok.encode(p).ids, tok.encode(s).ids
        # the answer span must tokenize the same alone and after its prompt, or its loss is ill-defined
        if len(si) <= MAX_ANSWER_TOKENS and len(pi) <= MAX_PROMPT_TOKENS and tok.encode(p + s).ids == pi + si:
            out.add((p, s))
    return out


def _given_away(task: str, prompt: str, span: str, raw: str) -> bool:
    spec = TASKS[task]
    return spec.fact is not None and spec.fact.format(q=prompt[len(spec.instruction) + 2: -len(DELIM)], a=span) in raw


def _draw(pairs: list, n: int, per_answer: int, rng: random.Random) -> list:
    """Up to n pairs, at most per_answer of them with one answer, in a seeded order. Shuffled again
    after the cap: in draw order the common answers come first (they fill up before the cap bites),
    and the trained sample is a prefix of this list."""
    out, used = [], Counter()
    for p, s in rng.sample(pairs, len(pairs)):
        if used[s] < per_answer and len(out) < n:
            out.append((p, s))
            used[s] += 1
    return rng.sample(out, len(out))


def _split_task(task: str, docs: list[str], tok, n_eval: int, max_train: int, seed: int):
    """Hold out whole documents, in a seeded order, until n_eval clean held-out examples exist.
    Returns (held-out doc ids, train examples in shuffled order, held-out examples)."""
    spec, rng = TASKS[task], random.Random(f"{seed}:{task}")
    order = rng.sample(range(len(docs)), len(docs))
    per_doc = [_pairs(task, d, tok) for d in docs]
    for k in range(1, len(docs)):
        held = set(order[:k])
        train = sorted(set().union(*(x for i, x in enumerate(per_doc) if i not in held)))
        ev = sorted(set().union(*(per_doc[i] for i in held)))
        answers: dict[str, set] = {}
        for p, s in train + ev:
            answers.setdefault(p, set()).add(s)
        counts = Counter(s for p, s in train if len(answers[p]) == 1)
        keep = set(sorted(counts, key=lambda s: (-counts[s], s))[: spec.answers]) if spec.answers else set(counts)
        train = [(p, s) for p, s in train if len(answers[p]) == 1 and s in keep]
        in_train = {p for p, _ in train} | {p for p, s in answers.items() if len(s) > 1}
        raw = "\n" + "\n".join(d for i, d in enumerate(docs) if i not in held)
        ev = [(p, s) for p, s in ev if p not in in_train and (s in keep or not spec.answers)
              and not _given_away(task, p, s, raw)]
        per_eval = -(-n_eval // len(keep)) if spec.balanced else n_eval
        if sum(min(c, per_eval) for c in Counter(s for _, s in ev).values()) >= n_eval:
            per_train = min(counts[s] for s in keep) if spec.balanced else max_train
            return held, _draw(train, max_train, per_train, rng), _draw(ev, n_eval, per_eval, rng)
    raise DataError(f"instruct: task {task} has fewer than {n_eval} clean held-out examples "
                    "(fix: lower --n-eval)")



def _write_parquet(path: Path, texts: list[str]) -> str:
    table = pa.table({"text": pa.array(texts, type=pa.large_string())})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return sha256_file(path)


def build_instruct(out_dir, seed: int = 0, n_eval: int = 200, max_train: int = 3000, n_trained: int = 250,
                   src_dir: str | Path | None = None) -> dict:
    """Write the raw domains (held-out documents removed), one parquet per task, instruct_eval.json
    and instruct.json into out_dir; return the manifest."""
    src, out = Path(src_dir) if src_dir else BUNDLED_DIR, Path(out_dir)
    tok, tok_sha = load_tokenizer(src / "tokenizer.json")
    man = {"format": FORMAT, "seed": seed, "delimiter": DELIM, "tokenizer_sha256": tok_sha,
           "max_answer_tokens": MAX_ANSWER_TOKENS, "raw": {}, "tasks": {}}
    evals = {}
    for task, spec in TASKS.items():
        docs = pq.read_table(src / f"{spec.source}.parquet")["text"].to_pylist()
        held, train, ev = _split_task(task, docs, tok, n_eval, max_train, seed)
        raw = [d for i, d in enumerate(docs) if i not in held]
        man["raw"][spec.source] = {"n_docs": len(raw), "n_docs_held_out": len(held),
                                   "source_sha256": sha256_file(src / f"{spec.source}.parquet"),
                                   "sha256": _write_parquet(out / f"{spec.source}.parquet", raw)}
        top, n_top = Counter(s for _, s in train).most_common(1)[0]
        man["tasks"][task] = {
            "source": spec.source, "what": spec.what, "prompt": f"{spec.instruction}: {{question}}{DELIM}",
            "answer": " {answer}", "n_train": len(train), "n_heldout": len(ev), "n_trained_candidates": n_trained,
            "majority_answer": top.strip(), "majority_share_train": round(n_top / len(train), 4),
            "majority_em_heldout": round(sum(s == top for _, s in ev) / len(ev), 4),
            "sha256": _write_parquet(out / f"{task}.parquet", [p + s for p, s in train])}
        # candidates in the parquet's own order; instruct_eval keeps those the run really trained on
        evals[task] = {"heldout": [list(x) for x in ev], "trained_candidates": [list(x) for x in train[:n_trained]]}
    blob = json.dumps({"format": FORMAT, "tasks": evals}, indent=1, ensure_ascii=False).encode()
    atomic_write(out / EVAL_FILE, lambda tmp: Path(tmp).write_bytes(blob))
    man["eval_file"], man["eval_sha256"] = EVAL_FILE, sha256_file(out / EVAL_FILE)
    text = json.dumps(man, indent=1, ensure_ascii=False).encode()
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_bytes(text))
    return man


def ensure_built(data_dir: str | None) -> dict:
    """The manifest of data_dir, building the tasks there first if it has none; checks every sha256."""
    return open_built(data_dir, MANIFEST, FORMAT, build_instruct, lambda man: {
        **{f"{d}.parquet": r["sha256"] for d, r in man["raw"].items()},
        **{f"{t}.parquet": r["sha256"] for t, r in man["tasks"].items()}, EVAL_FILE: man["eval_sha256"]},
        "schedule.instruct_eval", "rebuild with `python -m opmix_ray.data.instruct --out` into a new dir")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opmix_ray.data.instruct", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output dir (raw domains, task domains, manifest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=200, help="held-out examples per task")
    p.add_argument("--max-train", type=int, default=3000, help="training examples per task, at most")
    p.add_argument("--n-trained", type=int, default=250, help="candidates for the trained-example sample")
    p.add_argument("--src", help="dir with the source domains and tokenizer.json (default: the bundled corpus)")
    a = p.parse_args(argv)
    try:
        man = build_instruct(a.out, a.seed, a.n_eval, a.max_train, a.n_trained, a.src)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for t, r in man["tasks"].items():
        print(f"{t:11s} {r['n_train']:5d} train {r['n_heldout']:4d} held-out  majority '{r['majority_answer']}' "
              f"= {r['majority_em_heldout']:.2f} of held-out")
    print(f"wrote {Path(a.out) / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
