"""data.reader: ray_data: the domains read and tokenized by Ray Data, with the train tokens stored in
the object store by the tasks that build them, so the driver never holds the training corpus.

    from opmix_ray.config import load_config
    from opmix_ray.data.read import build_shards
    shards = build_shards(load_config({"data": {"reader": "ray_data"}}))  # starts Ray if it is not up

Every step runs on the cluster. One task per file checks its column and hashes the file (`_inspect`).
ray.data.read_parquet reads every domain's files in order (preserve_order, with a path column).
map_batches tokenizes with the same encode_batch as the driver reader and tags each row with its
domain's index (`_tokenize`). One task per domain (`_assemble`) gathers that domain's blocks and
splits its whole documents by the same seeded rule (shards.finish_domain). It returns the train
array as an object of its own, so the driver keeps only that ObjectRef (in shards.TrainArrays)
plus the small val and selection windows. The tokens, data_hash and source_hashes are bit-identical
to data.reader: driver's (tests/test_ray_data.py).
"""
from __future__ import annotations

import hashlib
import itertools
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from opmix_ray.config import Config
from opmix_ray.data import layout
from opmix_ray.data.shards import (TokenShards, TrainArrays, open_tokenizer, column_kind, data_hash_of, docs_of,
                                   finish_domain, kinds_agree, no_docs, resolve_data_paths)
from opmix_ray.data.tokenizer import checkpoint_files, eos_token
from opmix_ray.errors import BadInput, DataError
from opmix_ray.ray_init import init_ray
from opmix_ray.storage import sha256_file

_TOKENIZERS: dict[str, object] = {}  # per worker process: a tokenizer is parsed once, not per batch


def _tokenizer(tok_json: str):
    key = hashlib.sha256(tok_json.encode()).hexdigest()
    if key not in _TOKENIZERS:
        from tokenizers import Tokenizer
        _TOKENIZERS[key] = Tokenizer.from_str(tok_json)
    return _TOKENIZERS[key]


@ray.remote
def _inspect(path: str, column: str) -> tuple[bool, str]:
    """(holds token ids, sha256 of the file), on the node that reads the file."""
    return column_kind(Path(path), column), sha256_file(Path(path))


def _tokenize(batch: pa.Table, tok_json: str, files: dict[str, list], column: str) -> pa.Table:
    """One batch of rows -> one row per non-empty document: its domain index and its token ids. Bad
    data becomes one row with d = -1 and the error's message: Ray Data's wrapping of a failed batch
    drops the DataError that names the file and the fix."""
    try:
        tags, docs = _docs(batch, tok_json, files, column)
    except BadInput as exc:
        return pa.table({"d": pa.array([-1], pa.int32()), "ids": pa.array([[]], pa.large_list(pa.int64())),
                         "err": pa.array([str(exc)], pa.string())})
    lens = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    values = np.concatenate(docs) if docs else np.zeros(0, np.int64)
    return pa.table({"d": pa.array(np.asarray(tags, np.int32), pa.int32()),
                     "ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64())),
                     "err": pa.nulls(len(docs), pa.string())})


def _docs(batch: pa.Table, tok_json: str, files: dict[str, list], column: str):
    tok = _tokenizer(tok_json)
    texts, paths = batch.column(column).to_pylist(), batch.column("path").to_pylist()
    tags, docs, start = [], [], 0
    for path, run in itertools.groupby(paths):
        n = len(list(run))
        index, is_ids, shown = files[path]
        got = docs_of(texts[start:start + n], is_ids, Path(shown), column, tok)
        tags += [index] * len(got)
        docs += got
        start += n
    return tags, docs


@ray.remote
def _index(block: pa.Table) -> tuple[list[int], str | None]:
    """(the domain indices a block holds, the first bad-data message in it or None)."""
    errs = block.column("err").drop_null()
    return sorted(set(pc.unique(block.column("d")).to_pylist()) - {-1}), (errs[0].as_py() if len(errs) else None)


@ray.remote(num_returns=2)
def _assemble(cfg: Config, name: str, index: int, vocab_size: int, eos: int, keep_train: bool, *blocks: pa.Table):
    """(train ids, (val windows, selection windows or None, train length)) of domain `index`."""
    docs = []
    for block in blocks:
        ids = block.filter(pc.equal(block.column("d"), index)).column("ids").combine_chunks()
        offsets, values = ids.offsets.to_numpy(), ids.flatten().to_numpy()
        docs += [values[offsets[j]:offsets[j + 1]] for j in range(len(offsets) - 1)]
    tr, va, se = finish_domain(cfg, name, docs, index, vocab_size, eos)
    return (tr if keep_train else tr[:0]), (va, se, len(tr))


@contextmanager
def _one_line_errors():
    """A BadInput raised inside a task reaches the caller as itself, one line, not a task traceback."""
    try:
        yield
    except Exception as exc:
        err, hops = exc, 0
        while err is not None and hops < 20:
            if isinstance(err, ray.exceptions.RayTaskError):  # also the dual class as_instanceof_cause makes
                err = err.cause
            elif isinstance(err, BadInput):
                own = next(c for c in type(err).__mro__ if c.__module__ == BadInput.__module__)
                raise own(str(err.args[0]) if err.args else str(err)) from None
            else:
                err = err.__cause__ or getattr(err, "cause", None)
            hops += 1
        raise


@contextmanager
def _ordered_reads():
    """Datasets made inside keep block order (the split needs each domain's documents in file order)."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def _ensure_ray(cfg: Config) -> None:
    if not ray.is_initialized():
        init_ray(cfg)


def _blocks(cfg: Config, tok_json: str, files: dict[str, list]) -> list:
    """Block refs of the tokenized corpus, each dataset in file order; nothing comes back to the
    driver. Text files and token-id files are read as two datasets: one schema cannot hold both."""
    refs = []
    for is_ids in (False, True):
        group = {k: v for k, v in files.items() if v[1] == is_ids}
        if not group:
            continue
        with _ordered_reads():
            ds = ray.data.read_parquet(list(group), include_paths=True, partitioning=None)
            ds = ds.select_columns([cfg.data.text_column, "path"])
            ds = ds.map_batches(_tokenize, batch_format="pyarrow", zero_copy_batch=True,
                                fn_kwargs={"tok_json": tok_json, "files": group, "column": cfg.data.text_column})
            refs += ds.to_arrow_refs()
    return refs


def _domain_refs(cfg: Config, tok_json: str, files: dict[str, list], vocab_size: int, eos: int,
                 doms: list[tuple[str, int, str, bool]]) -> dict:
    """Tokenize `files` and assemble each of doms = (name, index, where it is shown, keep its train
    ids): {name: (train ref, ref of (val, selection, train length))}."""
    blocks = _blocks(cfg, tok_json, files)
    present = ray.get([_index.remote(b) for b in blocks])
    if err := next((e for _, e in present if e), None):
        raise DataError(err)
    refs = {}
    for name, index, shown, keep in doms:
        mine = [b for b, (p, _) in zip(blocks, present) if index in p]
        if not mine:
            raise no_docs(shown, cfg.data.text_column)
        refs[name] = _assemble.remote(cfg, name, index, vocab_size, eos, keep, *mine)
    return refs


def build_shards_ray(cfg: Config) -> TokenShards:
    """shards.tokenize_on_driver with the reading and tokenizing done by Ray Data tasks."""
    root, domains, tok_path = resolve_data_paths(cfg)
    tok, tok_hash, eos = open_tokenizer(cfg, tok_path)
    _ensure_ray(cfg)
    names = domains + tuple(cfg.data.eval_only_domains)
    where = {d: layout.shown(root, d) for d in names}
    files_of = {d: layout.domain_files(root, d) for d in names}
    col = cfg.data.text_column
    with _one_line_errors():
        pending = {d: [_inspect.remote(str(f), col) for f in files_of[d][0]] for d in names}
        looked = {d: ray.get(pending[d]) for d in names}
    src, files = {}, {}
    for i, d in enumerate(names):
        kinds_agree([k for k, _ in looked[d]], where[d])
        src[d] = layout.source_hash(files_of[d][1], [s for _, s in looked[d]])
        for f, (is_ids, _) in zip(files_of[d][0], looked[d]):
            files[_path_key(f)] = [i, is_ids, str(f)]
    with _one_line_errors():
        refs = _domain_refs(cfg, Path(tok_path).read_text(), files, tok.get_vocab_size(), eos,
                            [(d, i, where[d], d in domains) for i, d in enumerate(names)])
        small = dict(zip(names, ray.get([refs[d][1] for d in names])))
    val = {d: small[d][0] for d in names}
    sel = {d: small[d][1] for d in names if small[d][1] is not None}
    train = TrainArrays({d: refs[d][0] for d in domains}, {d: small[d][2] for d in domains})
    return TokenShards(domains, train, val, cfg.data.seq_len, tok.get_vocab_size(), eos, tok_hash,
                       data_hash_of(cfg, domains, tok_hash, src), src, tuple(cfg.data.eval_only_domains),
                       select=sel, tokenizer_files=checkpoint_files(tok_path, eos_token(tok_path), cfg.data.seq_len))


def ray_domain_file(cfg: Config, name: str, path: Path, index: int, tok, eos: int):
    """shards.driver_domain_file done by Ray Data tasks: a domain arriving in a live run is read like
    the run's first domains, and its train ids stay in the object store (their ObjectRef comes back)."""
    _ensure_ray(cfg)
    col = cfg.data.text_column
    with _one_line_errors():
        is_ids, sha = ray.get(_inspect.remote(str(path), col))
        train, small = _domain_refs(cfg, Path(resolve_data_paths(cfg)[2]).read_text(),
                                    {_path_key(path): [index, is_ids, str(path)]}, tok.get_vocab_size(), eos,
                                    [(name, index, str(path), True)])[name]
        va, se, n = ray.get(small)
    return train, n, va, se, layout.source_hash(None, [sha])


def _path_key(path: Path) -> str:
    """A file as read_parquet's path column names it (an absolute local path)."""
    return str(Path(path).resolve())
