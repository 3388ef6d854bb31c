"""Fault tolerance of a round's search, through the real Ray Tune search in opmix_ray/engine/search.py.

- a candidate whose merged model scores NaN is recorded failed and the search goes on;
- a trial worker killed with SIGKILL mid-search is rerun (FailureConfig), and a trial Tune gives up
  on is scored again after the search (engine/rerun.py; slow, as its batched case in
  test_trial_batch.py): no candidate is lost.

The candidates are synthetic (a small Llama, hand-made LoRA deltas, random val windows) so each
test costs one Tune run, not a whole OP-Mix run; everything else is the production code path.
"""
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import ray

from opmix_ray.config import ModelSection, load_config
from opmix_ray.engine.candidates import Candidates
from opmix_ray.engine.search import TRIAL_RETRIES, run_search
from opmix_ray.mixture import Mixture
from opmix_ray.model import build_model
from opmix_ray.ray_init import init_ray

TINY = os.path.join(os.path.dirname(__file__), "..", "opmix_ray", "configs", "tiny.yaml")
DOMAINS = ("a", "b")
COORDS = ("old", "a", "b")
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")


def _cfg(tmp, **search):
    return load_config(TINY, {"run": {"storage_path": str(tmp)},
                              "search": {"warm_start": False, "max_concurrent": 2, **search}})


def _candidates(key: str, n_val: int, poison: str | None = None, hidden: int = 32) -> Candidates:
    """Candidates over {old, a, b}; `poison`'s delta is 1e38 everywhere, so any merge that gives it
    weight > 0 overflows to a NaN loss, while one that gives it exactly 0 is untouched."""
    model = build_model(ModelSection(hidden_size=hidden, num_layers=2, num_heads=2, intermediate_size=2 * hidden),
                        vocab_size=128, seq_len=16, seed=0)
    shapes = {m: tuple(model.get_submodule(m).weight.shape) for m in MODULES}
    rng = np.random.default_rng(0)
    stacked = {m: np.stack([np.full(s, 1e38, np.float32) if c == poison else
                            rng.normal(0, 0.02, s).astype(np.float32) for c in COORDS]) for m, s in shapes.items()}
    val = {d: rng.integers(0, 128, size=(n_val, 17)).astype(np.int32) for d in DOMAINS}
    base = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return Candidates(key, COORDS, model.config.to_dict(), base, stacked, val, Mixture.uniform(DOMAINS),
                      None, None)


@pytest.fixture
def tune_grids(monkeypatch) -> list:
    """The ResultGrid of every Tuner.fit in the test (a wrapper: fit itself runs unchanged)."""
    from ray import tune
    grids, fit = [], tune.Tuner.fit

    def spy(self):
        grids.append(fit(self))
        return grids[-1]
    monkeypatch.setattr(tune.Tuner, "fit", spy)
    return grids


@pytest.fixture(scope="module", autouse=True)
def local_ray(tmp_path_factory):
    ray.shutdown()
    init_ray(_cfg(tmp_path_factory.mktemp("x")))
    yield
    ray.shutdown()


def test_nan_objective_is_recorded_failed_and_search_goes_on(tmp_path, tune_grids):
    # The lattice at resolution 2 over {old, a, b}: 6 points, 3 with b = 0 (finite) and 3 with
    # b > 0 (NaN). num_samples = 6 runs every point once.
    cfg = _cfg(tmp_path, searcher="grid", searcher_options={"resolution": 2}, num_samples=6)
    out = run_search(cfg, _candidates("nan", n_val=8, poison="b"), 0, str(tmp_path))
    assert out.n_trials == 6 and out.n_failed == 3 and len(out.trials) == 3
    assert np.isfinite(out.objective) and out.weights["b"] == 0.0 and out.n_retried == 0  # NaN is no crash
    assert out.n_rescored == 0  # a NaN objective is a result: it is not scored again
    assert all(np.isfinite(t["objective"]) and t["a_b"] == 0.0 for t in out.trials)
    # the 3 poisoned candidates really ran and reported a NaN objective (a result, not a crash)
    (grid,) = tune_grids
    assert len(grid) == 6 and not grid.errors
    nan = [r.metrics for r in grid if not np.isfinite(r.metrics["objective"])]
    assert len(nan) == 3 and all(m["a_b"] > 0 for m in nan)


def ray_actor_pids(title: str) -> list[int]:
    """pids of this process's Ray actor processes whose title starts with `title` (Ray names an
    actor's process ray::<ClassName>..., e.g. ray::ImplicitFunc for Tune's function trainables)."""
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.cmdline() and p.cmdline()[0].startswith(title):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


def kill_when_busy(victim: str = "ray::ImplicitFunc", after: float = 1.0) -> tuple[threading.Thread, list[int]]:
    """A thread that waits for the first trial worker (ray::ImplicitFunc) to appear, gives it `after`
    seconds to start scoring, then SIGKILLs the first process titled `victim` (the trial itself, or
    a pooled scorer it leases); returns the thread and the killed pid, once killed."""
    killed: list[int] = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if ray_actor_pids("ray::ImplicitFunc"):
                time.sleep(after)
                pids = ray_actor_pids(victim)
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    return t, killed


def _kill_one_trial_worker() -> tuple[threading.Thread, list[int]]:
    return kill_when_busy("ray::ImplicitFunc", after=1.0)


def _no_candidate_lost(out, grids, n=6):
    """Every candidate has its result, each once; a trial Tune gave up on was scored by the rerun."""
    assert out.n_trials == n and out.n_failed == 0 and len(out.trials) == n, (out.n_trials, out.n_failed)
    assert len({tuple(round(t[f"a_{c}"], 12) for c in COORDS) for t in out.trials}) == n
    first = grids[0]
    assert len(first) == n and len(first.errors) == out.n_rescored
    if out.n_rescored:  # the second, small Tuner: the dead trials' candidates, scored
        assert len(grids) == 2 and len(grids[1]) == out.n_rescored and not grids[1].errors
    else:
        assert len(grids) == 1


def test_sigkill_of_a_trial_worker_is_retried_and_costs_no_candidate(tmp_path, tune_grids):
    cfg = _cfg(tmp_path, searcher="random", num_samples=6)
    # enough validation windows that a trial scores for ~1.6 s (one thread): with 400 the whole
    # search could end within the killer's 1 s wait on an idle machine, and there was nothing to kill
    cands = _candidates("kill", n_val=4000, hidden=64)
    t, killed = _kill_one_trial_worker()
    out = run_search(cfg, cands, 0, str(tmp_path))
    t.join(timeout=5)
    assert killed, "no trial worker was found to kill"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    # Tune reran the killed trial on a fresh actor. Ray Tune 2.60 can count one death twice (a
    # second ActorDiedError from the dead actor marks the pending rerun ERROR): then the candidate
    # is scored by engine/rerun.py after the search. Either way no candidate is lost.
    assert out.n_retried >= 1, "the kill did not cost a trial: it did not test anything"
    _no_candidate_lost(out, tune_grids)
    assert TRIAL_RETRIES >= 1


@pytest.mark.slow  # ~35 s: the default suite keeps the killed trial's rerun above
def test_a_trial_tune_gives_up_on_is_scored_again_after_the_search(tmp_path, tune_grids, monkeypatch):
    """What a death counted twice leaves, made certain: with no retries in Tune, the killed trial
    ends in ERROR, and its candidate is scored by the second Tuner in search_round_0/rerun."""
    from opmix_ray import rundir
    from opmix_ray.engine import search
    monkeypatch.setattr(search, "TRIAL_RETRIES", 0)
    cfg = _cfg(tmp_path, searcher="random", num_samples=6)
    t, killed = _kill_one_trial_worker()
    out = run_search(cfg, _candidates("give-up", n_val=4000, hidden=64), 0, str(tmp_path))
    t.join(timeout=5)
    assert killed and out.n_retried == 0 and out.n_rescored == 1, (killed, out.n_retried, out.n_rescored)
    _no_candidate_lost(out, tune_grids)
    assert (tmp_path / rundir.search_rerun(0)).is_dir()


def test_lost_node_ends_the_cli_with_one_line_and_exit_3(monkeypatch, capsys, tmp_path):
    """What a job's log ends with when a node died under the run (engine/faults.py); the multi-node
    test (pytest -m cluster) provokes it for real by killing the worker node."""
    from opmix_ray import cli, errors
    from opmix_ray.engine import driver as engine
    from opmix_ray.engine.faults import interrupted

    def dies(cfg, overwrite=False):
        raise interrupted({"94593ee324139e8f"}, "round 1", str(tmp_path), RuntimeError("worker died"))
    monkeypatch.setattr(engine, "run", dies)
    assert cli.main(["run", TINY, "--set", f"run.storage_path={tmp_path}"]) == errors.EXIT_INTERRUPTED == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("opmix-ray: error: the run lost Ray node(s) 94593ee32413 during round 1")
    assert f"opmix-ray resume {tmp_path}" in err[0]


def test_check_finds_a_truncated_artifact_and_a_leftover_temp_file(tmp_path):
    from opmix_ray.cli.check import check_run_dir
    from opmix_ray.storage import write_json
    write_json(tmp_path / "history.json", {"meta": {"domains": ["a"], "initial_mixture": {"a": 1.0}}, "rounds": [], "final": None})
    assert check_run_dir(tmp_path) == []
    (tmp_path / "summary.json").write_text('{"run": "x", "final_val')  # a torn write
    (tmp_path / ".history.json.tmp123").write_text("{")
    problems = check_run_dir(tmp_path)
    assert any(p.startswith("summary.json: unreadable") for p in problems)
    assert any("temp file of an interrupted write" in p for p in problems)


def test_adapter_job_is_rerun_once_when_a_node_died_under_it(monkeypatch, tmp_path):
    """The retry rule in adapters.train_adapters (the multi-node test can only provoke it when Ray
    happens to place the main run on the surviving node): a failure while a node went missing is
    rerun once from scratch; a failure with every node alive is raised at once."""
    from types import SimpleNamespace

    from opmix_ray.engine import adapters
    cfg = load_config(TINY)
    current = Mixture.uniform(("bible", "dictionary"))
    calls = []

    def fit(cfg, shards_ref, base, plan, k, run_dir, lr):
        calls.append(k)
        (tmp_path / f"adapters_round_{k}").mkdir(exist_ok=True)
        if len(calls) == 1:
            raise RuntimeError("WorkerGroupError: an adapter worker died")
        root = tmp_path / "ckpt"
        for name, _ in plan:
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / "adapter_model.safetensors").write_bytes(b"x")
        return SimpleNamespace(error=None, checkpoint=SimpleNamespace(path=str(root)))
    monkeypatch.setattr(adapters, "_fit_adapters", fit)
    monkeypatch.setattr(adapters, "alive_nodes", lambda: {"head", "worker"})
    monkeypatch.setattr(adapters, "lost_since", lambda nodes: {"worker"})
    dirs = adapters.train_adapters(cfg, None, "base", current, 0, str(tmp_path))
    assert calls == [0, 0] and set(dirs) == {"old", "bible", "dictionary", "old#2"}
    monkeypatch.setattr(adapters, "lost_since", lambda nodes: set())  # no node lost: a real bug
    calls.clear()
    with pytest.raises(RuntimeError, match="an adapter worker died"):
        adapters.train_adapters(cfg, None, "base", current, 1, str(tmp_path))
    assert calls == [1]


@pytest.mark.slow  # ~60 s, a whole run: the default suite keeps the other one-line failures
def test_an_internal_file_not_found_in_a_run_exits_1_with_the_step_the_file_and_the_log(monkeypatch, capsys,
                                                                                        tmp_path):
    """A failure inside a run is not bad input: exit 1, one line with the step, the file and where the
    traceback went; the run dir keeps what was saved, so `opmix-ray resume` can continue it."""
    import ray

    from opmix_ray import cli
    from opmix_ray.engine import driver

    def lost_file(*a, **kw):
        raise FileNotFoundError(2, "No such file or directory", "/nonexistent/experiment_state.json")
    monkeypatch.setattr(driver, "run_search", lost_file)
    try:
        rc = cli.main(["run", TINY, "--set", f"run.storage_path={tmp_path}", "--set", "run.name=fails"])
    finally:
        ray.shutdown()
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("opmix-ray: error:")]
    log = (tmp_path / "fails" / "error.log").resolve()
    assert rc == 1 and len(ours) == 1, ours
    assert ours[0].startswith("opmix-ray: error: round 0: the search failed: FileNotFoundError"), ours[0]
    assert "file /nonexistent/experiment_state.json" in ours[0] and f"full traceback: {log}" in ours[0], ours[0]
    assert "opmix-ray resume" in ours[0]
    text = log.read_text()
    assert "Traceback" in text and "lost_file" in text
