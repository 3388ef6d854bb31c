"""load_config: every bad input is a one-line ConfigError that names the field and the fix."""
import math
from pathlib import Path

import pytest
import yaml

import opmix_ray
from opmix_ray.cli.config_doc import config_help
from opmix_ray.config import Config, ConfigError, load_config
from opmix_ray.experiments.experiment_config import ExperimentConfig, load_experiment_config

CONFIGS = sorted((Path(opmix_ray.__file__).parent / "configs").glob("*.yaml"))


def _error(source, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith("config error at "), msg
    assert "fix" in msg, msg
    return msg


def test_defaults_and_dict_and_overrides():
    cfg = load_config({})
    assert isinstance(cfg, Config) and cfg.data.seq_len == 128 and cfg.adapters.r == 16
    cfg = load_config({"main": {"batch_size": 8}, "adapters": {"r": 4}}, overrides={"main": {"lr": 1e-3}})
    assert cfg.main.batch_size == 8 and cfg.main.lr == 1e-3 and cfg.adapters.r == 4
    assert load_config({"main": {"batch_size": 8}}, {"main": {"batch_size": 4}}).main.batch_size == 4


def test_yaml_file_round_trip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  name: t\nmodel:\n  hidden_size: 64\n  num_heads: 2\nsearch:\n  objective_weights: {a: 1.0}\n")
    cfg = load_config(p)
    assert cfg.run.name == "t" and cfg.model.hidden_size == 64 and cfg.search.objective_weights == {"a": 1.0}
    p2 = tmp_path / "again.yaml"
    p2.write_text(cfg.to_yaml())
    assert load_config(str(p2)) == cfg


@pytest.mark.parametrize("raw, where", [
    ({"runn": {"name": "x"}}, "config error at runn:"),
    ({"run": {"nmae": "x"}}, "config error at run.nmae:"),
    ({"adapters": {"rank": 8}}, "config error at adapters.rank:"),
    ({"data": {"seq_len": 64, "max_epoch": {"a": 1}}}, "config error at data.max_epoch:"),
])
def test_unknown_keys_name_the_dotted_field(raw, where):
    msg = _error(raw)
    assert msg.startswith(where) and "unknown key" in msg


@pytest.mark.parametrize("raw, where", [
    ({"main": {"batch_size": "sixteen"}}, "main.batch_size"),
    ({"main": {"batch_size": 16.5}}, "main.batch_size"),
    ({"main": {"lr": [0.1]}}, "main.lr"),
    ({"model": {"device": "tpu"}}, "model.device"),
    ({"data": {"domains": "python"}}, "data.domains"),
    ({"data": {"max_epochs": [1, 2]}}, "data.max_epochs"),
    ({"run": "tiny"}, "run"),
    ({"adapters": {"include_old": "perhaps"}}, "adapters.include_old"),
])
def test_wrong_types(raw, where):
    assert _error(raw).startswith(f"config error at {where}:")


@pytest.mark.parametrize("raw, where, words", [
    ({"model": {"hidden_size": 30, "num_heads": 4}}, "model", "num_heads"),
    ({"main": {"total_tokens": 1000}}, "<root>", "main.total_tokens"),
    ({"main": {"total_tokens": 16 * 128 * 5}, "rounds": {"num_rounds": 3}}, "<root>", "main.total_tokens"),
    ({"data": {"max_epochs": {"python": -1.0}}}, "data.max_epochs", "max_epochs[python]"),
    ({"data": {"max_epochs": {"python": 0}}}, "data.max_epochs", "max_epochs[python]"),
    ({"data": {"max_epochs": {"python": math.nan}}}, "data.max_epochs.python", "finite number"),
    ({"data": {"default_max_epochs": -2}}, "data.default_max_epochs", ""),
    ({"search": {"objective_weights": {"a": -1.0}}}, "<root>", "search.objective_weights"),
    ({"search": {"objective_weights": {"a": math.nan, "b": 1.0}}}, "search.objective_weights.a", "finite number"),
    ({"search": {"objective_weights": {"a": math.inf}}}, "search.objective_weights.a", "finite number"),
    ({"search": {"objective_weights": {"a": 0.0}}}, "<root>", "search.objective_weights"),
    ({"search": {"objective_weights": {"a": 0.0}}}, "<root>", "search.objective_weights"),
    ({"search": {"max_concurrent": 0}}, "search.max_concurrent", ""),
    ({"data": {"seq_len": 7}}, "data.seq_len", ""),
    ({"rounds": {"uniform_prefix": 1.0}}, "rounds.uniform_prefix", ""),
    ({"adapters": {"probe_domain_share": 0}}, "adapters.probe_domain_share", ""),
])
def test_bad_values(raw, where, words):
    msg = _error(raw)
    assert msg.startswith(f"config error at {where}:") and words in msg


def test_enough_tokens_for_rounds_is_accepted():
    # 16 * 128 * 4 tokens = 4 steps = exactly 2 per round for 2 rounds
    load_config({"main": {"total_tokens": 16 * 128 * 4}})
    _error({"main": {"total_tokens": 16 * 128 * 4 - 1}})


def test_several_errors_are_counted_on_one_line():
    msg = _error({"main": {"batch_size": 0, "lr": -1}})
    assert msg.endswith("[+1 more]")


def test_yaml_nan_objective_weight(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("search:\n  objective_weights:\n    python: .nan\n")
    assert "search.objective_weights" in _error(p)


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("run:\n  name: x\n main: [1, 2\n")
    assert _error(p).startswith("config error at <yaml> line ")


def test_yaml_list_is_rejected(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- run\n- main\n")
    assert _error(p).startswith("config error at <root>:")


def test_missing_file(tmp_path):
    assert _error(tmp_path / "nope.yaml").startswith("config error at <file>:")
    assert _error(str(tmp_path)).startswith("config error at <file>:")  # a dir is not a config


def test_an_empty_config_file_is_refused_not_a_default_run(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing\n")
    assert _error(p).startswith(f"config error at <file>: {p} is empty")
    assert load_config({}) == Config()  # a dict is the programmatic way to ask for the defaults


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("run: {name: a}\nmain: {lr: 0.1}\nmain: {batch_size: 4}\n")
    assert _error(p).startswith("config error at <yaml> line 3: 'main' is given twice")
    p.write_text("run:\n  <<: {name: q, seed: 3}\n  seed: 4\n")  # a merge key overridden: plain YAML
    assert load_config(p).run.seed == 4


@pytest.mark.parametrize("raw, where", [
    ({"main": {"lr": math.inf}}, "main.lr"), ({"adapters": {"alpha": math.inf}}, "adapters.alpha"),
    ({"decision": {"k": math.nan}}, "decision.k"), ({"main": {"batch_size": True}}, "main.batch_size"),
    ({"search": {"num_samples": False}}, "search.num_samples"), ({"run": {"seed": -1}}, "run.seed"),
    ({"run": {"seed": 2**32}}, "run.seed"), ({"run": {"name": "a\x00b"}}, "run.name"),
    ({"run": {"name": "../x"}}, "run.name"), ({"run": {"name": "a/b"}}, "run.name"), ({"run": {"name": ""}}, "run.name"),
    ({"data": {"domains": ["..", "b"]}}, "data.domains"), ({"data": {"domains": ["a/b"]}}, "data.domains"),
    ({"data": {"domains": ["a", "a"]}}, "data.domains"), ({"data": {"eval_only_domains": ["x/../y"]}}, "data.eval_only_domains"),
    ({"rounds": {"initial": {"a": True}}}, "rounds.initial"),
])
def test_non_finite_numbers_bools_as_numbers_and_unsafe_names_are_refused(raw, where):
    assert _error(raw).startswith(f"config error at {where}:")


def test_a_bool_field_still_takes_a_bool():
    assert load_config({"decision": {"confirm": False}}).decision.confirm is False


def test_config_help_lists_every_section_and_field():
    text = config_help(ExperimentConfig)
    lines = text.splitlines()
    heads = [line.split("#")[0].strip() for line in lines if not line.startswith(" ")]
    for section, f in ExperimentConfig.model_fields.items():
        assert f"{section}:" in heads
        for name, field in f.default_factory().__class__.model_fields.items():
            assert any(line.startswith(f"  {name}: ") for line in lines), (section, name)
            assert field.description and field.description in text
    assert set(Config.model_fields) == {"run", "data", "model", "main", "rounds", "adapters", "search", "decision",
                                        "tracking", "ray", "placement"}
    assert set(ExperimentConfig.model_fields) == set(Config.model_fields) | set(Config.experiment_sections)


def test_config_help_for_a_run_leaves_out_the_experiment_sections():
    heads = [line.split("#")[0].strip() for line in config_help().splitlines() if not line.startswith(" ")]
    assert "run:" in heads and "decision:" in heads
    assert "bench:" not in heads and "schedule:" not in heads


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_bundled_configs_load(path):
    cfg = load_config(path)
    assert yaml.safe_load(cfg.to_yaml())  # and serialise back
    exp = load_experiment_config(path)  # bench and continual read the same file
    assert exp.run_config() == cfg and type(exp.run_config()) is Config


def test_a_run_skips_the_experiment_sections_and_the_experiments_check_them():
    raw = {"bench": {"seeds": "not a list"}, "schedule": {"replay_share": 2}}
    cfg = load_config(raw)  # what `opmix-ray run` does with a bench file
    assert type(cfg) is Config and not hasattr(cfg, "bench") and "bench" not in cfg.to_yaml()
    with pytest.raises(ConfigError, match="^config error at bench.seeds:"):
        load_experiment_config(raw)
    with pytest.raises(ConfigError, match="^config error at bogus: unknown key"):
        load_config({"bogus": {}})  # only the experiments' own sections are skipped


def test_there_are_bundled_configs():
    assert CONFIGS


def test_the_config_reference_is_generated_from_the_models():
    """docs/config.md is what `python -m opmix_ray.cli.config_doc` writes: regenerate it after changing a field."""
    from pathlib import Path

    from opmix_ray.cli.config_doc import reference
    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == reference(), "docs/config.md is stale: python -m opmix_ray.cli.config_doc > docs/config.md"


def test_the_readme_config_is_a_valid_run():
    import re
    from pathlib import Path

    from opmix_ray.config import load_config
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cfg = load_config(yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1)))
    assert cfg.main.total_tokens // (cfg.main.batch_size * cfg.data.seq_len) == 400  # as the README says
