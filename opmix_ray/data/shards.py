"""Domains (parquet) -> per-domain token shards with a held-out split and a content hash.

A domain is `<data.path>/<name>.parquet`, or a hive dir `<data.path>/domain=<name>/` of parquet
files (data/layout.py), with a text column (documents) or a list<int> column (pre-tokenized ids). Documents are joined with the tokenizer's end-of-text id. Whole documents,
chosen by a seeded shuffle, are held out for validation, so no validation text leaks into training.

The shards are plain numpy arrays: they go into Ray's object store once and every main-run worker,
adapter worker and Tune trial reads them zero-copy, on one node or many. With data.reader: ray_data
(data/ray_reader.py) the train arrays are built and stored by Ray tasks and `train` holds their
ObjectRefs (TrainArrays), so the driver never holds the training corpus.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from opmix_ray.config import Config, name_problem
from opmix_ray.errors import DataError
from opmix_ray.data import layout
from opmix_ray.data.tokenizer import checkpoint_files, eos_token, tokenizer_path
from opmix_ray.mixture import Mixture, content_hash
from opmix_ray.storage import sha256_file

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "corpus"


class TrainArrays(Mapping):
    """Train tokens by domain, each an array or the ObjectRef of one; a ref is fetched on first
    access (zero-copy from the node's object store) and kept. Sizes are known without fetching, so
    the driver reads train_tokens and caps without pulling the arrays in. Pickling keeps the refs,
    never the fetched arrays, so a ray.put of the shards stays small."""

    def __init__(self, items: Mapping, sizes: Mapping[str, int]):
        self._items, self._sizes, self._got = dict(items), dict(sizes), {}

    def __getitem__(self, d: str) -> np.ndarray:
        v = self._items[d]
        if isinstance(v, np.ndarray):
            return v
        if d not in self._got:
            import ray
            self._got[d] = ray.get(v)
        return self._got[d]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __reduce__(self):
        return TrainArrays, (self._items, self._sizes)

    def size(self, d: str) -> int:
        return self._sizes[d]

    def ref(self, d: str):
        return self._items[d]


def train_len(train: Mapping, d: str) -> int:
    return train.size(d) if isinstance(train, TrainArrays) else len(train[d])


def _with(train: Mapping, d: str, value, size: int) -> Mapping:
    """`train` plus domain d; stays a TrainArrays when either side holds refs."""
    if not isinstance(train, TrainArrays) and isinstance(value, np.ndarray):
        return {**train, d: value}
    items = {k: train.ref(k) if isinstance(train, TrainArrays) else train[k] for k in train}
    return TrainArrays({**items, d: value}, {**{k: train_len(train, k) for k in train}, d: size})


def _raw(train: Mapping, d: str):
    """Domain d's array, or its ObjectRef unfetched."""
    return train.ref(d) if isinstance(train, TrainArrays) else train[d]


def _without(train: Mapping, d: str) -> Mapping:
    if not isinstance(train, TrainArrays):
        return {k: v for k, v in train.items() if k != d}
    return TrainArrays({k: train.ref(k) for k in train if k != d}, {k: train.size(k) for k in train if k != d})


@dataclass
class TokenShards:
    domains: tuple[str, ...]
    train: Mapping[str, np.ndarray]  # a dict, or TrainArrays of ObjectRefs (data.reader: ray_data)
    val: dict[str, np.ndarray]  # [n_seq, seq_len + 1] per domain: what every report scores
    seq_len: int
    vocab_size: int
    eos_id: int
    tokenizer_hash: str
    data_hash: str
    source_hashes: dict[str, str] = field(default_factory=dict)
    eval_only: tuple[str, ...] = ()  # held-out target domains: in `val`, never in `train` or a mixture
    # what every checkpoint carries so that AutoTokenizer loads it (data/tokenizer.py)
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)
    retired: Mapping[str, np.ndarray] = field(default_factory=dict)  # train tokens of domains removed live
    # Windows the search and the decision score on (data.selection_tokens_per_domain), apart from val
    # and train, so the windows that choose a mixture are not the ones that report it.
    select: dict[str, np.ndarray] = field(default_factory=dict)

    def selection(self) -> dict[str, np.ndarray]:
        """The selection windows per domain; a domain without its own (selection off) falls back to val."""
        return {d: self.select.get(d, v) for d, v in self.val.items()}

    def train_tokens(self) -> dict[str, int]:
        return {d: int(train_len(self.train, d)) for d in self.domains}

    def val_tokens(self) -> dict[str, int]:
        return {d: int(self.val[d].shape[0] * self.seq_len) for d in self.val}

    def uniform(self) -> Mixture:
        return Mixture.uniform(self.domains, self.data_hash)

    def natural(self) -> Mixture:
        return Mixture.natural(self.train_tokens(), self.domains, self.data_hash)

    def cap_tokens(self, cfg: Config) -> dict[str, float]:
        """Repetition caps: available train tokens x max epochs."""
        caps = cfg.data.max_epochs
        return {d: train_len(self.train, d) * caps.get(d, cfg.data.default_max_epochs) for d in self.domains}


def resolve_data_paths(cfg: Config) -> tuple[Path, tuple[str, ...], Path]:
    root = Path(cfg.data.path).expanduser() if cfg.data.path else BUNDLED_DIR
    if not root.is_dir():
        raise DataError(f"data.path={root} is not a directory (fix: point it at a dir of <domain>.parquet)")
    held = cfg.data.eval_only_domains
    domains = tuple(cfg.data.domains) if cfg.data.domains else \
        tuple(d for d in layout.discover(root) if d not in held)
    for d in domains:
        if problem := name_problem(d):
            raise DataError(f"data.path: {layout.shown(root, d)} gives the domain name {problem}; rename it")
    if set(held) & set(domains):
        raise DataError(f"data.eval_only_domains: {sorted(set(held) & set(domains))} are also training domains "
                        "(fix: remove them from data.domains or from data.eval_only_domains)")
    for d in held:
        if not layout.exists(root, d):
            raise DataError(f"data.eval_only_domains: neither {root / (d + '.parquet')} nor "
                            f"{layout.hive_dir(root, d)}/ exists (fix: create one or remove '{d}')")
    if len(domains) < 2:
        raise DataError(f"data.domains: found {list(domains)} in {root}; mixing needs >= 2 "
                        "(fix: add <domain>.parquet files or domain=<domain>/ dirs, or list data.domains)")
    if len(set(domains)) != len(domains):
        raise DataError(f"data.domains: {list(domains)} lists a domain twice (fix: list each domain once)")
    for d in domains:
        if not layout.exists(root, d):
            raise DataError(f"data.domains: neither {root / (d + '.parquet')} nor {layout.hive_dir(root, d)}/ "
                            f"exists (fix: create one or remove '{d}' from data.domains)")
    for d in (*domains, *held):
        layout.domain_files(root, d)  # both layouts at once, or an empty hive dir: its one-line error
    return root, domains, tokenizer_path(cfg.data.tokenizer, cfg.model.path)


def load_tokenizer(path: Path) -> tuple[Tokenizer, str]:
    raw = Path(path).read_bytes()
    try:
        tok = Tokenizer.from_str(raw.decode())
    except Exception as exc:
        why = " ".join(str(exc).split())[:160]
        raise DataError(f"data.tokenizer: {path} is not a tokenizers JSON file ({why}) "
                        "(fix: train one with `opmix-ray data build`)") from None
    return tok, hashlib.sha256(raw).hexdigest()


def column_kind(path: Path, column: str) -> bool:
    """True when `column` of the parquet file holds token-id lists, False for text; else a DataError."""
    try:
        schema = pq.read_schema(path)
    except Exception as exc:
        raise DataError(f"data.domains: {path} is not a readable parquet file ({type(exc).__name__}) "
                        "(fix: rewrite it with pyarrow.parquet.write_table or remove it from data.domains)") from None
    if column not in schema.names:
        raise DataError(f"data.text_column: {path} has no column '{column}' (columns: {schema.names}) "
                        "(fix: set data.text_column to the column holding the text)")
    typ = schema.field(column).type
    is_ids = (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and pa.types.is_integer(typ.value_type)
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or is_ids):
        raise DataError(f"data.text_column: column '{column}' of {path} holds {typ}, not text or a list of "
                        "token ids (fix: point data.text_column at a string column)")
    return is_ids


def docs_of(col: list, is_ids: bool, path: Path, column: str, tok: Tokenizer) -> list[np.ndarray]:
    """The non-empty rows of one file's column (or a run of them) as int64 token arrays."""
    docs = [x for x in col if x]
    if not docs:
        return []
    if not is_ids:
        return [np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(docs, add_special_tokens=False)]
    bad = next((v for x in docs for v in x if v is None or not -2**63 <= v < 2**63), "none")
    if bad != "none":  # a null inside a list, or an id no int64 holds (uint64 columns)
        raise DataError(f"data.domains: {path} holds the token id {bad} in '{column}' (fix: token ids "
                        "must be non-null integers below the tokenizer's vocab size)")
    ids = [np.asarray(x, dtype=np.int64) for x in docs]  # pre-tokenized ids
    lo, hi = min(int(x.min()) for x in ids), max(int(x.max()) for x in ids)
    if lo < 0 or hi >= tok.get_vocab_size():
        raise DataError(f"data.tokenizer: token ids in {path} span [{lo}, {hi}], outside the tokenizer's "
                        f"vocab of {tok.get_vocab_size()} (fix: use the tokenizer these ids came from)")
    return ids


def kinds_agree(kinds: list[bool], where: str) -> None:
    if len(set(kinds)) > 1:
        raise DataError(f"data.text_column: the files of {where} mix text and token-id columns (fix: give "
                        "every file of a domain the same column type)")


def no_docs(where: str, column: str) -> DataError:
    return DataError(f"data.domains: {where} has no non-empty rows in '{column}' (fix: add documents "
                     "or remove the domain from data.domains)")


def _read_docs(files: list[Path], where: str, column: str, tok: Tokenizer) -> list[np.ndarray]:
    kinds = [column_kind(f, column) for f in files]
    kinds_agree(kinds, where)
    docs = []
    for path, is_ids in zip(files, kinds):
        try:
            col = pq.ParquetFile(path).read(columns=[column]).column(column).to_pylist()
        except Exception as exc:
            raise DataError(f"data.domains: cannot read {path} ({type(exc).__name__}) (fix: rewrite the "
                            "parquet file)") from None
        docs += docs_of(col, is_ids, path, column, tok)
    if not docs:
        raise no_docs(where, column)
    return docs


def _split(docs: list[np.ndarray], eos: int, need_val: int, need_sel: int, rng: np.random.Generator):
    """(train, val, selection) token streams: whole documents in a seeded order, val first and then
    selection, so turning selection on leaves val as it was and takes its documents from train."""
    order = [docs[j] for j in rng.permutation(len(docs))]
    parts, i = [], 0
    for need in (need_val, need_sel):
        part, n = [], 0
        while n < need and i < len(order):
            part.append(order[i])
            n += len(order[i]) + 1
            i += 1
        parts.append(part)
    join = lambda ds: np.concatenate([np.append(d, eos) for d in ds]) if ds else np.zeros(0, np.int64)
    return join(order[i:]), join(parts[0]), join(parts[1])


def open_tokenizer(cfg: Config, tok_path: Path) -> tuple[Tokenizer, str, int]:
    tok, tok_hash = load_tokenizer(tok_path)
    name = eos_token(tok_path)
    eos = tok.token_to_id(name)
    if eos is None:
        raise DataError(f"data.tokenizer: {tok_path} has no '{name}' token (fix: give its end-of-text token as "
                        "eos_token in a tokenizer_config.json beside it, or train one with `opmix-ray data "
                        "build`, which adds <|endoftext|>)")
    return tok, tok_hash, eos


def finish_domain(cfg: Config, name: str, docs: list[np.ndarray], index: int, vocab_size: int, eos: int):
    """(train ids, val windows [n, seq_len + 1], selection windows or None) of one domain's documents."""
    seq = cfg.data.seq_len
    n_val_seq = max(1, cfg.data.val_tokens_per_domain // seq)
    n_sel_seq = cfg.data.selection_tokens_per_domain // seq
    dtype = np.uint16 if vocab_size < 2**16 else np.uint32
    rng = np.random.default_rng([cfg.run.seed, index])
    tr, va, se = _split(docs, eos, n_val_seq * (seq + 1), n_sel_seq * (seq + 1), rng)
    if len(va) < n_val_seq * (seq + 1) or len(se) < n_sel_seq * (seq + 1) or len(tr) < 4 * (seq + 1):
        raise DataError(f"data.domains: domain '{name}' has {len(tr) + len(va) + len(se)} tokens, too few for "
                        f"{cfg.data.val_tokens_per_domain} val tokens, {cfg.data.selection_tokens_per_domain} "
                        "selection tokens plus training (fix: lower data.val_tokens_per_domain or "
                        "data.selection_tokens_per_domain, or add text)")
    windows = lambda ids, n: ids[: n * (seq + 1)].reshape(n, seq + 1).astype(dtype)
    return tr.astype(dtype), windows(va, n_val_seq), windows(se, n_sel_seq) if n_sel_seq else None


def _tokenize_domain(cfg: Config, name: str, files: list[Path], rels: list[str] | None, index: int,
                     tok: Tokenizer, eos: int):
    """(train ids, val windows, selection windows or None, source hash) for one domain's files."""
    src = layout.source_hash(rels, [sha256_file(f) for f in files])
    where = f"{files[0].parent}/" if rels is not None else str(files[0])
    docs = _read_docs(files, where, cfg.data.text_column, tok)
    return (*finish_domain(cfg, name, docs, index, tok.get_vocab_size(), eos), src)


def data_hash_of(cfg: Config, domains: tuple[str, ...], tok_hash: str, src: dict[str, str]) -> str:
    n_sel = cfg.data.selection_tokens_per_domain // cfg.data.seq_len
    return content_hash(domains, tok_hash, [src[d] for d in domains], cfg.data.seq_len,
                        cfg.data.val_tokens_per_domain, cfg.run.seed, cfg.data.text_column,
                        *(["eval_only", *cfg.data.eval_only_domains, *(src[d] for d in cfg.data.eval_only_domains)]
                          if cfg.data.eval_only_domains else []),
                        *(["selection", n_sel] if n_sel else []))  # off: the hashes runs had before it


def tokenize_on_driver(cfg: Config) -> TokenShards:
    """data.reader: driver: every domain read and tokenized in this process (read.build_shards picks
    the reader); deterministic given (data, tokenizer, seq_len, val size, seed)."""
    root, domains, tok_path = resolve_data_paths(cfg)
    tok, tok_hash, eos = open_tokenizer(cfg, tok_path)
    train, val, sel, src = {}, {}, {}, {}
    for i, d in enumerate(domains + tuple(cfg.data.eval_only_domains)):
        tr, val[d], se, src[d] = _tokenize_domain(cfg, d, *layout.domain_files(root, d), i, tok, eos)
        if d in domains:
            train[d] = tr
        if se is not None:
            sel[d] = se
    return TokenShards(domains, train, val, cfg.data.seq_len, tok.get_vocab_size(), eos, tok_hash,
                       data_hash_of(cfg, domains, tok_hash, src), src, tuple(cfg.data.eval_only_domains),
                       select=sel, tokenizer_files=checkpoint_files(tok_path, eos_token(tok_path), cfg.data.seq_len))


def _run_tokenizer(cfg: Config, shards: TokenShards) -> tuple[Tokenizer, int]:
    _, _, tok_path = resolve_data_paths(cfg)
    tok, tok_hash, eos = open_tokenizer(cfg, tok_path)
    if tok_hash != shards.tokenizer_hash:
        raise DataError(f"data.tokenizer: {tok_path} changed since the run started (fix: restore it)")
    return tok, eos


def driver_domain_file(cfg: Config, name: str, path: Path, index: int, tok: Tokenizer, eos: int):
    """(train ids, their length, val windows, selection windows or None, source hash) of one domain
    file, read in this process: how a domain arriving in a live run is read with data.reader: driver
    (read.domain_file_reader picks the reader)."""
    tr, va, se, sha = _tokenize_domain(cfg, name, [Path(path)], None, index, tok, eos)
    return tr, len(tr), va, se, sha


def with_domain(cfg: Config, shards: TokenShards, name: str, path: Path, read=driver_domain_file) -> TokenShards:
    """`shards` plus training domain `name` read from `path` by `read` (a domain arriving in a live
    run: engine/domains.py); the same split rules, and a data hash that chains the old one."""
    if name in shards.domains or name in shards.eval_only:
        raise DataError(f"add-domain: the run already has a domain '{name}' (fix: pick another --name)")
    tok, eos = _run_tokenizer(cfg, shards)
    index = len(shards.domains) + len(shards.eval_only)
    tr, n, va, se, sha = read(cfg, name, Path(path), index, tok, eos)
    return replace(shards, domains=(*shards.domains, name), train=_with(shards.train, name, tr, n),
                   val={**shards.val, name: va}, source_hashes={**shards.source_hashes, name: sha},
                   select={**shards.select, **({name: se} if se is not None else {})},
                   data_hash=content_hash(shards.data_hash, "added", name, sha))


def _known(shards: TokenShards, name: str, what: str) -> None:
    if name not in shards.domains:
        raise DataError(f"{what}: the run has no training domain '{name}' (fix: one of {list(shards.domains)})")


def revised_domain(cfg: Config, shards: TokenShards, name: str, path: Path, read=driver_domain_file) -> TokenShards:
    """`shards` with domain `name`'s data replaced by `path` (train and held-out val both new)."""
    _known(shards, name, "revise-domain")
    tok, eos = _run_tokenizer(cfg, shards)
    tr, n, va, se, sha = read(cfg, name, Path(path), shards.domains.index(name), tok, eos)
    select = {d: v for d, v in shards.select.items() if d != name}
    return replace(shards, train=_with(shards.train, name, tr, n), val={**shards.val, name: va},
                   select={**select, **({name: se} if se is not None else {})},
                   source_hashes={**shards.source_hashes, name: sha},
                   data_hash=content_hash(shards.data_hash, "revised", name, sha))


def without_domain(shards: TokenShards, name: str) -> TokenShards:
    """`shards` with domain `name` retired: never drawn again, still scored (it joins the
    eval-only domains, so what the model forgets of it stays visible)."""
    _known(shards, name, "remove-domain")
    if len(shards.domains) < 2:
        raise DataError(f"remove-domain: '{name}' is the run's last training domain (fix: add one first)")
    return replace(shards, domains=tuple(d for d in shards.domains if d != name),
                   train=_without(shards.train, name),  # a resumed sampler still lists it:
                   retired=_with(shards.retired, name, _raw(shards.train, name), train_len(shards.train, name)),
                   eval_only=(*shards.eval_only, name), data_hash=content_hash(shards.data_hash, "removed", name))


def shard_manifest(sh: TokenShards) -> dict:
    return {"domains": list(sh.domains), "data_hash": sh.data_hash, "tokenizer_hash": sh.tokenizer_hash,
            "seq_len": sh.seq_len, "vocab_size": sh.vocab_size, "train_tokens": sh.train_tokens(),
            "val_tokens": sh.val_tokens(),
            "selection_tokens": {d: int(v.shape[0] * sh.seq_len) for d, v in sh.select.items()}, "source_sha256": sh.source_hashes, "eval_only": list(sh.eval_only)}
