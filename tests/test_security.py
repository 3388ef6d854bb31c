"""Security habits: nothing from storage is unpickled, YAML is safe_load'ed, and
local mode keeps Ray on 127.0.0.1 with no dashboard."""
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


def test_local_mode_binds_loopback_without_dashboard(monkeypatch):
    import ray

    from opmix_ray.config import load_config
    from opmix_ray.engine import driver as engine
    seen = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    engine.init_ray(load_config({}))
    assert seen.get("_node_ip_address") == "127.0.0.1" and seen.get("include_dashboard") is False
    assert "address" not in seen


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
