"""Artifact writes: every file appears whole or not at all (temp file beside it, then rename)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_yaml(path: str | Path, obj) -> None:
    atomic_write_bytes(path, yaml.safe_dump(obj, sort_keys=False).encode())


def write_parquet(path: str | Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))  # union of keys, first-seen order
    table = pa.table({k: [r.get(k) for r in rows] for k in keys})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())
