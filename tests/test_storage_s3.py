"""run.storage_path as an s3:// URI, against a local moto S3 server (no network, no real AWS).

The storage layer (atomic writes, read back, listing, dir upload), preflight's probe and
used-dir rule, `opmix-ray results URI`, and one real tiny engine run whose history, summary,
round checkpoints and adapters must all land in the bucket.
"""
import json
import logging
import os
import re
import socket

import pytest
import ray
from pyarrow.fs import FileSelector

from opmix_ray.config import ConfigError, load_config
from opmix_ray.engine.preflight import check_storage
from opmix_ray.storage import STAGING_ENV, RunStore, is_file, join, read_json, remote_fs

BUCKET = "opmix-test"
TINY = os.path.join(os.path.dirname(__file__), "..", "opmix_ray", "configs", "tiny.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; yields the URI of s3://BUCKET/runs."""
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", STAGING_ENV: str(tmp_path_factory.mktemp("staging"))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # module scope: Ray workers started in this module inherit these
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    uri = f"s3://{BUCKET}/runs?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    remote_fs(f"s3://{BUCKET}?endpoint_override=127.0.0.1:{port}&scheme=http&allow_bucket_creation=true"
              )[0].create_dir(BUCKET)
    yield uri
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _cfg(uri, name, **search):
    return load_config(TINY, {"run": {"storage_path": uri, "name": name},
                              "search": {"searcher": "random", "warm_start": False, **search}})


def test_store_writes_locally_and_mirrors(s3, tmp_path):
    store = RunStore(tmp_path / "run", s3, "unit")
    store.write_json("history.json", {"a": 1})
    store.write_parquet("rounds/round_0_trials.parquet", [{"objective": 1.5, "mix_x": 0.5}, {"objective": 2.0}])
    store.write_yaml("config.yaml", {"run": {"name": "unit"}})
    store.write_json("history.json", {"a": 2})  # a rewrite replaces the object whole
    (tmp_path / "run" / "main" / "round_0" / "sub").mkdir(parents=True)
    (tmp_path / "run" / "main" / "round_0" / "model.safetensors").write_bytes(b"\0" * 3000)
    (tmp_path / "run" / "main" / "round_0" / "sub" / "x.json").write_text("{}")
    store.upload_dir("main/round_0")
    store.upload_dir("not/there")  # nothing to mirror: a no-op, not an error
    assert store.list_remote() == ["config.yaml", "history.json", "main/round_0/model.safetensors",
                                   "main/round_0/sub/x.json", "rounds/round_0_trials.parquet"]
    assert json.loads((tmp_path / "run" / "history.json").read_text()) == {"a": 2}
    assert read_json(join(store.location, "history.json")) == {"a": 2}
    assert store.location.startswith(f"s3://{BUCKET}/runs/unit")
    fs, root = remote_fs(s3)
    assert not [i for i in fs.get_file_info(FileSelector(root, recursive=True))
                if ".tmp" in i.path], "temp objects left behind"
    import pyarrow.parquet as pq
    with fs.open_input_file(f"{root}/unit/rounds/round_0_trials.parquet") as f:
        assert pq.read_table(f).num_rows == 2
    store.clear_remote()
    assert store.list_remote() == [] and not is_file(join(store.location, "history.json"))


def test_preflight_probe_and_used_dir(s3):
    cfg = _cfg(s3, "pre")
    staging = check_storage(cfg, overwrite=False)
    assert os.environ[STAGING_ENV] in str(staging) and staging.name == "pre"
    fs, root = remote_fs(s3)
    left = fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
    assert not [i.path for i in left if "probe" in i.path], "probe left behind"
    RunStore(staging, s3, "pre").write_json("summary.json", {})
    with pytest.raises(ConfigError, match=r"^config error at run.name: s3://opmix-test/runs/pre already holds a run .*--overwrite"):
        check_storage(cfg, overwrite=False)
    # a user's objects, not a run: --overwrite refuses to delete them
    with pytest.raises(ConfigError, match=r"--overwrite refused: .* not an opmix-ray run .*nothing was deleted"):
        check_storage(cfg, overwrite=True)
    RunStore(staging, s3, "pre").write_bytes(".opmix_run", b"x")  # what a run writes first
    check_storage(cfg, overwrite=True)
    RunStore(staging, s3, "pre").clear_remote()


@pytest.mark.parametrize("uri, why", [
    ("s3://no-such-bucket/runs?endpoint_override=127.0.0.1:{port}&scheme=http", "cannot write"),
    # a refused connection: the client's retries outlast the storage timeout, or fail first
    ("s3://b/runs?endpoint_override=127.0.0.1:1&scheme=http", "(cannot write|no answer from .* within)"),
    ("nosuch://b/runs", "not a URI pyarrow.fs can open"),
])
def test_preflight_rejects_unusable_uri(s3, uri, why):
    port = s3.split("127.0.0.1:")[1].split("&")[0]
    with pytest.raises(ConfigError) as e:
        check_storage(_cfg(uri.format(port=port), "x"), overwrite=False)
    msg = str(e.value)
    assert msg.startswith("config error at run.storage_path: ") and re.search(why, msg) and "(fix: " in msg
    assert "\n" not in msg


@pytest.mark.slow  # ~100 s on 2 shared cores: a full tiny run (2 rounds) plus the uploads
def test_engine_run_lands_in_bucket(s3, capsys):
    from opmix_ray.cli import main
    from opmix_ray.engine.driver import run
    ray.shutdown()  # a Ray started earlier would not have this module's AWS env in its workers
    cfg = _cfg(s3, "tiny-s3", num_samples=3)
    try:
        summary = run(cfg)
    finally:
        ray.shutdown()
    remote = RunStore(summary["run_dir"], s3, "tiny-s3")
    files = set(remote.list_remote())
    for name in ("history.json", "history.parquet", "summary.json", "config.yaml", "data_manifest.json",
                 "rounds/round_0_trials.parquet", "rounds/round_1_trials.parquet",
                 "main/round_0/model.safetensors", "main/round_1/model.safetensors",
                 "main/round_final/model.safetensors", "main/round_final/config.json", "mixture.png"):
        assert name in files, (name, sorted(files))
    for k in (0, 1):
        for d in ["old"] + json.load(open(os.path.join(summary["run_dir"], "history.json")))["meta"]["domains"]:
            for f in ("adapter_model.safetensors", "adapter_config.json", "opmix_meta.json"):
                assert f"adapters_round_{k}/adapters/{d}/{f}" in files
    hist = read_json(join(summary["run_uri"], "history.json"))
    assert len(hist["rounds"]) == 2 and hist["final"] is not None
    assert read_json(join(summary["run_uri"], "summary.json"))["final_val_loss"] == summary["final_val_loss"]
    # `opmix-ray results` reads the run back from the bucket
    capsys.readouterr()
    assert main(["results", join(s3, "tiny-s3")]) == 0
    out = capsys.readouterr().out
    assert "round 1" in out and "final mean val perplexity" in out
    # and the used run dir now needs --overwrite
    with pytest.raises(ConfigError, match="--overwrite"):
        check_storage(cfg, overwrite=False)
    _resume_from_the_bucket_alone(s3, summary, hist)


def _resume_from_the_bucket_alone(s3, summary, hist):
    """The driver's machine is gone with its staging dir; the bucket holds the run as it was after
    round 0's push. `opmix-ray resume s3://.../tiny-s3` fetches it and finishes the run there."""
    import shutil

    from opmix_ray.cli import main
    uri, remote = join(s3, "tiny-s3"), RunStore(summary["run_dir"], s3, "tiny-s3")
    remote.write_json("history.json", {**hist, "rounds": hist["rounds"][:1], "final": None})
    fs, root = remote_fs(uri)
    fs.delete_file(f"{root}/summary.json")
    for rel in ("main/round_1", "main/round_final", "adapters_round_1", "search_round_1"):
        fs.delete_dir(f"{root}/{rel}")
    shutil.rmtree(summary["run_dir"])
    ray.shutdown()
    try:
        assert main(["resume", uri]) == 0
    finally:
        ray.shutdown()
    again = read_json(join(uri, "history.json"))
    assert len(again["rounds"]) == 2 and again["final"] is not None
    assert again["rounds"][0] == hist["rounds"][0]  # round 0 kept as saved
    assert is_file(join(uri, "summary.json")) and is_file(join(uri, "main/round_final/model.safetensors"))
