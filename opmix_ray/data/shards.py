"""Domains (parquet) -> per-domain token shards with a held-out split and a content hash.

A domain is `<data.path>/<name>.parquet` with a text column (documents) or a list<int> column
(pre-tokenized ids). Documents are joined with the tokenizer's end-of-text id. Whole documents,
chosen by a seeded shuffle, are held out for validation, so no validation text leaks into training.

The shards are plain numpy arrays: they go into Ray's object store once and every main-run worker,
adapter worker and Tune trial reads them zero-copy, on one node or many.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from opmix_ray.config import Config, name_problem
from opmix_ray.errors import DataError
from opmix_ray.data.tokenizer import checkpoint_files, eos_token, tokenizer_path
from opmix_ray.mixture import Mixture, content_hash

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "corpus"


@dataclass
class TokenShards:
    domains: tuple[str, ...]
    train: dict[str, np.ndarray]
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
    retired: dict[str, np.ndarray] = field(default_factory=dict)  # train tokens of domains removed live
    # Windows the search and the decision score on (data.selection_tokens_per_domain), apart from val
    # and train, so the windows that choose a mixture are not the ones that report it.
    select: dict[str, np.ndarray] = field(default_factory=dict)

    def selection(self) -> dict[str, np.ndarray]:
        """The selection windows per domain; a domain without its own (selection off) falls back to val."""
        return {d: self.select.get(d, v) for d, v in self.val.items()}

    def train_tokens(self) -> dict[str, int]:
        return {d: int(len(self.train[d])) for d in self.domains}

    def val_tokens(self) -> dict[str, int]:
        return {d: int(self.val[d].shape[0] * self.seq_len) for d in self.val}

    def uniform(self) -> Mixture:
        return Mixture.uniform(self.domains, self.data_hash)

    def natural(self) -> Mixture:
        return Mixture.natural(self.train_tokens(), self.domains, self.data_hash)

    def cap_tokens(self, cfg: Config) -> dict[str, float]:
        """Repetition caps: available train tokens x max epochs."""
        caps = cfg.data.max_epochs
        return {d: len(self.train[d]) * caps.get(d, cfg.data.default_max_epochs) for d in self.domains}


def resolve_data_paths(cfg: Config) -> tuple[Path, tuple[str, ...], Path]:
    root = Path(cfg.data.path).expanduser() if cfg.data.path else BUNDLED_DIR
    if not root.is_dir():
        raise DataError(f"data.path={root} is not a directory (fix: point it at a dir of <domain>.parquet)")
    held = cfg.data.eval_only_domains
    domains = tuple(cfg.data.domains) if cfg.data.domains else \
        tuple(sorted(p.stem for p in root.glob("*.parquet") if p.stem not in held))
    for d in domains:
        if problem := name_problem(d):
            raise DataError(f"data.path: {root / (d + '.parquet')} gives the domain name {problem}; rename the file")
    if set(held) & set(domains):
        raise DataError(f"data.eval_only_domains: {sorted(set(held) & set(domains))} are also training domains "
                        "(fix: remove them from data.domains or from data.eval_only_domains)")
    for d in held:
        if not (root / f"{d}.parquet").is_file():
            raise DataError(f"data.eval_only_domains: {root / (d + '.parquet')} does not exist (fix: create it "
                            f"or remove '{d}')")
    if len(domains) < 2:
        raise DataError(f"data.domains: found {list(domains)} in {root}; mixing needs >= 2 "
                        "(fix: add <domain>.parquet files or list data.domains)")
    if len(set(domains)) != len(domains):
        raise DataError(f"data.domains: {list(domains)} lists a domain twice (fix: list each domain once)")
    for d in domains:
        if not (root / f"{d}.parquet").is_file():
            raise DataError(f"data.domains: {root / (d + '.parquet')} does not exist (fix: create it or "
                            f"remove '{d}' from data.domains)")
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


def _read_docs(path: Path, column: str, tok: Tokenizer) -> list[np.ndarray]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"data.domains: {path} is not a readable parquet file ({type(exc).__name__}) "
                        "(fix: rewrite it with pyarrow.parquet.write_table or remove it from data.domains)") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise DataError(f"data.text_column: {path} has no column '{column}' (columns: {names}) "
                        "(fix: set data.text_column to the column holding the text)")
    typ = pf.schema_arrow.field(column).type
    is_ids = (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and pa.types.is_integer(typ.value_type)
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or is_ids):
        raise DataError(f"data.text_column: column '{column}' of {path} holds {typ}, not text or a list of "
                        "token ids (fix: point data.text_column at a string column)")
    try:
        col = pf.read(columns=[column]).column(column).to_pylist()
    except Exception as exc:
        raise DataError(f"data.domains: cannot read {path} ({type(exc).__name__}) (fix: rewrite the "
                        "parquet file)") from None
    docs = [x for x in col if x]
    if not docs:
        raise DataError(f"data.domains: {path} has no non-empty rows in '{column}' (fix: add documents "
                        "or remove the domain from data.domains)")
    if not is_ids:
        return [np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(docs, add_special_tokens=False)]
    bad = next((v for x in docs for v in x if v is None or not -2**63 <= v < 2**63), "none")
    if bad != "none":  # a null inside a list, or an id no int64 holds (uint64 columns)
        raise DataError(f"data.domains: {path} holds the token id {bad} in '{column}' (fix: token ids must be "
                        "non-null integers below the tokenizer's vocab size)")
    ids = [np.asarray(x, dtype=np.int64) for x in docs]  # pre-tokenized ids
    lo, hi = min(int(x.min()) for x in ids), max(int(x.max()) for x in ids)
    if lo < 0 or hi >= tok.get_vocab_size():
        raise DataError(f"data.tokenizer: token ids in {path} span [{lo}, {hi}], outside the tokenizer's "
                        f"vocab of {tok.get_vocab_size()} (fix: use the tokenizer these ids came from)")
    return ids


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


def _open_tokenizer(cfg: Config, tok_path: Path) -> tuple[Tokenizer, str, int]:
    tok, tok_hash = load_tokenizer(tok_path)
    name = eos_token(tok_path)
    eos = tok.token_to_id(name)
    if eos is None:
        raise DataError(f"data.tokenizer: {tok_path} has no '{name}' token (fix: give its end-of-text token as "
                        "eos_token in a tokenizer_config.json beside it, or train one with `opmix-ray data "
                        "build`, which adds <|endoftext|>)")
    return tok, tok_hash, eos


def _tokenize_domain(cfg: Config, name: str, path: Path, index: int, tok: Tokenizer, eos: int):
    """(train ids, val windows [n, seq_len + 1], selection windows or None, sha256 of the file) for one
    domain file."""
    seq = cfg.data.seq_len
    n_val_seq = max(1, cfg.data.val_tokens_per_domain // seq)
    n_sel_seq = cfg.data.selection_tokens_per_domain // seq
    dtype = np.uint16 if tok.get_vocab_size() < 2**16 else np.uint32
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    docs = _read_docs(path, cfg.data.text_column, tok)
    rng = np.random.default_rng([cfg.run.seed, index])
    tr, va, se = _split(docs, eos, n_val_seq * (seq + 1), n_sel_seq * (seq + 1), rng)
    if len(va) < n_val_seq * (seq + 1) or len(se) < n_sel_seq * (seq + 1) or len(tr) < 4 * (seq + 1):
        raise DataError(f"data.domains: domain '{name}' has {len(tr) + len(va) + len(se)} tokens, too few for "
                        f"{cfg.data.val_tokens_per_domain} val tokens, {cfg.data.selection_tokens_per_domain} "
                        "selection tokens plus training (fix: lower data.val_tokens_per_domain or "
                        "data.selection_tokens_per_domain, or add text)")
    windows = lambda ids, n: ids[: n * (seq + 1)].reshape(n, seq + 1).astype(dtype)
    return tr.astype(dtype), windows(va, n_val_seq), windows(se, n_sel_seq) if n_sel_seq else None, sha


def build_shards(cfg: Config) -> TokenShards:
    """Tokenize every domain; deterministic given (data, tokenizer, seq_len, val size, seed)."""
    root, domains, tok_path = resolve_data_paths(cfg)
    tok, tok_hash, eos = _open_tokenizer(cfg, tok_path)
    train, val, sel, src = {}, {}, {}, {}
    for i, d in enumerate(domains + tuple(cfg.data.eval_only_domains)):
        tr, val[d], se, src[d] = _tokenize_domain(cfg, d, root / f"{d}.parquet", i, tok, eos)
        if d in domains:
            train[d] = tr
        if se is not None:
            sel[d] = se
    n_sel = cfg.data.selection_tokens_per_domain // cfg.data.seq_len
    data_hash = content_hash(domains, tok_hash, [src[d] for d in domains], cfg.data.seq_len,
                             cfg.data.val_tokens_per_domain, cfg.run.seed, cfg.data.text_column,
                             *(["eval_only", *cfg.data.eval_only_domains, *(src[d] for d in cfg.data.eval_only_domains)]
                               if cfg.data.eval_only_domains else []),
                             *(["selection", n_sel] if n_sel else []))  # off: the hashes runs had before it
    return TokenShards(domains, train, val, cfg.data.seq_len, tok.get_vocab_size(), eos, tok_hash, data_hash, src,
                       tuple(cfg.data.eval_only_domains), select=sel,
                       tokenizer_files=checkpoint_files(tok_path, eos_token(tok_path), cfg.data.seq_len))


def _run_tokenizer(cfg: Config, shards: TokenShards) -> tuple[Tokenizer, int]:
    _, _, tok_path = resolve_data_paths(cfg)
    tok, tok_hash, eos = _open_tokenizer(cfg, tok_path)
    if tok_hash != shards.tokenizer_hash:
        raise DataError(f"data.tokenizer: {tok_path} changed since the run started (fix: restore it)")
    return tok, eos


def with_domain(cfg: Config, shards: TokenShards, name: str, path: Path) -> TokenShards:
    """`shards` plus training domain `name` read from `path` (a domain arriving in a live run:
    engine/domains.py); the same split rules, and a data hash that chains the old one."""
    if name in shards.domains or name in shards.eval_only:
        raise DataError(f"add-domain: the run already has a domain '{name}' (fix: pick another --name)")
    tok, eos = _run_tokenizer(cfg, shards)
    index = len(shards.domains) + len(shards.eval_only)
    tr, va, se, sha = _tokenize_domain(cfg, name, Path(path), index, tok, eos)
    return replace(shards, domains=(*shards.domains, name), train={**shards.train, name: tr},
                   val={**shards.val, name: va}, source_hashes={**shards.source_hashes, name: sha},
                   select={**shards.select, **({name: se} if se is not None else {})},
                   data_hash=content_hash(shards.data_hash, "added", name, sha))


def _known(shards: TokenShards, name: str, what: str) -> None:
    if name not in shards.domains:
        raise DataError(f"{what}: the run has no training domain '{name}' (fix: one of {list(shards.domains)})")


def revised_domain(cfg: Config, shards: TokenShards, name: str, path: Path) -> TokenShards:
    """`shards` with domain `name`'s data replaced by `path` (train and held-out val both new)."""
    _known(shards, name, "revise-domain")
    tok, eos = _run_tokenizer(cfg, shards)
    tr, va, se, sha = _tokenize_domain(cfg, name, Path(path), shards.domains.index(name), tok, eos)
    select = {d: v for d, v in shards.select.items() if d != name}
    return replace(shards, train={**shards.train, name: tr}, val={**shards.val, name: va},
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
                   train={d: v for d, v in shards.train.items() if d != name},
                   retired={**shards.retired, name: shards.train[name]},  # a resumed sampler still lists it
                   eval_only=(*shards.eval_only, name), data_hash=content_hash(shards.data_hash, "removed", name))


def shard_manifest(sh: TokenShards) -> dict:
    return {"domains": list(sh.domains), "data_hash": sh.data_hash, "tokenizer_hash": sh.tokenizer_hash,
            "seq_len": sh.seq_len, "vocab_size": sh.vocab_size, "train_tokens": sh.train_tokens(),
            "val_tokens": sh.val_tokens(),
            "selection_tokens": {d: int(v.shape[0] * sh.seq_len) for d, v in sh.select.items()}, "source_sha256": sh.source_hashes, "eval_only": list(sh.eval_only)}
