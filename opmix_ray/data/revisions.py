"""A data dir for domain splits and revisions: the bundled domains plus three derived from them.

    python -m opmix_ray.data.revisions --out continual_runs/mixed_data      # seconds

A continual schedule that splits or revises a domain needs the parts and the new version as
domains of their own (opmix_ray/configs/continual_mixed.yaml uses these):

| domain    | made from | how                                                                  |
|-----------|-----------|----------------------------------------------------------------------|
| bible_ot  | bible     | the Old Testament chapters (a partition of bible by testament)       |
| bible_nt  | bible     | the New Testament chapters                                           |
| python_v2 | python    | every file with its comment lines removed (a re-processed version)   |

The six bundled parquet files are copied byte for byte. Every output's sha256 goes into
revisions.json; `ensure_built` builds a dir that has none and verifies one that has. The parts of
bible share documents with bible itself, so a model trained on bible has seen some of the parts'
held-out windows; every method of a benchmark meets the same overlap.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from opmix_ray.data.build import open_built
from opmix_ray.data.shards import BUNDLED_DIR, DataError
from opmix_ray.storage import atomic_write, sha256_file

MANIFEST = "revisions.json"
FORMAT = "opmix-revisions/1"  # bumped whenever the same sources build different files
# Books of the New Testament as the bundled bible names them on each chapter's first line.
NEW_TESTAMENT = ("Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians",
                 "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians",
                 "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter",
                 "1 John", "2 John", "3 John", "Jude", "Revelation")
DERIVED = {"bible_ot": "bible", "bible_nt": "bible", "python_v2": "python"}


def _book(chapter: str) -> str:
    """'1 Corinthians 13' -> '1 Corinthians' (the first line of a chapter is '<book> <n>')."""
    return chapter.lstrip().split("\n", 1)[0].rsplit(" ", 1)[0].strip()


def _uncommented(source: str) -> str:
    return "\n".join(line for line in source.split("\n") if not line.lstrip().startswith("#"))


def derive(name: str, docs: list[str]) -> list[str]:
    if name == "bible_ot":
        return [d for d in docs if _book(d) not in NEW_TESTAMENT]
    if name == "bible_nt":
        return [d for d in docs if _book(d) in NEW_TESTAMENT]
    if name == "python_v2":
        return [t for t in (_uncommented(d) for d in docs) if t.strip()]
    raise KeyError(name)



def build_revisions(out_dir: str | Path, src_dir: str | Path | None = None) -> dict:
    src, out = Path(src_dir) if src_dir else BUNDLED_DIR, Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    man = {"format": FORMAT, "copied": {}, "derived": {}}
    for f in sorted(src.glob("*.parquet")):
        atomic_write(out / f.name, lambda tmp, f=f: shutil.copyfile(f, tmp))
        man["copied"][f.stem] = sha256_file(out / f.name)
    for name, parent in DERIVED.items():
        docs = derive(name, pq.read_table(src / f"{parent}.parquet")["text"].to_pylist())
        if not docs:
            raise DataError(f"revisions: {src / (parent + '.parquet')} gives no documents for {name}")
        table = pa.table({"text": pa.array(docs, type=pa.large_string())})
        atomic_write(out / f"{name}.parquet", lambda tmp, t=table: pq.write_table(t, tmp, compression="zstd"))
        man["derived"][name] = {"from": parent, "n_docs": len(docs), "sha256": sha256_file(out / f"{name}.parquet")}
    if (src / "tokenizer.json").is_file():
        atomic_write(out / "tokenizer.json", lambda tmp: shutil.copyfile(src / "tokenizer.json", tmp))
    text = json.dumps(man, indent=1).encode()
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_bytes(text))
    return man


def ensure_built(data_dir: str | None) -> dict:
    """The manifest of data_dir, building it first when it has none; checks every sha256."""
    return open_built(data_dir, MANIFEST, FORMAT, build_revisions, lambda man: {
        f"{d}.parquet": sha for d, sha in {**man["copied"], **{d: r["sha256"] for d, r in man["derived"].items()}}.items()},
        "data.build_revisions", "rebuild with `python -m opmix_ray.data.revisions --out` into a new dir",
        refuse_foreign=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opmix_ray.data.revisions", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output dir (the bundled domains and the derived ones)")
    args = p.parse_args(argv)
    man = build_revisions(args.out)
    for d, r in man["derived"].items():
        print(f"{d}: {r['n_docs']} docs from {r['from']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
