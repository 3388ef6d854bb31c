"""Bad input through the real CLI: one line on stderr naming the field and the fix, exit 2, no
traceback, nothing written, and Ray never started.

Each case builds its inputs in a fresh tmp dir from a valid base (a tiny config on two small
domains) and breaks one thing. The base itself is checked to pass validation, so no case can pass
because of some other error.
"""
import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from opmix_ray.cli import main
from opmix_ray.data.shards import BUNDLED_DIR

from inputs import OPMIX
from inputs import base_config as _base
from inputs import write_config as _write

TOKENIZER = BUNDLED_DIR / "tokenizer.json"


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


@pytest.fixture(scope="module")
def imported():
    """The modules a run loads on first use (torch, Ray, the data readers): imported before the
    first case, so its 10 s limit times the check and not the process's first imports."""
    import opmix_ray.data.read  # noqa: F401
    import opmix_ray.engine.driver  # noqa: F401


@pytest.mark.parametrize("name, field, build", CASES, ids=[c[0] for c in CASES])
def test_bad_input_in_process(name, field, build, tmp_path, good_data, capsys, imported):
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
