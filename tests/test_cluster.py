"""A real two-node Ray cluster on this machine (loopback only): submit the tiny config through the
Jobs API with `opmix-ray submit`, check the results in storage and that the round's adapter jobs
and trials ran on both nodes; then kill -9 the worker node in the middle of a second run and
check the job finishes or fails with the one-line resume message, storage stays whole, and
`opmix-ray resume` (submitted as a job) finishes it. Before those, the README's `ray job submit`
line runs on a fresh cluster 5 times (OPMIX_CLUSTER_SUBMITS), and every job must succeed. Run with
`pytest -m cluster` (about 13 minutes on 2 cores). The tests run in file order: the last one takes
the worker node down.
"""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
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


@contextlib.contextmanager
def two_nodes(base: Path, tag: str = ""):
    """A head and a worker node, each with its own temp dir, both on 127.0.0.1; stopped after."""
    # Unix socket paths must stay short (< 108 bytes): Ray's temp dirs go under /tmp directly.
    head_tmp, worker_tmp = (Path(os.path.join("/tmp", f"opmix-{n}{tag}-{os.getpid()}")) for n in ("h", "w"))
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
        yield {"address": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}", "env": env, "base": base,
               "worker_tmp": worker_tmp}
    finally:
        # Not `ray stop`: it stops every Ray process of the user on the machine, other users'
        # too. Stop only this cluster's processes (found by their temp dirs), then remove the dirs.
        for t in reversed(started):
            _stop_node(t)
        for t in (worker_tmp, head_tmp):
            shutil.rmtree(t, ignore_errors=True)


# The README's own `ray job submit` line, each time on a cluster started for it: the first job on a
# fresh cluster is where a "No such file or directory" was once met by hand. 5 by default.
FRESH_SUBMITS = int(os.environ.get("OPMIX_CLUSTER_SUBMITS", "5"))


def test_the_readme_job_succeeds_on_fresh_clusters_again_and_again(tmp_path):
    walls = []
    for i in range(FRESH_SUBMITS):
        storage = tmp_path / f"runs_{i}"
        with two_nodes(tmp_path, tag=f"r{i}") as c:
            assert len(_node_ids(c)) == 2
            t0 = time.time()
            p = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", c["address"],
                                "--runtime-env", "cluster/runtime_env.yaml", "--submission-id",
                                f"opmix-fresh-{i}-{os.getpid()}", "--", "python", "-m", "opmix_ray.cli", "run",
                                str(TINY.relative_to(ROOT)), "--set", f"run.storage_path={storage}",
                                "--set", "search.searcher=random"],
                               cwd=ROOT, env=c["env"], capture_output=True, text=True, timeout=900)
            walls.append(time.time() - t0)
            assert p.returncode == 0 and f"'opmix-fresh-{i}-{os.getpid()}' succeeded" in p.stdout, \
                f"job {i + 1} of {FRESH_SUBMITS} failed ({p.returncode}):\n{p.stdout[-6000:]}\n{p.stderr[-3000:]}"
        assert "Failed to fetch metrics" not in p.stdout  # every trial dir has its result.json
        summary = json.loads((storage / "tiny" / "summary.json").read_text())
        assert summary["final_val_ppl_mean"] > 1.0
    print(f"{FRESH_SUBMITS} jobs on fresh clusters, all SUCCEEDED; submit-to-end {[round(w) for w in walls]} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with two_nodes(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def _stop_node(temp_dir: Path, hard: bool = False) -> None:
    """Stop the processes of one node, found by its Ray temp dir (ours only, by pid); hard: SIGKILL
    all of them at once, as a machine that vanishes would."""
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
            p.kill() if hard else p.terminate()
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


def _wait_job(client, job_id: str, until, timeout: float, what: str) -> str:
    """Poll the job's logs until until(logs, status) is true; return the logs."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        status, logs = str(client.get_job_status(job_id).value), client.get_job_logs(job_id)
        if until(logs, status):
            return logs
        assert status not in TERMINAL or what == "the end", f"job {status} before {what}:\n{logs[-4000:]}"
        time.sleep(1.0)
    raise AssertionError(f"no {what} after {timeout:.0f}s:\n{logs[-4000:]}")


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
KILL_AFTER_S = 5.0  # after "round 0: training": inside the adapter job, whose workers use both nodes


def test_worker_node_killed_mid_run(cluster):
    from ray.job_submission import JobSubmissionClient
    env, storage, client = cluster["env"], cluster["base"] / "killed", JobSubmissionClient(cluster["address"])
    job = f"opmix-kill-{os.getpid()}"
    cmd = [str(BIN / "opmix-ray"), "submit", str(TINY), "--address", cluster["address"], "--no-wait",
           "--runtime-env", "cluster/runtime_env.yaml", "--submission-id", job,
           "--set", f"run.storage_path={storage}", "--set", "search.searcher=random",
           "--set", "search.warm_start=false"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _wait_job(client, job, lambda logs, st: "round 0: training" in logs, 400, "round 0")
    time.sleep(KILL_AFTER_S)
    _stop_node(cluster["worker_tmp"], hard=True)
    logs = _wait_job(client, job, lambda logs, st: st in TERMINAL, 600, "the end")
    status, run_dir = str(client.get_job_status(job).value), storage / "tiny"
    last = [ln for ln in logs.splitlines() if ln.strip()][-1]
    print(f"job after the worker node died: {status}; last line: {last}")
    rerun = "died under the adapter job" in logs
    if status == "FAILED":
        assert last.startswith("opmix-ray: error: the run lost Ray node(s)") and "opmix-ray resume" in last, logs[-4000:]
    else:
        assert status == "SUCCEEDED" and rerun, f"the job never noticed the lost node:\n{logs[-4000:]}"
    _assert_whole(run_dir, env)
    if status == "FAILED":  # continue it on what is left of the cluster, as the message says
        resumed = client.submit_job(entrypoint=f"{BIN / 'opmix-ray'} resume {run_dir}",
                                    submission_id=f"{job}-resume")
        logs = _wait_job(client, resumed, lambda logs, st: st in TERMINAL, 600, "the end")
        assert str(client.get_job_status(resumed).value) == "SUCCEEDED", logs[-4000:]
        _assert_whole(run_dir, env)
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history["rounds"]) == 2 and history["final"] is not None
    assert (run_dir / "summary.json").is_file()


def _assert_whole(run_dir: Path, env) -> None:
    p = subprocess.run([str(BIN / "opmix-ray"), "check", str(run_dir)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, f"storage not whole after the node died:\n{p.stdout}{p.stderr}"
