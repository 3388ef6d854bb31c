"""Security habits: nothing from storage is unpickled, YAML is safe_load'ed, local mode starts no
dashboard, and what local Ray listens on is what cluster/README.md says."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for d in ("opmix_ray", "search_spaces", "benchmarks", "scripts") if (ROOT / d).is_dir()
                 for p in (ROOT / d).rglob("*.py"))

# (what, pattern, why)
FORBIDDEN = [
    ("torch.load without weights_only=True", re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"),
     "use safetensors, or torch.load(..., weights_only=True)"),
    ("yaml.load", re.compile(r"\byaml\.(load|load_all|unsafe_load|full_load)\("), "use yaml.safe_load"),
    ("yaml.Loader", re.compile(r"\b(Unsafe|Full)?Loader\b(?<!SafeLoader)"), "use yaml.safe_load"),
    ("pickle.load", re.compile(r"\b(c?pickle|cloudpickle|dill|joblib)\.loads?\("), "store JSON or safetensors"),
    ("np.load with pickles", re.compile(r"allow_pickle\s*=\s*True"), "store arrays as .npy/.parquet without objects"),
    ("eval/exec", re.compile(r"(?<![\w.])(eval|exec)\("), "never evaluate text from config or storage"),
]


def test_sources_found():
    assert len(SOURCES) > 10 and any(p.as_posix().endswith("opmix_ray/engine/driver.py") for p in SOURCES)


@pytest.mark.parametrize("what, pattern, fix", FORBIDDEN, ids=[f[0] for f in FORBIDDEN])
def test_no_unsafe_deserialisation(what, pattern, fix):
    hits = []
    for p in SOURCES:
        for i, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code):
                hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, f"{what} ({fix}):\n" + "\n".join(hits)


# What local Ray (ray==2.60.0) really listens on, from the OS. Ray cannot be told to bind loopback
# only: ray.init replaces 127.0.0.1 by the machine's routable address, and its gRPC servers bind
# every interface. cluster/README.md ("What local mode listens on") says the same and how to
# firewall it; this test fails the day either changes, so the page cannot go stale.
WILDCARD = {"gcs_server", "raylet", "worker", "driver",  # listen on every interface (:: or 0.0.0.0)
            "monitor", "dashboard head", "ray::DashboardAgent"}  # these 3: only with ray[default] (cluster extra)
ROUTABLE = {"ray::RuntimeEnvAgent", "ray::DashboardAgent"}  # listen on the machine's routable address


def _kind(proc, driver_pid: int) -> str:
    name = proc.name()
    if proc.pid == driver_pid:
        return "driver"
    if name in ("gcs_server", "raylet") or name.startswith(("ray::RuntimeEnv", "ray::DashboardAgent")):
        return "ray::RuntimeEnvAgent" if name.startswith("ray::RuntimeEnv") else \
            "ray::DashboardAgent" if name.startswith("ray::DashboardAgent") else name
    if name.startswith("ray::"):
        return "worker"
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:
        return name
    if "default_worker.py" in cmd:  # a worker that has not renamed itself to ray::... yet
        return "worker"
    if "autoscaler/_private/monitor.py" in cmd:
        return "monitor"
    if "dashboard/dashboard.py" in cmd:  # started without its web UI (include_dashboard=False)
        return "dashboard head"
    return name


def test_what_local_mode_listens_on_is_what_the_docs_say(monkeypatch):
    import ipaddress

    import psutil
    import ray

    from opmix_ray.config import load_config
    from opmix_ray.engine import driver as engine
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    engine.init_ray(load_config({}))
    try:
        ray.get(ray.remote(lambda: 1).remote())  # a worker process too
        # local Ray's processes are this process's descendants (gcs_server, raylet, its workers)
        ours = {os.getpid()} | {c.pid for c in psutil.Process().children(recursive=True)}
        seen = {}
        for pid in ours:
            try:
                proc = psutil.Process(pid)
                listens = [c.laddr.ip for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                continue
            for ip in listens:
                if not ipaddress.ip_address(ip.split("%")[0]).is_loopback:
                    seen.setdefault(_kind(proc, os.getpid()), set()).add(ip)
    finally:
        ray.shutdown()
    assert not [k for k in seen if "dashboard" in k.lower() and k not in ("dashboard head", "ray::DashboardAgent")], seen
    wildcard = {k for k, ips in seen.items() if ips & {"::", "0.0.0.0"}}
    routable = {k for k, ips in seen.items() if ips - {"::", "0.0.0.0"}}
    assert {"gcs_server", "raylet"} <= wildcard <= WILDCARD, seen
    assert routable <= ROUTABLE, seen


def test_inside_a_ray_job_joins_the_cluster(monkeypatch):
    """A submitted job gets RAY_ADDRESS from Ray: the run joins that cluster, never starts its own."""
    import ray

    from opmix_ray.config import load_config
    from opmix_ray.engine import driver as engine
    seen = {}
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    engine.init_ray(load_config({}))
    assert seen.get("address") == "127.0.0.1:6379" and "num_cpus" not in seen
