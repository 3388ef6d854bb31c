"""Where a domain's parquet data lives, and the content hash that names it.

    <data.path>/<name>.parquet           a domain in one file (source hash: sha256 of the file)
    <data.path>/domain=<name>/*.parquet  a hive-partitioned domain: one or more files, nested dirs
                                         allowed; files whose name starts with '.' or '_' (_SUCCESS,
                                         .crc) are skipped

A hive domain's documents are its files' rows concatenated in sorted relative-path order (POSIX
separators, relative to domain=<name>/), and its source hash is

    sha256(b"".join(f"{rel}\\0{file_sha256_hex}\\n".encode() for rel, sha in sorted(pairs)))

so renaming, adding or changing any file changes the hash, while the flat layout keeps the hash
every earlier run recorded. Both readers (data.reader: driver or ray_data) use these rules.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from opmix_ray.errors import DataError

HIVE_KEY = "domain="


def hive_dir(root: Path, name: str) -> Path:
    return root / f"{HIVE_KEY}{name}"


def discover(root: Path) -> list[str]:
    """Every domain name under `root`, sorted: <name>.parquet files and domain=<name>/ dirs."""
    flat = {p.stem for p in root.glob("*.parquet") if p.is_file()}
    hive = {p.name[len(HIVE_KEY):] for p in root.glob(f"{HIVE_KEY}*") if p.is_dir()}
    for name in sorted(flat & hive):
        raise DataError(f"data.path: {root} has both {name}.parquet and {HIVE_KEY}{name}/ (fix: keep one of "
                        "them, or rename one to another domain)")
    return sorted(flat | hive)


def exists(root: Path, name: str) -> bool:
    return (root / f"{name}.parquet").is_file() or hive_dir(root, name).is_dir()


def shown(root: Path, name: str) -> str:
    """The path an error names for domain `name`: the form that exists, else the flat file."""
    return f"{hive_dir(root, name)}/" if hive_dir(root, name).is_dir() else str(root / f"{name}.parquet")


def _skipped(rel: Path) -> bool:
    return any(part.startswith((".", "_")) for part in rel.parts)


def domain_files(root: Path, name: str) -> tuple[list[Path], list[str] | None]:
    """(the domain's files in read order, their relative paths for a hive dir or None for a flat file)."""
    flat, hive = root / f"{name}.parquet", hive_dir(root, name)
    if flat.is_file() and hive.is_dir():
        raise DataError(f"data.path: {root} has both {name}.parquet and {HIVE_KEY}{name}/ (fix: keep one of them)")
    if not hive.is_dir():
        return [flat], None
    rels = sorted(p.relative_to(hive).as_posix() for p in hive.rglob("*.parquet")
                  if p.is_file() and not _skipped(p.relative_to(hive)))
    if not rels:
        raise DataError(f"data.path: {hive}/ holds no .parquet files (fix: put the domain's parquet files "
                        f"in it, or remove the dir)")
    return [hive / r for r in rels], rels


def source_hash(rels: list[str] | None, shas: list[str]) -> str:
    """A domain's source hash from its files' sha256s (same order as domain_files)."""
    if rels is None:
        return shas[0]
    lines = b"".join(f"{r}\0{s}\n".encode() for r, s in sorted(zip(rels, shas)))
    return hashlib.sha256(lines).hexdigest()
