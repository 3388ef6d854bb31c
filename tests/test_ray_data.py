"""data.reader: ray_data gives the driver reader's shards bit for bit, keeps the train arrays off the
driver, reads hive dirs by the documented rule, and fails on bad data in one line.

    .venv/bin/python -m pytest -q tests/test_ray_data.py
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from opmix_ray.config import load_config
from opmix_ray.data.read import build_shards
from opmix_ray.data.ray_reader import ray_domain_file
from opmix_ray.data.shards import BUNDLED_DIR, TrainArrays, shard_manifest, with_domain, without_domain
from opmix_ray.engine.domains import apply_changes
from opmix_ray.errors import DataError
from opmix_ray.ray_init import init_ray

SMALL = {"seq_len": 64, "val_tokens_per_domain": 512, "selection_tokens_per_domain": 256}


def _cfg(reader: str, **data):
    return load_config({"data": {**SMALL, **data, "reader": reader}})


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.shutdown()
    init_ray(_cfg("driver"))
    yield
    ray.shutdown()


def _same(a, b) -> None:
    assert (a.domains, a.eval_only, a.data_hash, a.source_hashes) == (b.domains, b.eval_only, b.data_hash, b.source_hashes)
    assert (a.vocab_size, a.eos_id, a.tokenizer_hash, a.tokenizer_files) == (b.vocab_size, b.eos_id, b.tokenizer_hash,
                                                                             b.tokenizer_files)
    assert shard_manifest(a) == shard_manifest(b)
    for d in a.domains:
        assert a.train[d].dtype == b.train[d].dtype and np.array_equal(a.train[d], b.train[d]), d
    for part in ("val", "select"):
        x, y = getattr(a, part), getattr(b, part)
        assert x.keys() == y.keys()
        for d in x:
            assert x[d].dtype == y[d].dtype and np.array_equal(x[d], y[d]), (part, d)


@pytest.mark.slow  # ~30 s: the default suite keeps the small parity checks below
def test_bundled_corpus_is_bit_identical_and_the_driver_holds_only_refs(tmp_path, capfd):
    drv, rd = build_shards(_cfg("driver")), build_shards(_cfg("ray_data"))
    err = capfd.readouterr().err
    assert "Dataset" not in err and "execution" not in err, err[-2000:]  # Ray Data's INFO lines stay off the console
    assert isinstance(rd.train, TrainArrays)
    assert all(isinstance(rd.train.ref(d), ray.ObjectRef) for d in rd.domains)
    assert rd.train_tokens() == drv.train_tokens() and rd.cap_tokens(_cfg("ray_data")) == drv.cap_tokens(_cfg("driver"))
    assert rd.train._got == {}  # sizes and caps came without fetching a train array
    ref = ray.put(rd)
    assert rd.train._got == {}

    @ray.remote
    def sums(shards):  # a worker resolves the refs the shards carry
        return {d: int(np.asarray(shards.train[d], np.int64).sum()) for d in shards.domains}
    assert ray.get(sums.remote(ref)) == {d: int(drv.train[d].astype(np.int64).sum()) for d in drv.domains}
    _same(drv, rd)
    gone = without_domain(rd, "licenses")  # a live removal keeps the ref, unfetched
    assert gone.retired.ref("licenses") == rd.train.ref("licenses") and "licenses" not in gone.train
    assert np.array_equal(gone.retired["licenses"], drv.train["licenses"])
    # a live add and revise (what the driver applies at a boundary) go through the run's reader: with
    # ray_data the new train tokens are built in the object store, and the result equals the driver's
    pq.write_table(_slice("licenses", 0, 80), tmp_path / "extra.parquet")
    changes = [{"op": "add", "name": "extra", "file": "extra.parquet"},
               {"op": "revise", "name": "bible", "file": "extra.parquet"}]
    grown = apply_changes(_cfg("ray_data"), tmp_path, rd, changes)
    assert isinstance(grown.train, TrainArrays) and grown.train.ref("python") == rd.train.ref("python")
    assert all(isinstance(grown.train.ref(d), ray.ObjectRef) for d in grown.domains)
    assert grown.train.ref("bible") != rd.train.ref("bible") and grown.train._got == {}
    _same(apply_changes(_cfg("driver"), tmp_path, drv, changes), grown)
    _same(with_domain(_cfg("driver"), drv, "extra", tmp_path / "extra.parquet"),
          with_domain(_cfg("driver"), rd, "extra", tmp_path / "extra.parquet", ray_domain_file))


def _slice(name: str, start: int, stop: int) -> pa.Table:
    return pq.read_table(BUNDLED_DIR / f"{name}.parquet", columns=["text"]).slice(start, stop - start)


def test_hive_dir_hashes_as_documented_and_reads_like_the_concatenated_file(tmp_path):
    hive, flat, swapped = tmp_path / "hive", tmp_path / "flat", tmp_path / "swapped"
    part = hive / "domain=python"
    (part / "sub").mkdir(parents=True)
    a, b = _slice("python", 0, 150), _slice("python", 150, 300)
    pq.write_table(a, part / "a.parquet")
    pq.write_table(b, part / "sub" / "b.parquet")
    (part / "_SUCCESS").write_bytes(b"")
    pq.write_table(a.slice(0, 3), part / "_tmp.parquet")  # skipped: '_' names are writers' leftovers
    for d, first, second in ((flat, a, b), (swapped, b, a)):
        d.mkdir()
        pq.write_table(pa.concat_tables([first, second]), d / "python.parquet")
    for d in (hive, flat, swapped):
        pq.write_table(_slice("bible", 0, 300), d / "bible.parquet")

    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    want = hashlib.sha256(f"a.parquet\0{sha(part / 'a.parquet')}\nsub/b.parquet\0{sha(part / 'sub' / 'b.parquet')}\n"
                          .encode()).hexdigest()
    by_ray, by_driver = build_shards(_cfg("ray_data", path=str(hive))), build_shards(_cfg("driver", path=str(hive)))
    assert by_ray.domains == ("bible", "python")
    assert by_ray.source_hashes["python"] == want
    assert by_ray.source_hashes["bible"] == sha(hive / "bible.parquet")
    _same(by_driver, by_ray)
    one_file = build_shards(_cfg("driver", path=str(flat)))
    assert one_file.source_hashes["python"] == sha(flat / "python.parquet") != want
    for d in ("bible", "python"):
        assert np.array_equal(by_ray.train[d], one_file.train[d])
        assert np.array_equal(by_ray.val[d], one_file.val[d]) and np.array_equal(by_ray.select[d], one_file.select[d])
    # the order of the files matters, so the equality above is not one any order would pass
    other = build_shards(_cfg("driver", path=str(swapped)))
    assert not np.array_equal(other.train["python"], by_ray.train["python"])


def test_token_id_domains_and_eval_only_domains_match_the_driver(tmp_path):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(BUNDLED_DIR / "tokenizer.json"))
    texts = _slice("fortunes", 0, 400).column("text").to_pylist()
    ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    pq.write_table(pa.table({"text": pa.array(ids, pa.list_(pa.int32()))}), tmp_path / "ids.parquet")
    for name in ("python", "licenses"):
        pq.write_table(_slice(name, 0, 200), tmp_path / f"{name}.parquet")
    data = {"path": str(tmp_path), "eval_only_domains": ["licenses"]}
    drv, rd = build_shards(_cfg("driver", **data)), build_shards(_cfg("ray_data", **data))
    assert rd.domains == ("ids", "python") and rd.eval_only == ("licenses",) and "licenses" not in rd.train
    _same(drv, rd)


def _one_line_error(cfg, match: str) -> str:
    with pytest.raises(DataError, match=match) as err:
        build_shards(cfg)
    assert "\n" not in str(err.value) and "(fix: " in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("reader", ["driver", "ray_data"])
def test_bad_layouts_fail_in_one_line(tmp_path, reader):
    pq.write_table(_slice("python", 0, 50), tmp_path / "python.parquet")
    (tmp_path / "domain=python").mkdir()
    pq.write_table(_slice("python", 50, 100), tmp_path / "domain=python" / "p.parquet")
    pq.write_table(_slice("bible", 0, 50), tmp_path / "bible.parquet")
    _one_line_error(_cfg(reader, path=str(tmp_path)), r"^data\.path: .* has both python\.parquet and domain=python/")
    _one_line_error(_cfg(reader, path=str(tmp_path), domains=["python", "bible"]), "has both python.parquet")
    (tmp_path / "python.parquet").unlink()
    (tmp_path / "domain=empty").mkdir()
    _one_line_error(_cfg(reader, path=str(tmp_path)), r"^data\.path: .*domain=empty/ holds no \.parquet files")
    (tmp_path / "domain=empty").rmdir()
    _one_line_error(_cfg(reader, path=str(tmp_path), domains=["python", "nope"]),
                    r"^data\.domains: neither .*nope\.parquet nor .*domain=nope/ exists")
    _one_line_error(_cfg(reader, path=str(tmp_path), eval_only_domains=["gone"]), r"^data\.eval_only_domains: neither")
    pq.write_table(pa.table({"text": pa.array([[1, 2, 3]], pa.list_(pa.int64()))}), tmp_path / "domain=python" / "q.parquet")
    _one_line_error(_cfg(reader, path=str(tmp_path)), r"^data\.text_column: the files of .*domain=python/ mix text")


@pytest.mark.parametrize("reader", ["driver", "ray_data"])
def test_bad_data_inside_the_tasks_fails_in_one_line(tmp_path, reader):
    """With ray_data these are raised in a task (the file check, the tokenizing batch, the split):
    the caller still gets the DataError itself."""
    for name in ("python", "bible"):
        pq.write_table(_slice(name, 0, 100), tmp_path / f"{name}.parquet")
    _one_line_error(_cfg(reader, path=str(tmp_path), text_column="body"), r"^data\.text_column: .* has no column 'body'")
    _one_line_error(_cfg(reader, path=str(tmp_path), val_tokens_per_domain=10**7), r"^data\.domains: domain '\w+' has")
    pq.write_table(pa.table({"text": pa.array([[1, 2] * 300, [7, 10**6] * 300], pa.list_(pa.int64()))}),
                   tmp_path / "ids.parquet")
    msg = _one_line_error(_cfg(reader, path=str(tmp_path)), r"^data\.tokenizer: token ids in .*ids\.parquet span \[1, 1000000\]")
    assert str(tmp_path / "ids.parquet") in msg


def test_document_order_survives_many_blocks(tmp_path, monkeypatch):
    """Small row groups and a small block budget split each file over several read tasks; the
    split still sees every document in file order (preserve_order), so the tokens match."""
    from opmix_ray.data import ray_reader
    for name in ("python", "bible"):
        pq.write_table(_slice(name, 0, 240), tmp_path / f"{name}.parquet", row_group_size=20)
    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "target_max_block_size", 16 * 1024)
    monkeypatch.setattr(ctx, "target_min_block_size", 1024)
    seen, blocks, read, ordered = [], ray_reader._blocks, ray.data.read_parquet, []
    monkeypatch.setattr(ray_reader, "_blocks", lambda *a: seen.append(blocks(*a)) or seen[-1])
    # tasks this small finish in order anyway: check the read also asked Ray Data to keep it
    monkeypatch.setattr(ray.data, "read_parquet", lambda *a, **k: ordered.append(read(*a, **k)) or ordered[-1])
    rd = build_shards(_cfg("ray_data", path=str(tmp_path)))
    assert len(seen[0]) >= 6
    assert ordered and all(ds.context.execution_options.preserve_order for ds in ordered)
    _same(build_shards(_cfg("driver", path=str(tmp_path))), rd)
