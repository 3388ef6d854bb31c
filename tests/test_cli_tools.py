"""The CLI's small tools: --version, init, config-help as YAML, KEY=VALUE after the config, results
on bench and continual output dirs, and demo refusing to replace an earlier demo. None starts Ray."""
import json
import shutil
from pathlib import Path

import pytest
import yaml

import opmix_ray
from opmix_ray.cli.main import build_parser, main
from opmix_ray.cli.config_doc import config_help
from opmix_ray.config import load_config
from opmix_ray.experiments.experiment_config import ExperimentConfig, load_experiment_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "opmix_ray" / "configs" / "tiny.yaml"
RESULTS = ROOT / "benchmarks" / "results"


def test_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"opmix-ray {opmix_ray.__version__}" and out != "opmix-ray unknown (not installed)"


def test_config_help_is_yaml_that_loads_as_the_default_config():
    text = config_help()
    assert load_config(yaml.safe_load(text)) == load_config({})
    assert "  lr_schedule: current" in text and "# 'current' | 'peak'." in text  # types beside defaults
    assert "None" not in text and "True" not in text  # YAML's null / true, not Python reprs
    exp = config_help(ExperimentConfig)
    assert load_experiment_config(yaml.safe_load(exp)) == load_experiment_config({})


def test_init_writes_a_commented_default_config_and_never_replaces_a_file(tmp_path, capsys):
    path = tmp_path / "my.yaml"
    assert main(["init", str(path)]) == 0
    text = path.read_text()
    assert text.startswith("# opmix-ray config") and load_config(path) == load_config({})
    path.write_text("run: {name: mine}\n")
    assert main(["init", str(path)]) == 2
    assert path.read_text() == "run: {name: mine}\n"  # what the user owns stays
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "fix:" in err[0]
    assert main(["init", str(tmp_path / "exp.yaml"), "--experiments"]) == 0
    assert load_experiment_config(tmp_path / "exp.yaml").bench.seeds == [0, 1, 2]


def test_key_value_after_the_config_overrides_like_set(monkeypatch):
    import importlib
    cli = importlib.import_module("opmix_ray.cli.main")
    seen, parser = [], build_parser()
    for name in ("run", "bench"):  # the commands record what they would load, and start nothing
        parser._subparsers._group_actions[0].choices[name].set_defaults(fn=lambda a: seen.append(cli._sets(a)) or 0,
                                                                       stoppable=False)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert main(["run", str(TINY), "main.lr=0.5", "--set", "main.lr=0.1", "run.seed=3"]) == 0
    assert main(["bench", str(TINY), "bench.seeds=[4]", "--out", "x"]) == 0
    # KEY=VALUE wins over --set; a pair may come before or after the options
    assert seen == [{"main": {"lr": 0.5}, "run": {"seed": 3}}, {"bench": {"seeds": [4]}}]


def test_a_bad_key_value_after_the_config_is_one_line_exit_2(capsys):
    assert main(["run", str(TINY), "main.lr=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("opmix-ray: error: config error at main.lr:")
    assert main(["run", str(TINY), "not-a-pair"]) == 2
    assert "expected key=value" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["archive/2026-12-05/results/bench_stay", "results/continual"])
def test_results_reads_bench_and_continual_output_dirs(kind, tmp_path, capsys):
    out = tmp_path / kind.rsplit("/", 1)[1]
    out.mkdir()
    shutil.copy(RESULTS.parent / kind / "results.json", out / "results.json")
    assert main(["results", str(out)]) == 0
    text = capsys.readouterr().out
    # bench compares to uniform; continual to uniform over the seen domains
    assert "| " in text and ("| uniform |" if "bench" in kind else "| uniform-seen |") in text
    assert main(["results", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((out / "results.json").read_text())
    (out / "results.json").write_text('{"rows": []}')
    assert main(["results", str(out)]) == 2
    assert "not written by bench or continual" in capsys.readouterr().err


def test_demo_refuses_to_replace_an_earlier_demo(tmp_path, capsys):
    earlier = tmp_path / "demo-uniform"  # only the baseline's dir is there: still refused, before any training
    earlier.mkdir()
    (earlier / ".opmix_run").write_text("")
    (earlier / "history.json").write_text("{}")
    assert main(["demo", "--storage-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err
    assert not (tmp_path / "demo").exists() and (earlier / "history.json").read_text() == "{}"
