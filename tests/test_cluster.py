"""A real two-node Ray cluster on this machine (loopback only): submit the tiny config through the
Jobs API with `opmix-ray submit`, check the results in storage and that the round's adapter jobs
and trials ran on both nodes. Run with `pytest -m cluster` (about 5 minutes on 2 cores).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.cluster
pytest.importorskip("aiohttp", reason="the Jobs API needs the dashboard: pip install 'ray[default]==2.60.0'")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = ROOT / "opmix_ray" / "configs" / "tiny.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(args, env, timeout=180):
    p = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"ray {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and a worker node, each with its own temp dir, both on 127.0.0.1; stopped after."""
    base = tmp_path_factory.mktemp("cluster")
    # Unix socket paths must stay short (< 108 bytes): Ray's temp dirs go under /tmp directly.
    head_tmp, worker_tmp = (Path(os.path.join("/tmp", f"opmix-{n}-{os.getpid()}")) for n in ("h", "w"))
    gcs, dash = _free_port(), _free_port()
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", RAY_TRAIN_V2_ENABLED="1",
               RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    started = []
    try:
        started.append(head_tmp)
        _ray(["start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
              "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
              "--ray-client-server-port", str(_free_port()), "--temp-dir", str(head_tmp),
              "--disable-usage-stats"], env)
        started.append(worker_tmp)
        _ray(["start", "--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1",
              "--num-cpus", "2", "--temp-dir", str(worker_tmp), "--disable-usage-stats"], env)
        yield {"address": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}", "env": env, "base": base}
    finally:
        # Not `ray stop`: it stops every Ray process of the user on the machine, other sessions'
        # too. Stop only this cluster's processes (found by their temp dirs), then remove the dirs.
        for t in reversed(started):
            _stop_node(t)
        for t in (worker_tmp, head_tmp):
            shutil.rmtree(t, ignore_errors=True)


def _stop_node(temp_dir: Path) -> None:
    """Kill the processes of one node, found by its session dir (ours only, by pid)."""
    import psutil
    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(temp_dir) in part for part in proc.info["cmdline"] or []):
                pids.add(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_submit_tiny_run_on_two_nodes(cluster):
    env, storage = cluster["env"], cluster["base"] / "runs"
    nodes = _node_ids(cluster)
    assert len(nodes) == 2, nodes
    cmd = [str(BIN / "opmix-ray"), "submit", str(TINY), "--address", cluster["address"],
           "--runtime-env", "cluster/runtime_env.yaml", "--submission-id", f"opmix-test-{os.getpid()}",
           "--set", f"run.storage_path={storage}", "--set", "search.searcher=random",
           "--set", "search.warm_start=false"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"submit failed ({p.returncode}):\n{p.stdout[-6000:]}\n{p.stderr[-3000:]}"
    assert "SUCCEEDED" in p.stdout
    run_dir = storage / "tiny"
    history = json.loads((run_dir / "history.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(history["rounds"]) == 2 and summary["run"] == "tiny"
    assert summary["final_val_ppl_mean"] > 1.0
    adapter_nodes = {json.loads(m.read_text())["node_id"]
                     for m in run_dir.glob("adapters_round_*/**/opmix_meta.json")}
    trial_nodes = set()
    for f in (run_dir / "rounds").glob("round_*_trials.parquet"):
        trial_nodes |= set(pq.read_table(f, columns=["node_id"]).column("node_id").to_pylist())
    print(f"nodes {sorted(nodes)}; adapters on {sorted(adapter_nodes)}; trials on {sorted(trial_nodes)}")
    assert adapter_nodes <= nodes and trial_nodes <= nodes
    assert adapter_nodes == nodes, "the adapter job did not use both nodes"
    assert adapter_nodes | trial_nodes == nodes


def _node_ids(cluster) -> set:
    code = ("import ray, json; ray.init(address='%s', log_to_driver=False); "
            "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))" % cluster["gcs"])
    p = subprocess.run([sys.executable, "-c", code], env=cluster["env"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return set(json.loads(p.stdout.strip().splitlines()[-1]))
