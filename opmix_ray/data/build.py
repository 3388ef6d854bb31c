"""Build the bundled multi-domain real-text corpus and its byte-level BPE tokenizer.

All text comes from files already on a Debian machine (the Python stdlib plus a few
apt packages), so the corpus can be regenerated offline and its licenses are known.
Each domain yields documents in a seeded-shuffled order and is cut to a byte budget,
which lets us build deliberately unequal domain sizes for data-mixing experiments.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import unicodedata
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from opmix_ray.storage import atomic_write, sha256_file

# Module-level paths, read at call time, so tests can point them elsewhere.
STDLIB_DIR = sysconfig.get_paths()["stdlib"]
BIBLE_DATA = "/usr/lib/bible.data"
GCIDE_DICT = "/usr/share/dictd/gcide.dict.dz"
DPKG_INFO = "/var/lib/dpkg/info"
FORTUNE_DIR = "/usr/share/games/fortunes"
COMMON_LICENSES = "/usr/share/common-licenses"
DOC_DIR = "/usr/share/doc"

SPLIT_ABOVE = 16 * 1024  # documents longer than this are split ...
CHUNK_BYTES = 8 * 1024  # ... into chunks of about this size, at line boundaries
MB = 1_000_000
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]  # <|endoftext|> gets id 0
# Raw-text budgets (MB) of the bundled corpus: deliberately unequal domain sizes.
BUNDLED_SIZES_MB = {"python": 1.6, "bible": 1.2, "dictionary": 1.0,
                    "manpages": 0.7, "fortunes": 0.35, "licenses": 0.25}


class MissingSourceError(RuntimeError):
    """A domain's local source is not installed on this machine."""


def _require(path: str, domain: str, packages: str) -> Path:
    if Path(path).exists():
        return Path(path)
    raise MissingSourceError(f"domain {domain!r}: source {path} not found; install it with "
                             f"`apt-get install {packages}` or leave {domain!r} out of the domains")


_OVERSTRIKE = re.compile(r".\x08")  # "_\bx" (underline) and "x\bx" (bold), as col -b
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# tbl draws table rules with box-drawing characters; ASCII rules keep them from hogging BPE.
_BOX_TO_ASCII = str.maketrans("─│┌┐└┘├┤┬┴┼‐", "-|+++++++++-")  # (and U+2010 hyphen -> "-")


def _clean(text: str) -> str:
    """Drop overstrikes, stray control chars, trailing spaces and long runs of blank lines."""
    text = _CONTROL.sub("", _OVERSTRIKE.sub("", text.replace("\r\n", "\n")))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text).strip("\n")  # keep PEP 8's two blank lines
    return text + "\n" if text.strip() else ""  # "" marks an empty document


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # a few Debian files are still cp1252; keep, don't drop them
        return data.decode("cp1252", errors="replace")


_PY_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                 "__pycache__", "pydoc_data"}  # pydoc_data is a generated string dump


def python_docs(rng: random.Random) -> Iterator[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(_require(STDLIB_DIR, "python", "python3")):
        dirnames[:] = sorted(d for d in dirnames if d not in _PY_SKIP_DIRS)
        files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    for path in rng.sample(sorted(files), len(files)):
        yield _clean(_decode(Path(path).read_bytes()))


def bible_docs(rng: random.Random) -> Iterator[str]:
    data = _require(BIBLE_DATA, "bible", "bible-kjv")
    exe = _require(shutil.which("bible") or "/usr/bin/bible", "bible", "bible-kjv")
    # bible.data is Chip Chapin's custom compressed format; the package's own decoder
    # prints the whole text: a "Book N" header per chapter, then one verse per line.
    out = subprocess.run([str(exe), "-l100000", "-p", str(data.parent), "-d", data.name,
                          "gen1:1-rev22:21"], capture_output=True, check=True).stdout
    chapters: list[list[str]] = []
    for line in _decode(out).splitlines():
        if line and not line[0].isspace():
            chapters.append([line, ""])  # chapter header, e.g. "Song of Solomon 3"
        elif line.strip() and chapters:
            chapters[-1].append(line.strip())  # "16 For God so loved the world, ..."
    for chapter in rng.sample(chapters, len(chapters)):
        yield _clean("\n".join(chapter))


# --- dictionary: Webster 1913 via GCIDE ------------------------------------------------
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# GCIDE spells accented letters as [=a] (macron), ['e] (acute), [i^] (breve), [aum] ...
_MARKS = {"=": "\u0304", "~": "\u0303", '"': "\u0308", "'": "\u0301", "`": "\u0300",
          ".": "\u0307", "-": "\u0306", ",": "\u0327", "^": "\u0302"}
_SYMBOLS = {"ae": "æ", "oe": "œ", "eth": "ð", "thorn": "þ", "yogh": "ȝ", "ng": "ŋ", "deg": "°",
            "sect": "§", "root": "√", "pounds": "£", "middot": "·", "times": "×", "para": "¶",
            "add": "a", "asl": "a", "udd": "u"}  # dotted/slurred vowels: plain letter
_ENTITY = re.compile(r"\[([a-zA-Z=~\"'`.,^-][a-z^]{0,7})\]")
# Respellings like \Ar*rive"\ plus an optional "(...)" phonetic form after them.
_PRONUNCIATION = re.compile(r"[ \t]*\\[^\\\n]{1,40}\\(?:[ \t]*\([^()\n]*\))?")
# "[1913 Webster]" etc.; text after a tag on the same line is a stray headword list
# that dict-gcide's converter glued onto the previous entry, so it goes too.
_SOURCE_TAG = re.compile(r"\n?[ \t]*\[(?:[^\]\n]*Webster[^\]\n]*|WordNet[^\]\n]*|PJC)\]"
                         r"(?:[ \t]+\S[^\n]*(?:\n[ \t]+\S[^\n]*)*)?")


def _b64(s: str) -> int:  # dictd's .index stores offsets/lengths as base-64 numerals
    return sum(_B64.index(ch) * 64 ** i for i, ch in enumerate(reversed(s)))


def _entity(m: re.Match) -> str:
    code = m.group(1)
    if code in _SYMBOLS:
        return _SYMBOLS[code]
    if sfx := re.fullmatch(r"([a-z])(\^|mac|um)", code):  # suffix forms [i^] (breve), [imac]
        code = {"^": "-", "mac": "=", "um": '"'}[sfx[2]] + sfx[1]  # -> prefix forms [-i], [=i]
    if code[0] in _MARKS and code[1:].isalpha():  # [=a], ['e], [.a]
        return unicodedata.normalize("NFC", code[1] + _MARKS[code[0]] + code[2:])
    return m.group(0)  # real bracketed notes such as [Obs.] or [R.]


def _clean_gcide(entry: str) -> str:
    """Drop respellings and source tags; {See} cross-reference braces become plain words."""
    entry = _SOURCE_TAG.sub("", _PRONUNCIATION.sub("", entry))
    return _ENTITY.sub(_entity, entry.replace("{", "").replace("}", ""))


def dictionary_docs(rng: random.Random, group: int = 20) -> Iterator[str]:
    dz = _require(GCIDE_DICT, "dictionary", "dict-gcide")
    index = _require(str(dz).removesuffix(".dict.dz") + ".index", "dictionary", "dict-gcide")
    # Index rows are headword, offset, length; 00-* rows are metadata. A set, because
    # alternate headwords point at the same entry.
    rows = (line.split("\t") for line in index.read_text("utf-8", errors="replace").splitlines())
    spans = {(_b64(r[1]), _b64(r[2])) for r in rows if not r[0].startswith("00-")}
    data = gzip.open(dz).read()  # .dict.dz is dictzip, a gzip-compatible format
    entries = [_clean_gcide(_decode(data[o:o + n])).strip() for o, n in sorted(spans)]
    groups = [entries[i:i + group] for i in range(0, len(entries), group)]
    for g in rng.sample(groups, len(groups)):
        yield _clean("\n\n".join(e for e in g if e))


def manpages_docs(rng: random.Random) -> Iterator[str]:
    lists = [_require(f"{DPKG_INFO}/{p}.list", "manpages", "manpages manpages-dev")
             for p in ("manpages", "manpages-dev")]
    groff = _require(shutil.which("groff") or "/usr/bin/groff", "manpages", "groff-base")
    pages = sorted({p for lst in lists for p in lst.read_text().splitlines()
                    if re.fullmatch(r"/usr/share/man/man\d\w*/[^/]+\.gz", p)
                    and os.path.isfile(p) and not os.path.islink(p)})
    for page in rng.sample(pages, len(pages)):
        src = gzip.open(page).read()
        body = [ln for ln in src.splitlines() if ln.strip() and ln[1:3] != b'\\"']  # not comments
        if body and body[0].startswith(b".so "):
            continue  # alias page that only includes another page
        # -t runs tbl; -rcR=1 renders one continuous page (as man-db does); -rHY=0: no hyphens.
        out = subprocess.run([str(groff), "-Tutf8", "-man", "-t", "-rcR=1", "-rLL=78n", "-rHY=0"],
                             input=src, capture_output=True)
        if out.returncode == 0:
            yield _clean(_decode(out.stdout).translate(_BOX_TO_ASCII))


def fortunes_docs(rng: random.Random, group: int = 10) -> Iterator[str]:
    root = _require(FORTUNE_DIR, "fortunes", "fortunes fortunes-min")
    # Top-level plain files only: *.dat are indexes, *.u8 are symlinks, and off/ is the
    # offensive set (package fortunes-off), which we skip on purpose.
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.is_symlink()
                   and p.suffix not in (".dat", ".u8"))
    groups = []
    for p in files:
        items = [f.strip("\n") for f in re.split(r"(?m)^%$", _decode(p.read_bytes())) if f.strip()]
        groups += [items[i:i + group] for i in range(0, len(items), group)]
    for g in rng.sample(groups, len(groups)):
        yield _clean("\n%\n".join(g))


def licenses_docs(rng: random.Random) -> Iterator[str]:
    common = _require(COMMON_LICENSES, "licenses", "base-files")
    paths = sorted(common.iterdir()) + sorted(Path(DOC_DIR).glob("*/copyright"))
    unique: dict[bytes, str] = {}  # many packages ship byte-identical copyright files
    for path in paths:
        text = _clean(_decode(path.read_bytes()))
        if text:
            unique.setdefault(hashlib.sha256(text.encode()).digest(), text)
    yield from rng.sample(list(unique.values()), len(unique))


class DomainSpec(NamedTuple):
    name: str
    documents: Callable[[random.Random], Iterator[str]]  # sorted sources, then rng shuffle
    source: str
    license: str


DOMAIN_SOURCES: dict[str, DomainSpec] = {s.name: s for s in (
    DomainSpec("python", python_docs, f"Python {sys.version.split()[0]} stdlib .py sources "
               "(no test/, tests/, site-packages, pydoc_data)",
               "PSF-2.0. The Python Software Foundation License permits redistribution."),
    DomainSpec("bible", bible_docs, "King James Version, Debian package bible-kjv, one "
               "document per chapter", "public-domain. The 1611 KJV text is out of copyright."),
    DomainSpec("dictionary", dictionary_docs, "Webster's Revised Unabridged Dictionary (1913) via "
               "GCIDE 0.48, Debian package dict-gcide, ~20 entries per document",
               "GPL-2.0-or-later, as shipped in Debian dict-gcide; later GCIDE is GPL-3.0+."),
    DomainSpec("manpages", manpages_docs, "Linux man-pages rendered by groff -Tutf8 -man, Debian "
               "packages manpages and manpages-dev, one document per page",
               "various free licenses (see each page's copyright section), as shipped by Debian "
               "manpages. Mostly GPL-2.0-or-later, Linux-man-pages-copyleft and BSD."),
    DomainSpec("fortunes", fortunes_docs, "fortune files of Debian packages fortunes and "
               "fortunes-min (offensive set excluded), ~10 fortunes per document",
               "BSD-3-Clause, as shipped by Debian fortune-mod (see /usr/share/doc/fortunes/"
               "copyright). Quotations remain their authors'."),
    DomainSpec("licenses", licenses_docs, "/usr/share/common-licenses plus every /usr/share/doc/"
               "*/copyright file, deduplicated by content hash",
               "verbatim-copying-permitted. License texts may be copied verbatim."),
)}


def _split(doc: str) -> list[str]:
    """Split documents over SPLIT_ABOVE bytes into ~CHUNK_BYTES chunks at line boundaries."""
    if len(doc.encode()) <= SPLIT_ABOVE:
        return [doc]
    chunks, cur = [], ""
    for line in doc.splitlines(keepends=True):
        cur += line
        if len(cur.encode()) >= CHUNK_BYTES:
            chunks, cur = chunks + [cur], ""
    return chunks + [cur] if cur else chunks


def open_built(data_dir: str | None, manifest: str, fmt: str, build, files, what: str, fix: str,
               refuse_foreign: bool = False) -> dict:
    """The manifest of a built data dir (instruct.py, revisions.py): built there first by build(root)
    when it has none; otherwise its format and every file's sha256 (files(manifest): {name: sha256})
    are checked, and the first that differs is a DataError naming it and `fix`.
    refuse_foreign: a dir holding parquet files but no manifest is refused rather than built into."""
    import json

    from opmix_ray.console import say
    from opmix_ray.errors import DataError
    if not data_dir:
        raise DataError(f"data.path: {what} needs a data dir (fix: set data.path; it is built there if missing)")
    root = Path(data_dir).expanduser()
    if not (root / manifest).is_file():
        if refuse_foreign and root.is_dir() and any(root.glob("*.parquet")):
            raise DataError(f"data.path: {root} holds parquet files but no {manifest} (fix: point data.path at an "
                            "empty or new dir; nothing there is replaced)")
        say(f"building {what}'s data into {root}")
        return build(root)
    man = json.loads((root / manifest).read_text())
    if man.get("format") != fmt:
        raise DataError(f"data.path: {root / manifest} is {man.get('format')}, built by another version "
                        f"(this one reads {fmt}) (fix: {fix})")
    for name, sha in files(man).items():
        if not (root / name).is_file() or sha256_file(root / name) != sha:
            raise DataError(f"data.path: {root / name} is missing or differs from {manifest}'s sha256 (fix: {fix})")
    return man


def build_corpus(out_dir, max_bytes: dict[str, int] | int, seed: int = 0,
                 domains: list[str] | None = None) -> dict:
    """Write <domain>.parquet (one column `text`) and SOURCES.yaml; return the SOURCES dict."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    names = list(domains) if domains is not None else list(DOMAIN_SOURCES)
    if unknown := [n for n in names if n not in DOMAIN_SOURCES]:
        raise ValueError(f"unknown domains {unknown}; choose from {list(DOMAIN_SOURCES)}")
    budgets = {n: max_bytes for n in names} if isinstance(max_bytes, int) else dict(max_bytes)
    if missing := [n for n in names if n not in budgets]:
        raise ValueError(f"no byte budget given for domains {missing}")
    out = Path(out_dir)
    # Start every stream first so a missing source fails before anything is written.
    # Each domain has its own rng, so adding a domain never reshuffles the others.
    streams = {n: DOMAIN_SOURCES[n].documents(random.Random(f"{seed}:{n}")) for n in names}
    firsts = {n: next(gen, None) for n, gen in streams.items()}
    sources = {}
    for name in names:
        texts, used = [], 0
        docs = filter(None, itertools.chain([firsts[name]], streams[name]))  # skip empty docs
        for chunk in itertools.chain.from_iterable(map(_split, docs)):
            if used + len(chunk.encode()) > budgets[name]:
                break  # whole documents only: stop at the first one that overflows
            texts.append(chunk)
            used += len(chunk.encode())
        path = out / f"{name}.parquet"
        table = pa.table({"text": pa.array(texts, type=pa.large_string())})
        atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
        sources[name] = {"file": path.name, "source": DOMAIN_SOURCES[name].source,
                         "license": DOMAIN_SOURCES[name].license,
                         "n_docs": len(texts), "n_bytes": used,
                         "sha256": sha256_file(path)}
    text = (f"# Generated by opmix_ray.data.build (seed={seed}); n_bytes = raw UTF-8 text.\n"
            + yaml.safe_dump(sources, sort_keys=False, allow_unicode=True, width=100))
    atomic_write(out / "SOURCES.yaml", lambda tmp: Path(tmp).write_text(text, "utf-8"))
    return sources


def train_tokenizer(parquet_paths: list[str], vocab_size: int, out_path: str, seed: int = 0) -> str:
    """Train a byte-level BPE on the files' `text` column; save tokenizer.json atomically.
    Pair counts ignore document order, so `seed` is only there for API symmetry."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [t for p in parquet_paths for t in pq.read_table(p)["text"].to_pylist()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes: no <unk> ever
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    atomic_write(Path(out_path), tok.save)
    return str(out_path)


def _sizes(text: str) -> dict[str, float]:  # "python=2.0,bible=1.5" -> {"python": 2.0, ...}
    return {k.strip(): float(v) for k, _, v in (kv.partition("=") for kv in text.split(",") if kv)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="opmix-ray data build",
                                description="Build the multi-domain corpus and a BPE tokenizer.")
    p.add_argument("--out", required=True, help="output directory")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--max-mb-per-domain", type=float, help="same MB of raw text for all")
    size.add_argument("--sizes", type=_sizes, help="per-domain MB, e.g. python=2.0,bible=1.5 "
                      f"(default: the bundled sizes {BUNDLED_SIZES_MB})")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--domains", help=f"comma-separated subset of {','.join(DOMAIN_SOURCES)}")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sizes_mb = args.sizes or BUNDLED_SIZES_MB
    domains = args.domains.split(",") if args.domains else (list(sizes_mb) if args.sizes else None)
    budget = ({k: int(v * MB) for k, v in sizes_mb.items()} if args.max_mb_per_domain is None
              else int(args.max_mb_per_domain * MB))
    try:
        sources = build_corpus(args.out, budget, seed=args.seed, domains=domains)
    except (MissingSourceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, s in sources.items():
        print(f"{name:12s} {s['n_docs']:6d} docs {s['n_bytes']:9d} bytes")
    paths = [str(Path(args.out) / s["file"]) for s in sources.values()]
    print("wrote", train_tokenizer(paths, args.vocab_size, f"{args.out}/tokenizer.json", args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
