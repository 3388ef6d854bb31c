"""Domain-set changes on a live run (engine/domains.py: add, remove, revise, split): the sampler, shard and
collapse pieces in the default suite; a real run that gets changes mid-flight is `slow`.

    pytest tests/test_live_domains.py                 # seconds
    pytest -m slow tests/test_live_domains.py         # + a tiny run changed while it trains (~4 min)
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from opmix_ray.config import load_config
from opmix_ray.data.sampler import MixtureSampler
from opmix_ray.data.read import build_shards
from opmix_ray.data.shards import BUNDLED_DIR, DataError, revised_domain, with_domain, without_domain
from opmix_ray.engine.adapters import adapter_plan
from opmix_ray.engine.domains import arrive
from opmix_ray.mixture import Mixture

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "opmix_ray" / "configs" / "tiny.yaml"
CLI = [sys.executable, "-m", "opmix_ray.cli"]


def _cfg(domains=("bible", "dictionary", "python")):
    return load_config(TINY, {"data": {"domains": list(domains)}})


def test_sampler_added_domain_draws_as_if_listed_from_the_start():
    rng = np.random.default_rng(0)
    train = {d: rng.integers(0, 100, 5000) for d in "abcd"}
    full = MixtureSampler(train, Mixture.uniform("abcd"), 16, seed=7)
    late = MixtureSampler(train, Mixture.uniform("abc"), 16, seed=7)
    late.add_domain("d", train["d"])
    assert late.domains == ("a", "b", "c", "d") and late.drawn_total["d"] == 0
    late.set_mixture(Mixture.uniform("abcd"))
    a, _ = full.next_batch(32)
    b, _ = late.next_batch(32)
    np.testing.assert_array_equal(a, b)


def test_sampler_state_from_before_an_add_restores_with_the_new_domain_undrawn():
    rng = np.random.default_rng(1)
    train = {d: rng.integers(0, 100, 5000) for d in "abc"}
    s = MixtureSampler(train, Mixture.uniform("ab"), 16, seed=3)
    s.next_batch(8)
    meta, arrays = s.get_state()
    r = MixtureSampler(train, Mixture.uniform("abc"), 16, seed=3)
    r.set_state(meta, arrays)
    assert r.drawn_total["c"] == 0 and r.drawn_total["a"] == s.drawn_total["a"]
    assert r.mixture.as_dict()["c"] == 0.0


def test_with_domain_chains_the_hash_and_refuses_a_known_name():
    cfg = _cfg()
    sh = build_shards(cfg)
    more = with_domain(cfg, sh, "fortunes", BUNDLED_DIR / "fortunes.parquet")
    assert more.domains == (*sh.domains, "fortunes") and more.data_hash != sh.data_hash
    assert more.val["fortunes"].shape == sh.val["bible"].shape
    again = with_domain(cfg, sh, "fortunes", BUNDLED_DIR / "fortunes.parquet")
    assert again.data_hash == more.data_hash  # deterministic: a resumed run rebuilds the same shards
    with pytest.raises(DataError, match="already has a domain 'bible'"):
        with_domain(cfg, sh, "bible", BUNDLED_DIR / "fortunes.parquet")


def test_revise_and_remove_keep_the_domain_list_honest():
    cfg = _cfg()
    sh = build_shards(cfg)
    rev = revised_domain(cfg, sh, "python", BUNDLED_DIR / "manpages.parquet")
    assert rev.domains == sh.domains and rev.data_hash != sh.data_hash
    assert not np.array_equal(rev.val["python"], sh.val["python"])
    gone = without_domain(sh, "dictionary")
    assert gone.domains == ("bible", "python") and "dictionary" not in gone.train
    assert gone.eval_only == ("dictionary",) and "dictionary" in gone.val  # still scored
    with pytest.raises(DataError, match="no training domain 'nope'"):
        without_domain(sh, "nope")


def test_arrive_collapses_untouched_domains_and_zeroes_the_affected(tmp_path):
    cfg = _cfg()
    sh = build_shards(cfg)
    current = Mixture.from_dict({"bible": 0.5, "dictionary": 0.3, "python": 0.2})
    (tmp_path / "f.parquet").write_bytes((BUNDLED_DIR / "fortunes.parquet").read_bytes())
    (tmp_path / "m.parquet").write_bytes((BUNDLED_DIR / "manpages.parquet").read_bytes())
    changes = [{"op": "remove", "name": "dictionary"}, {"op": "add", "name": "fortunes", "file": "f.parquet"},
               {"op": "revise", "name": "python", "file": "m.parquet"}]
    before = cfg.model_dump()
    new, old, affected, stay = arrive(cfg, tmp_path, sh, current, changes)
    assert new.domains == ("bible", "python", "fortunes")
    # old = the untouched domains with their ratios frozen: only bible is left untouched
    assert old.as_dict() == {"bible": 1.0, "python": 0.0, "fortunes": 0.0}
    assert affected == ["fortunes", "python"]
    # the plan: 'old' plus the affected domains, from the argument; the user's config is untouched
    assert [n for n, _ in adapter_plan(old, cfg, affected)][:3] == ["old", "python", "fortunes"]
    assert cfg.model_dump() == before
    # staying does not ignore the new data: the revision keeps python's weight, and what arrived with a
    # removal takes the removed domain's place
    assert stay == pytest.approx({"bible": 0.5, "python": 0.2, "fortunes": 0.3})
    _, renorm, none, no_stay = arrive(cfg, tmp_path, sh, current, changes[:1])  # a removal alone: no search
    assert none == [] and no_stay is None
    assert renorm.as_dict() == pytest.approx({"bible": 0.5 / 0.7, "python": 0.2 / 0.7})
    _, _, _, stay = arrive(cfg, tmp_path, sh, current, changes[1:2])  # an arrival alone: 1/n of the mixture
    assert stay == pytest.approx({"bible": 0.375, "dictionary": 0.225, "python": 0.15, "fortunes": 0.25})


def test_a_stale_live_json_is_found_in_seconds_and_nothing_is_copied(tmp_path):
    """live.json left by a driver that died (kill -9): one line, exit 2, within 10 s, no file copied."""
    import socket
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    (tmp_path / "live.json").write_text(json.dumps({
        "gcs_address": f"127.0.0.1:{port}", "namespace": "x", "controller": "c", "host": socket.gethostname(),
        "node_ip": "127.0.0.1", "pid": dead.pid, "auth_mode": ""}))
    t0 = time.time()
    p = subprocess.run([*CLI, "add-domain", str(tmp_path), str(BUNDLED_DIR / "fortunes.parquet")],
                       capture_output=True, text=True, timeout=120)
    assert time.time() - t0 < 10 + 5  # + the interpreter's start
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"driver (pid {dead.pid}) is not running" in p.stderr and "opmix-ray resume" in p.stderr
    assert not (tmp_path / "added_domains").exists()


@pytest.mark.parametrize("cmd", [["add-domain", "F"], ["remove-domain", "bible"], ["revise-domain", "bible", "F"],
                                 ["split-domain", "bible", "F", "F"]])
def test_domain_commands_on_a_dir_that_is_not_live_are_one_line_exit_2(tmp_path, cmd):
    f = str(BUNDLED_DIR / "fortunes.parquet")
    p = subprocess.run([*CLI, cmd[0], str(tmp_path), *[f if a == "F" else a for a in cmd[1:]]],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "not a live run" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_domains_changed_in_a_live_run_join_at_the_next_round(tmp_path):
    """Run tiny on 3 domains; while it trains, add fortunes, then remove dictionary and revise
    python (new text). Each round that takes a change trains adapters only for the added or
    revised domains plus 'old'; the pushed mixtures carry them; the main run draws from them after
    the push without a restart; a removed domain is never drawn again and stays scored."""
    run_dir = tmp_path / "tiny"
    env = dict(os.environ, RAY_ADDRESS="")
    run = subprocess.Popen([*CLI, "run", str(TINY), "--set", f"run.storage_path={tmp_path}",
                            "--set", "data.domains=[bible, dictionary, python]", "--set", "search.searcher=random",
                            "--set", "search.warm_start=false"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while not (run_dir / "live.json").is_file():
            assert run.poll() is None and time.time() - t0 < 300, run.stdout.read()[-3000:]
            time.sleep(0.5)
        for args in (["add-domain", str(run_dir), str(BUNDLED_DIR / "fortunes.parquet")],
                     ["remove-domain", str(run_dir), "dictionary"],
                     ["revise-domain", str(run_dir), "python", str(BUNDLED_DIR / "manpages.parquet")]):
            p = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stdout + p.stderr
        out, _ = run.communicate(timeout=900)
    finally:
        run.kill()
    assert run.returncode == 0, out[-4000:]
    history = json.loads((run_dir / "history.json").read_text())
    done = [c for r in history["rounds"] for c in r.get("domain_changes", [])]
    assert done == ["add fortunes", "remove dictionary", "revise python"], history["rounds"]
    for r in history["rounds"]:
        if any(c != "remove dictionary" for c in r.get("domain_changes", [])):
            affected = {c.split()[1] for c in r["domain_changes"] if not c.startswith("remove")}
            assert set(r["adapter_weights"]) == {"old", *affected}  # the untouched domains collapsed
    assert history["meta"]["domains"] == ["bible", "python", "fortunes"]
    last = history["rounds"][-1]["weights"]
    assert "dictionary" not in last and last["fortunes"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"fortunes", "dictionary"} <= set(summary["final_val_loss"])  # the removed one is still scored
    assert summary["drawn_last_segment"]["dictionary"] == 0.0
    assert summary["drawn_last_segment"]["fortunes"] == pytest.approx(last["fortunes"], abs=0.05)
    assert not (run_dir / "live.json").exists()
    check = subprocess.run([*CLI, "check", str(run_dir)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout
    _resume_after_the_changes(run_dir, history, env)


def _resume_after_the_changes(run_dir: Path, history: dict, env: dict) -> None:
    """A copy of the run cut back to just after round 0's push (as if the driver died there) resumes
    across the live changes: the sampler keeps the removed domain at 0 and restarts the revised
    domain's stream, since its checkpoint predates them."""
    import shutil
    cut = run_dir.parent / "tiny-cut"
    shutil.copytree(run_dir, cut)
    first = next(r["round"] for r in history["rounds"] if r.get("domain_changes"))
    keep = [r for r in history["rounds"] if r["round"] <= first]
    (cut / "history.json").write_text(json.dumps({**history, "rounds": keep, "final": None}))
    (cut / "summary.json").unlink()
    for k in range(first + 1, len(history["rounds"])):
        for rel in (f"main/round_{k}", f"adapters_round_{k}", f"search_round_{k}"):
            shutil.rmtree(cut / rel)
    shutil.rmtree(cut / "main" / "round_final")
    p = subprocess.run([*CLI, "resume", str(cut)], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    again = json.loads((cut / "history.json").read_text())
    assert len(again["rounds"]) == len(history["rounds"]) and again["rounds"][first] == history["rounds"][first]
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["drawn_last_segment"]["dictionary"] == 0.0 and summary["drawn_last_segment"]["fortunes"] > 0
