"""Bad input through the real CLI: one line on stderr naming the field and the fix, exit 2, no
traceback, nothing written, and Ray never started.

Each case builds its inputs in a fresh tmp dir from a valid base (a tiny config on two small
domains) and breaks one thing. The base itself is checked to pass validation, so no case can pass
because of some other error.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from opmix_ray.cli import main
from opmix_ray.data.shards import BUNDLED_DIR

TOKENIZER = BUNDLED_DIR / "tokenizer.json"
OPMIX = Path(sys.executable).parent / "opmix-ray"


@pytest.fixture(scope="module")
def good_data(tmp_path_factory) -> Path:
    """Two small real-text domains (a slice of the bundled corpus): enough for the base config."""
    d = tmp_path_factory.mktemp("data")
    for name in ("python", "bible"):
        rows = pq.read_table(BUNDLED_DIR / f"{name}.parquet", columns=["text"]).slice(0, 60)
        pq.write_table(rows, d / f"{name}.parquet")
    return d


def _base(tmp: Path, data: Path) -> dict:
    return {"run": {"name": "bad", "storage_path": str(tmp / "runs")},
            "data": {"path": str(data), "seq_len": 64, "val_tokens_per_domain": 512},
            "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
            "main": {"total_tokens": 20480, "batch_size": 8},
            "adapters": {"r": 4, "steps": 2, "batch_size": 4},
            "search": {"searcher": "random", "num_samples": 2}}


def _write(tmp: Path, cfg: dict) -> str:
    p = tmp / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _with(section: str, **kv):
    """A case that sets config fields in one section."""
    def build(tmp, cfg, data):
        cfg.setdefault(section, {}).update(kv)
        return ["run", _write(tmp, cfg)]
    return build


def _data_dir(tmp, data, mutate) -> str:
    """A copy of the good data dir with `mutate(dir)` applied."""
    d = tmp / "data"
    d.mkdir()
    for f in data.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    mutate(d)
    return str(d)


def _with_data(mutate, **data_kv):
    def build(tmp, cfg, data):
        cfg["data"]["path"] = _data_dir(tmp, data, mutate)
        cfg["data"].update(data_kv)
        return ["run", _write(tmp, cfg)]
    return build


def _raw_file(content: bytes):
    def build(tmp, cfg, data):
        p = tmp / "config.yaml"
        p.write_bytes(content)
        return ["run", str(p)]
    return build


def _tokenizer(make):
    def build(tmp, cfg, data):
        cfg["data"]["tokenizer"] = make(tmp)
        return ["run", _write(tmp, cfg)]
    return build


def _file(name: str, content: bytes):
    def make(tmp):
        (tmp / name).write_bytes(content)
        return str(tmp / name)
    return make


def _tokenizer_without_eos(tmp):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp / "noeos.json"))
    return str(tmp / "noeos.json")


def _model_dir(vocab: int | None, weights: bool = True, config: bool = True):
    def build(tmp, cfg, data):
        d = tmp / "ckpt"
        d.mkdir()
        if config:
            (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": vocab}))
        if weights:
            (d / "model.safetensors").write_bytes(b"")  # never read: the vocab check comes first
        cfg["model"]["path"] = str(d)
        return ["run", _write(tmp, cfg)]
    return build


def _existing_run(tmp, cfg, data):
    run_dir = tmp / "runs" / "bad"
    run_dir.mkdir(parents=True)
    (run_dir / "history.json").write_text("{}")
    return ["run", _write(tmp, cfg)]


def _users_dir(tmp, cfg, data):
    """--overwrite on a dir that is not a run (a user's file in it): refused, nothing deleted."""
    run_dir = tmp / "runs" / "bad"
    run_dir.mkdir(parents=True)
    (run_dir / "history.json").write_text("{}")  # a file of the user's that happens to share a name
    return ["run", _write(tmp, cfg), "--overwrite"]


def _argv(*extra, storage_ok=True):
    def build(tmp, cfg, data):
        return [x.replace("CONFIG", _write(tmp, cfg)) for x in extra]
    return build


def _searcher_module(source: str):
    """search.searcher pointing at a module written for the case (importable from tmp)."""
    def build(tmp, cfg, data):
        mod = f"opmix_case_{abs(hash(str(tmp))) % 10**9}"
        (tmp / f"{mod}.py").write_text(source)
        sys.path.insert(0, str(tmp))
        cfg["search"]["searcher"] = f"{mod}:S"
        return ["run", _write(tmp, cfg)]
    return build


def _rows(table):
    return lambda d: pq.write_table(table, d / "python.parquet")


TINY_TEXT = pa.table({"text": ["just a few words"] * 3})

# (id, field the message must name, how to build the argv)
CASES = [
    ("malformed-yaml", "<yaml>", _raw_file(b"run:\n  name: [x\n  seed: 1\n")),
    ("yaml-not-mapping", "<root>", _raw_file(b"- run\n- data\n")),
    ("config-not-utf8", "<file>", _raw_file(b"run:\n  name: \xff\xfe\n")),
    ("config-missing", "<file>", lambda tmp, cfg, data: ["run", str(tmp / "nope.yaml")]),
    ("config-is-dir", "<file>", lambda tmp, cfg, data: ["run", str(tmp)]),
    ("unknown-top-key", "runn", _with("runn", name="x")),
    ("unknown-nested-key", "adapters.rank", _with("adapters", rank=8)),
    ("wrong-type", "main.batch_size", _with("main", batch_size="sixteen")),
    ("wrong-type-list", "main.lr", _with("main", lr=[0.1])),
    ("negative-lr", "main.lr", _with("main", lr=-1.0)),
    ("nan-lr", "main.lr", _with("main", lr=float("nan"))),
    ("zero-samples", "search.num_samples", _with("search", num_samples=0)),
    ("prefix-out-of-range", "rounds.uniform_prefix", _with("rounds", uniform_prefix=1.5)),
    ("nan-prefix", "rounds.uniform_prefix", _with("rounds", uniform_prefix=float("nan"))),
    ("bad-device", "model.device", _with("model", device="tpu")),
    ("heads-not-dividing", "model", _with("model", num_heads=3)),
    ("too-few-tokens", "main.total_tokens", _with("main", total_tokens=600)),
    ("negative-cap", "data.max_epochs", _with("data", max_epochs={"python": -1.0})),
    ("cap-unknown-domain", "data.max_epochs", _with("data", max_epochs={"nosuch": 2.0})),
    ("objective-nan", "search.objective_weights", _with("search", objective_weights={"python": float("nan")})),
    ("objective-negative", "search.objective_weights", _with("search", objective_weights={"python": -1.0})),
    ("objective-zero-sum", "search.objective_weights", _with("search", objective_weights={"python": 0.0})),
    ("objective-not-dict", "search.objective_weights", _with("search", objective_weights=[1.0, 2.0])),
    ("objective-unknown-domain", "search.objective_weights", _with("search", objective_weights={"pile": 1.0})),
    ("data-path-missing", "data.path", _with("data", path="/nonexistent/opmix/data")),
    ("one-domain", "data.domains", _with_data(lambda d: (d / "bible.parquet").unlink())),
    ("domain-file-missing", "data.domains", _with_data(lambda d: None, domains=["python", "news"])),
    ("domain-listed-twice", "data.domains", _with_data(lambda d: None, domains=["python", "python"])),
    ("empty-parquet-file", "data.domains", _with_data(lambda d: (d / "python.parquet").write_bytes(b""))),
    ("not-parquet", "data.domains", _with_data(lambda d: (d / "python.parquet").write_text("hello"))),
    ("zero-rows", "data.domains", _with_data(_rows(pa.table({"text": pa.array([], pa.string())})))),
    ("wrong-column", "data.text_column", _with("data", text_column="body")),
    ("column-not-text", "data.text_column", _with_data(_rows(pa.table({"text": [1, 2, 3]})))),
    ("too-little-text", "data.domains", _with_data(_rows(TINY_TEXT))),
    ("ids-beyond-vocab", "data.tokenizer", _with_data(_rows(pa.table({"text": [list(range(5000))] * 4})))),
    ("tokenizer-missing", "data.tokenizer", _tokenizer(lambda tmp: str(tmp / "nope.json"))),
    ("tokenizer-is-dir", "data.tokenizer", _tokenizer(lambda tmp: str(tmp))),
    ("tokenizer-garbage", "data.tokenizer", _tokenizer(_file("tok.json", b"\x00\x01not json"))),
    ("tokenizer-not-a-tokenizer", "data.tokenizer", _tokenizer(_file("tok.json", b'{"model": 1}'))),
    ("tokenizer-without-eos", "data.tokenizer", _tokenizer(_tokenizer_without_eos)),
    ("model-path-no-config", "model.path", _model_dir(100, config=False)),
    ("model-path-no-weights", "model.path", _model_dir(8192, weights=False)),
    ("model-path-bad-config", "model.path", _model_dir(None)),
    ("model-vocab-smaller-than-tokenizer", "model.path", _model_dir(100)),
    ("unknown-searcher", "search.searcher", _with("search", searcher="bayes")),
    ("searcher-bad-module", "search.searcher", _with("search", searcher="nosuch_pkg.mod:Searcher")),
    ("searcher-bad-attr", "search.searcher", _with("search", searcher="opmix_ray.searchers:Nope")),
    ("searcher-not-callable", "search.searcher", _with("search", searcher="os:sep")),
    ("storage-under-a-file", "run.storage_path", lambda tmp, cfg, data: (
        (tmp / "afile").write_text("x"), cfg["run"].update(storage_path=str(tmp / "afile" / "runs")),
        ["run", _write(tmp, cfg)])[-1]),
    ("storage-unwritable", "run.storage_path", _with("run", storage_path="/proc/opmix_runs")),
    ("storage-uri-unknown-scheme", "run.storage_path", _with("run", storage_path="nosuch://bucket/runs")),
    ("run-name-with-slash", "run.name", _with("run", name="a/b")),
    ("existing-run-dir", "run.name", _existing_run),
    ("overwrite-a-dir-that-is-not-a-run", "--overwrite refused", _users_dir),
    ("bad-ray-address", "ray.address", _with("ray", address="not an address!")),
    ("set-without-equals", "--set", _argv("run", "CONFIG", "--set", "main.lr")),
    ("set-bad-yaml", "--set", _argv("run", "CONFIG", "--set", "main.lr=[0.1")),
    ("set-empty-key", "--set", _argv("run", "CONFIG", "--set", "main..lr=1")),
    ("set-unknown-field", "main.lrr", _argv("run", "CONFIG", "--set", "main.lrr=0.1")),
    ("set-bad-value", "search.max_concurrent", _argv("run", "CONFIG", "--set", "search.max_concurrent=0")),
    ("bad-baseline", "--baseline", _argv("run", "CONFIG", "--baseline", "best")),
    ("missing-config-arg", "config", _argv("run")),
    ("unknown-command", "invalid choice", _argv("fly")),
    ("submit-runtime-env-missing", "--runtime-env", _argv("submit", "CONFIG", "--address",
                                                          "http://127.0.0.1:1", "--runtime-env", "/nope.yaml")),
    ("submit-unreachable-address", "--address", _argv("submit", "CONFIG", "--address", "http://127.0.0.1:1")),
    ("submit-bad-config", "main.lr", _argv("submit", "CONFIG", "--address", "http://127.0.0.1:1",
                                           "--set", "main.lr=-1")),
    ("inf-lr", "main.lr", _with("main", lr=float("inf"))),
    ("inf-alpha", "adapters.alpha", _with("adapters", alpha=float("inf"))),
    ("negative-seed", "run.seed", _with("run", seed=-1)),
    ("nul-in-run-name", "run.name", _with("run", name="a\x00b")),
    ("dotdot-run-name", "run.name", _with("run", name="..")),
    ("bool-as-number", "main.batch_size", _with("main", batch_size=True)),
    ("empty-config-file", "<file>", _raw_file(b"# nothing here\n")),
    ("duplicate-section", "<yaml>", _raw_file(b"run: {name: a}\nmain: {lr: 0.1}\nmain: {batch_size: 4}\n")),
    ("domain-file-unsafe-name", "data.path", _with_data(lambda d: (d / "bible.parquet").rename(d / "bi ble.parquet"))),
    ("searcher-raises-at-import", "search.searcher", _searcher_module("raise RuntimeError('boom')\n")),
    ("searcher-syntax-error", "search.searcher", _searcher_module("def f(:\n")),
    ("searcher-not-a-searcher", "search.searcher", _searcher_module("class S:\n    def __init__(self, **kw):\n        pass\n")),
    ("searcher-without-propose", "search.searcher", _searcher_module(
        "from opmix_ray.searchers import MixtureSearcher\n\n\nclass S(MixtureSearcher):\n    pass\n")),
    ("searcher-unknown-option", "search.searcher", _with("search", searcher_options={"bogus": 1})),
    ("ids-with-a-null", "data.domains", _with_data(_rows(pa.table({"text": [[1, 2, None, 3] + list(range(4, 400))] * 4})))),
    ("ids-beyond-int64", "data.domains", _with_data(_rows(pa.table({"text": pa.array(
        [[1, 2, 2**63 + 5] + list(range(4, 400))] * 4, pa.list_(pa.uint64()))})))),
    ("storage-path-symlink-loop", "run.storage_path", lambda tmp, cfg, data: (
        os.symlink(tmp / "loop_b", tmp / "loop_a"), os.symlink(tmp / "loop_a", tmp / "loop_b"),
        cfg["run"].update(storage_path=str(tmp / "loop_a" / "runs")), ["run", _write(tmp, cfg)])[-1]),
    ("bench-out-is-a-file", "--out", lambda tmp, cfg, data: (
        (tmp / "afile").write_text("x"), ["bench", _write(tmp, cfg), "--out", str(tmp / "afile")])[-1]),
    ("nan-alpha", "adapters.alpha", _with("adapters", alpha=float("nan"))),
    ("inf-k", "decision.k", _with("decision", k=float("inf"))),
    ("bool-num-samples", "search.num_samples", _with("search", num_samples=True)),
    ("bool-in-caps", "data.max_epochs", _with("data", max_epochs={"python": True})),
    ("bool-seq-len", "data.seq_len", _with("data", seq_len=True)),
    ("bool-num-cpus", "ray.num_cpus", _with("ray", num_cpus=True)),
    ("run-name-with-space", "run.name", _with("run", name="my run")),
    ("run-name-too-long", "run.name", _with("run", name="r" * 200)),
    ("domain-name-dotdot", "data.domains", _with_data(lambda d: None, domains=["..", "bible"])),
    ("eval-only-unsafe-name", "data.eval_only_domains", _with("data", eval_only_domains=["x/y"])),
    ("duplicate-nested-key", "<yaml>", _raw_file(b"run:\n  name: a\n  name: b\n")),
    ("empty-file", "<file>", _raw_file(b"")),
    ("whitespace-only-file", "<file>", _raw_file(b"   \n\n")),
    ("searcher-exits-at-import", "search.searcher", _searcher_module("raise SystemExit(3)\n")),
    ("searcher-init-refuses", "search.searcher", _searcher_module(
        "from opmix_ray.searchers import MixtureSearcher\n\n\nclass S(MixtureSearcher):\n"
        "    def __init__(self, **kw):\n        raise ValueError('bad option')\n\n    def propose(self, t):\n"
        "        return None\n")),
    ("searcher-factory-returns-none", "search.searcher", _searcher_module("def S(**kw):\n    return None\n")),
    ("negative-val-tokens", "data.val_tokens_per_domain", _with("data", val_tokens_per_domain=-1)),
    ("target-modules-match-nothing", "adapters.target_modules", _with("adapters", target_modules=["q_proj", "qproj"])),
    ("add-domain-unsafe-name", "NAME", lambda tmp, cfg, data: ["add-domain", str(tmp / "runs" / "x"),
                                                              str(data / "python.parquet"), "--name", "../../x"]),
    # a bucket that never answers (gs:// without credentials retries for many minutes): refused
    # after the storage timeout, which the case's 10 s limit checks
    ("storage-gs-without-credentials", "run.storage_path", _with("run", storage_path="gs://opmix-no-such-bucket/runs")),
    # a dangling symlink as the storage path: writing through it would create its target unseen
    ("storage-path-dangling-symlink", "run.storage_path", lambda tmp, cfg, data: (
        os.symlink(tmp / "runs", tmp / "link"), cfg["run"].update(storage_path=str(tmp / "link")),
        ["run", _write(tmp, cfg)])[-1]),
    ("run-dir-dangling-symlink", "run.name", lambda tmp, cfg, data: (
        (tmp / "store").mkdir(), os.symlink(tmp / "runs", tmp / "store" / "bad"),
        cfg["run"].update(storage_path=str(tmp / "store")), ["run", _write(tmp, cfg)])[-1]),
    # requests no cluster this config starts can hold: Ray would wait for them for ever
    ("cpus-per-trial-beyond-the-cluster", "search.cpus_per_trial", _with("search", cpus_per_trial=10_000)),
    ("cpus-per-trial-beyond-ray-num-cpus", "search.cpus_per_trial", lambda tmp, cfg, data: (
        cfg["search"].update(cpus_per_trial=2), cfg.update(ray={"num_cpus": 2}), ["run", _write(tmp, cfg)])[-1]),
    ("main-run-holds-every-cpu", "main.cpus_per_worker", lambda tmp, cfg, data: (
        cfg["main"].update(cpus_per_worker=4), cfg.update(ray={"num_cpus": 4}), ["run", _write(tmp, cfg)])[-1]),
    ("main-workers-beyond-the-cluster", "main.num_workers", lambda tmp, cfg, data: (
        cfg["main"].update(num_workers=8), cfg.update(ray={"num_cpus": 4}), ["run", _write(tmp, cfg)])[-1]),
    ("adapter-workers-beyond-the-cluster", "adapters.num_workers", _with("adapters", num_workers=10_000)),
    ("gpus-beyond-the-cluster", "placement.main_gpus", lambda tmp, cfg, data: (
        cfg.update(placement={"main_gpus": 1}, ray={"num_gpus": 0}), ["run", _write(tmp, cfg)])[-1]),
    ("round-gpus-beside-a-main-run-holding-the-gpu", "placement.trial_gpus", lambda tmp, cfg, data: (
        cfg.update(placement={"main_gpus": 1, "trial_gpus": 0.5}, ray={"num_gpus": 1}), ["run", _write(tmp, cfg)])[-1]),
    # model shapes the architecture cannot build
    ("head-width-odd", "model", _with("model", hidden_size=6, num_heads=2)),
    ("checkpoint-kv-heads-not-dividing", "model.path", lambda tmp, cfg, data: (
        _model_dir(8192)(tmp, cfg, data),
        (tmp / "ckpt" / "config.json").write_text(json.dumps({
            "model_type": "llama", "vocab_size": 8192, "hidden_size": 32, "num_attention_heads": 4,
            "num_key_value_heads": 3})), ["run", _write(tmp, cfg)])[-1]),
    ("checkpoint-head-width-odd", "model.path", lambda tmp, cfg, data: (
        _model_dir(8192)(tmp, cfg, data),
        (tmp / "ckpt" / "config.json").write_text(json.dumps({
            "model_type": "llama", "vocab_size": 8192, "hidden_size": 30, "num_attention_heads": 2,
            "rope_theta": 10000.0})), ["run", _write(tmp, cfg)])[-1]),
]


def _check(rc, out, err, field, tmp, existing=False):
    lines = err.strip().splitlines()
    assert rc == 2, f"exit {rc}; stderr: {err[-2000:]}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"{len(lines)} lines on stderr: {err[-2000:]}"
    assert field in lines[0], f"message does not name {field!r}: {lines[0]}"
    assert "fix" in lines[0], lines[0]
    runs = tmp / "runs"
    if existing:  # the old run is untouched
        assert sorted(p.name for p in runs.rglob("*")) == ["bad", "history.json"]
    else:
        assert not runs.exists(), f"written: {sorted(str(p) for p in runs.rglob('*'))}"


def test_cases_are_many():
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)


def test_base_config_is_valid(tmp_path, good_data):
    """The base passes every check (so each case fails for its own reason) and writes nothing."""
    from opmix_ray.config import load_config
    from opmix_ray.engine.preflight import preflight
    cfg = load_config(_write(tmp_path, _base(tmp_path, good_data)))
    run_dir, shards = preflight(cfg)
    assert shards.domains == ("bible", "python") and not (tmp_path / "runs").exists()
    assert run_dir == (tmp_path / "runs" / "bad").resolve()


@pytest.mark.parametrize("name, field, build", CASES, ids=[c[0] for c in CASES])
def test_bad_input_in_process(name, field, build, tmp_path, good_data, capsys):
    argv = build(tmp_path, _base(tmp_path, good_data), good_data)
    capsys.readouterr()
    t0 = time.time()
    rc = main(argv)
    took = time.time() - t0
    out, err = capsys.readouterr()
    assert took < 10, f"{took:.1f}s for one bad input"
    _check(rc, out, err, field, tmp_path, existing=name in ("existing-run-dir", "overwrite-a-dir-that-is-not-a-run"))
    assert not ray.is_initialized(), "Ray was started for bad input"


def test_corrupted_adapter_safetensors(tmp_path):
    """The adapter loader (used for every trial's merge): corrupted, truncated or missing files."""
    from opmix_ray.engine.merge import AdapterError, load_lora_delta
    conf = json.dumps({"r": 4, "lora_alpha": 8})
    cases = {"garbage": b"\x00" * 64, "truncated": b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"}
    for name, blob in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(conf)
        (d / "adapter_model.safetensors").write_bytes(blob)
    (tmp_path / "missing").mkdir()
    for name in [*cases, "missing"]:
        with pytest.raises(AdapterError) as info:
            load_lora_delta(tmp_path / name)
        msg = " ".join(str(info.value).split())
        assert "adapter" in msg and "fix" in msg, msg


def test_subprocess_exit_code_and_no_traceback(tmp_path, good_data):
    """The installed `opmix-ray` script: exit 2, one stderr line, no traceback (run side by side)."""
    picks = {"malformed-yaml", "unknown-searcher", "wrong-column"}
    procs = []
    for name, field, build in CASES:
        if name in picks:
            tmp = tmp_path / name
            tmp.mkdir()
            argv = build(tmp, _base(tmp, good_data), good_data)
            env = dict(os.environ, PYTHONWARNINGS="ignore")
            procs.append((name, field, tmp, subprocess.Popen([str(OPMIX), *argv], stdout=subprocess.PIPE,
                                                             stderr=subprocess.PIPE, text=True, env=env)))
    assert len(procs) == len(picks)
    for name, field, tmp, p in procs:
        out, err = p.communicate(timeout=120)
        _check(p.returncode, out, err, field, tmp)


def test_overwrite_removes_a_marked_run_dir_and_says_what_it_removed(tmp_path, capsys):
    from opmix_ray.config import load_config
    from opmix_ray.engine.driver import _prepare_run_dir
    from opmix_ray.engine.preflight import check_storage
    cfg = load_config({"run": {"name": "r", "storage_path": str(tmp_path)}})
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / ".opmix_run").write_text("x")
    (run_dir / "history.json").write_text("{}")
    assert check_storage(cfg, overwrite=True) == run_dir.resolve()
    _prepare_run_dir(cfg, run_dir.resolve(), overwrite=True)
    assert sorted(p.name for p in run_dir.iterdir()) == [".opmix_run"]  # the new run's marker only
    assert f"--overwrite: removing the earlier run at {run_dir.resolve()}" in capsys.readouterr().out


GOOD_HISTORY = {"meta": {"domains": ["a"], "initial_mixture": {"a": 1.0}, "total_steps": 10}, "rounds": [], "final": None}


@pytest.mark.parametrize("history, summary, why", [
    (b"", None, "unreadable (JSONDecodeError)"), (b"{", None, "unreadable (JSONDecodeError)"),
    (b"\xff\xfe", None, "unreadable"), (b"{}", None, "has no 'meta' object"), (b"[]", None, "is a JSON list"),
    (b'{"meta": {"domains": ["a"], "initial_mixture": {"a": 1}}, "rounds": [{"weights": {}}]}', None,
     "rounds[0] has no round number"),
    (json.dumps(GOOD_HISTORY).encode(), b"{}", "summary.json: lacks"),
    (json.dumps(GOOD_HISTORY).encode(), b"[1]", "summary.json: is a JSON list"),
])
def test_damaged_history_or_summary_is_one_line_for_results_and_a_finding_for_check(history, summary, why, tmp_path,
                                                                                     capsys):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "history.json").write_bytes(history)
    if summary is not None:
        (run_dir / "summary.json").write_bytes(summary)
    assert main(["results", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0] and f"opmix-ray check {run_dir}" in err[0], err
    assert main(["check", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert why.split(": ")[-1] in out and "Traceback" not in out, out


def test_results_on_a_dir_without_history_is_bad_input(tmp_path, capsys):
    assert main(["results", str(tmp_path)]) == 2
    assert "no history.json" in capsys.readouterr().err


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_anything_is_written(tmp_path, good_data, capsys,
                                                                                    monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**20, 9 * 2**20, 2**20))
    rc = main(["run", _write(tmp_path, _base(tmp_path, good_data))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "1 MiB free and the run needs about" in err[0] and "fix" in err[0], err
    assert not (tmp_path / "runs").exists() and not ray.is_initialized()


def test_a_full_disk_inside_a_run_names_the_storage(tmp_path):
    import errno

    from opmix_ray.engine.faults import run_failed
    (tmp_path / "history.json").write_text("{}")
    exc = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "main" / "round_1" / "model.safetensors"))
    msg = str(run_failed(exc, "round 1: writing the round's files", tmp_path, str(tmp_path)))
    assert msg.startswith("round 1: writing the round's files failed: OSError:") and "No space left" in msg
    assert f"the storage at {tmp_path} is full" in msg and "model.safetensors" in msg and "opmix-ray resume" in msg


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_ends_the_wait_for_a_bucket_within_seconds(tmp_path, good_data, sig):
    """The installed CLI waiting on a gs:// bucket that never answers (the storage timeout set far
    longer than the test): the signal ends it at once, with the stop's one line and 128 + signal."""
    cfg = _base(tmp_path, good_data)
    cfg["run"]["storage_path"] = "gs://opmix-no-such-bucket/runs"
    env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
    env.update(PYTHONWARNINGS="ignore", OPMIX_RAY_STORAGE_TIMEOUT="300", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([str(OPMIX), "run", _write(tmp_path, cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        line = p.stdout.readline()  # printed once the wait passes 1 s: the probe is blocked by then
        assert "waiting for gs://opmix-no-such-bucket/runs to answer (up to 300 s; Ctrl-C stops)" in line, line
        t0 = time.time()
        p.send_signal(sig)
        out, err = p.communicate(timeout=10)
        took = time.time() - t0
    finally:
        p.kill()
    assert p.returncode == 128 + sig and took < 3, (p.returncode, took, err)
    assert f"opmix-ray: stopped by {signal.Signals(sig).name}" in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_an_object_store_that_never_answers_names_the_missing_credentials(tmp_path, monkeypatch):
    """An s3:// endpoint that accepts and never replies, and no AWS credentials anywhere: refused
    after the storage timeout, in one line that says where credentials would come from."""
    from opmix_ray.config import ConfigError, load_config
    from opmix_ray.engine.preflight import check_storage
    from opmix_ray.storage import STORAGE_TIMEOUT_ENV, missing_credentials
    for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
              "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv(STORAGE_TIMEOUT_ENV, "2")
    assert missing_credentials("s3://b/p").startswith("no AWS credentials found (set AWS_ACCESS_KEY_ID")
    assert missing_credentials("gs://b/p").startswith("no Google Cloud credentials found")
    assert missing_credentials("gs://b/p?anonymous=true") is None and missing_credentials("hdfs://h/p") is None
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(8)
    port = stalled.getsockname()[1]
    try:
        cfg = load_config({"run": {"name": "r", "storage_path": f"s3://b/runs?endpoint_override=127.0.0.1:{port}"
                                                               "&scheme=http&region=us-east-1"}})
        t0 = time.time()
        with pytest.raises(ConfigError) as info:
            check_storage(cfg, overwrite=False)
        took = time.time() - t0
    finally:
        stalled.close()
    msg = str(info.value)
    assert took < 6 and msg.startswith("config error at run.storage_path: ") and "\n" not in msg, (took, msg)
    assert "no AWS credentials found" in msg and "fix:" in msg, msg
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    assert missing_credentials("s3://b/p") is None
