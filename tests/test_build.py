"""Tests for the corpus builder and the bundled corpus (fast: python domain only)."""
import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from tokenizers import Tokenizer

from opmix_ray.data import build

DOMAINS = ["python", "bible", "dictionary", "manpages", "fortunes", "licenses"]
BUNDLED = Path(build.__file__).resolve().parent.parent / "corpus"
BUDGET = 60_000


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return out, build.build_corpus(out, BUDGET, seed=0, domains=["python"])


def test_domain_specs_are_ordered_and_documented():
    assert list(build.DOMAIN_SOURCES) == DOMAINS
    for name, spec in build.DOMAIN_SOURCES.items():
        assert spec.name == name and callable(spec.documents) and spec.source and spec.license


def test_tiny_build_schema_and_budget(tiny):
    out, sources = tiny
    assert list(sources) == ["python"]
    assert sorted(p.name for p in out.iterdir()) == ["SOURCES.yaml", "python.parquet"]  # no temps
    table = pq.read_table(out / "python.parquet")
    assert table.column_names == ["text"]
    assert table.schema.field("text").type in (pa.large_string(), pa.string())
    texts = table["text"].to_pylist()
    sizes = [len(t.encode()) for t in texts]
    info = sources["python"]
    assert info["n_docs"] == len(texts) > 0
    assert info["n_bytes"] == sum(sizes)
    assert BUDGET - build.SPLIT_ABOVE < info["n_bytes"] <= BUDGET  # filled, never over
    assert all(t.strip() for t in texts) and max(sizes) <= build.SPLIT_ABOVE
    assert info["sha256"] == _sha(out / "python.parquet")
    assert info["license"].startswith("PSF-2.0")
    assert yaml.safe_load((out / "SOURCES.yaml").read_text()) == sources


def test_build_is_deterministic(tiny, tmp_path):
    out, sources = tiny
    again = build.build_corpus(tmp_path / "again", BUDGET, seed=0, domains=["python"])
    assert again["python"]["sha256"] == sources["python"]["sha256"]
    assert (tmp_path / "again" / "python.parquet").read_bytes() == (out / "python.parquet").read_bytes()
    other = build.build_corpus(tmp_path / "other", {"python": BUDGET}, seed=1, domains=["python"])
    assert other["python"]["sha256"] != sources["python"]["sha256"]  # the seed matters


def test_split_long_documents_at_line_boundaries():
    doc = "".join(f"line {i:05d} " + "x" * 60 + "\n" for i in range(600))  # ~43 KB
    chunks = build._split(doc)
    assert "".join(chunks) == doc and len(chunks) > 1
    assert all(c.endswith("\n") and len(c.encode()) < build.CHUNK_BYTES + 100 for c in chunks)
    assert build._split("short\n") == ["short\n"]


@pytest.mark.parametrize("attr,domain,package", [
    ("BIBLE_DATA", "bible", "apt-get install bible-kjv"),
    ("GCIDE_DICT", "dictionary", "apt-get install dict-gcide"),
    ("DPKG_INFO", "manpages", "apt-get install manpages manpages-dev"),
    ("FORTUNE_DIR", "fortunes", "apt-get install fortunes"),
])
def test_missing_source_names_apt_package(monkeypatch, tmp_path, capsys, attr, domain, package):
    monkeypatch.setattr(build, attr, str(tmp_path / "not-installed"))
    out = tmp_path / "out"
    with pytest.raises(build.MissingSourceError, match=package):
        build.build_corpus(out, 10_000, domains=["python", domain])
    assert not list(out.glob("*"))  # fails before writing anything, even for python
    assert build.main(["--out", str(out), "--domains", domain, "--max-mb-per-domain", "0.01"]) == 2
    assert package in capsys.readouterr().err


def test_unknown_domain_and_missing_budget(tmp_path):
    with pytest.raises(ValueError, match="unknown domains"):
        build.build_corpus(tmp_path, 1000, domains=["klingon"])
    with pytest.raises(ValueError, match="no byte budget"):
        build.build_corpus(tmp_path, {"bible": 1000}, domains=["python"])


def test_tiny_tokenizer_round_trips_and_is_deterministic(tiny, tmp_path):
    out, _ = tiny
    paths = [str(out / "python.parquet")]
    a = build.train_tokenizer(paths, 300, str(tmp_path / "a" / "tokenizer.json"))
    b = build.train_tokenizer(paths, 300, str(tmp_path / "b" / "tokenizer.json"))
    assert Path(a).read_bytes() == Path(b).read_bytes()
    tok = Tokenizer.from_file(a)
    assert tok.get_vocab_size() == 300
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|pad|>") is not None
    text = "def f(x):\n    return x ** 2  # naïve ✓ 日本\n"
    assert tok.decode(tok.encode(text).ids) == text


def test_cli_main_builds_corpus_and_tokenizer(tmp_path, capsys):
    out = tmp_path / "cli"
    assert build.main(["--out", str(out), "--sizes", "python=0.03", "--vocab-size", "300"]) == 0
    assert {p.name for p in out.iterdir()} == {"python.parquet", "SOURCES.yaml", "tokenizer.json"}
    assert "python" in capsys.readouterr().out


def test_bundled_corpus_is_complete_and_consistent():
    sources = yaml.safe_load((BUNDLED / "SOURCES.yaml").read_text())
    assert list(sources) == DOMAINS
    for name, info in sources.items():
        path = BUNDLED / f"{name}.parquet"
        assert info["file"] == path.name and info["sha256"] == _sha(path), name
        texts = pq.read_table(path)["text"].to_pylist()
        assert info["n_docs"] == len(texts) > 0, name
        assert info["n_bytes"] == sum(len(t.encode()) for t in texts) > 100_000, name
        assert all(t.strip() for t in texts) and info["license"] and info["source"], name
    sizes = [sources[d]["n_bytes"] for d in DOMAINS]
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) <= 5_500_000  # deliberately unequal


def test_bundled_tokenizer_round_trips_every_domain():
    tok = Tokenizer.from_file(str(BUNDLED / "tokenizer.json"))
    assert tok.get_vocab_size() == 4096
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|pad|>") == 1
    for name in DOMAINS:
        text = pq.read_table(BUNDLED / f"{name}.parquet")["text"][0].as_py()
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text and len(ids) < len(text.encode()), name  # it compresses
    eot = "end of doc<|endoftext|>next"
    assert 0 in tok.encode(eot).ids
    assert tok.decode(tok.encode(eot).ids, skip_special_tokens=False) == eot
