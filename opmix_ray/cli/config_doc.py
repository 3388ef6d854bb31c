"""The config, documented from its models so that the text cannot drift from them: docs/config.md,
`opmix-ray config-help` and `opmix-ray init PATH` (a commented default config).

    python -m opmix_ray.cli.config_doc > docs/config.md      (tests/test_config.py checks it is current)
"""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel

import opmix_ray
from opmix_ray.config import Config
from opmix_ray.experiments.experiment_config import ExperimentConfig

HEAD = """# Config reference

Generated from `opmix_ray/config.py` and `opmix_ray/experiments/experiment_config.py` by `python -m opmix_ray.cli.config_doc > docs/config.md`; do not
edit by hand. A run is one YAML file with these sections; unknown keys are errors, and a bad value
stops the run with one line naming the field and the fix (exit 2). `opmix-ray config-help` prints
the same in the terminal. `bench` and `schedule` are read only by `opmix-ray bench` and
`opmix-ray continual`.
"""


def type_name(annotation) -> str:
    """A field's type as a user reads it: int, 'cosine' | 'wsd', list[str], float | null."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def yaml_default(field) -> str:
    """A field's default as YAML (null, true, [0, 1, 2], {hidden_size: 64, ...})."""
    value = field.default_factory() if field.default_factory else field.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()


def config_help(schema: type[Config] | None = None) -> str:
    """Every section and field `schema` reads (default: a run's) at its default, with its type and
    help text in a comment: valid YAML that loads as the default config (`opmix-ray init` writes it)."""
    lines = []
    for sec_name, sec_field in (schema or Config).model_fields.items():
        model = sec_field.default_factory().__class__
        doc = " ".join((model.__doc__ or "").split())
        lines.append(f"{sec_name}:" + (f"  # {doc}" if doc else ""))
        for name, f in model.model_fields.items():
            entry = f"  {name}: {yaml_default(f)}"
            lines.append(f"{entry:<40} # {type_name(f.annotation)}. {f.description or ''}".rstrip())
    return "\n".join(lines) + "\n"


def reference() -> str:
    out = [HEAD]
    for name, sec in ExperimentConfig.model_fields.items():
        model = sec.default_factory().__class__
        doc = (model.__doc__ or "").strip()
        out += [f"## `{name}`", ""] + ([doc, ""] if doc else []) + ["| field | type | default | meaning |",
                                                                   "|---|---|---|---|"]
        for fname, f in model.model_fields.items():
            desc = (f.description or "").replace("|", "\\|")
            out.append(f"| `{fname}` | {type_name(f.annotation).replace('|', chr(92) + '|')} | `{yaml_default(f)}` | {desc} |")
        out.append("")
    return "\n".join(out)


def cmd_config_help(args) -> int:
    from opmix_ray.experiments.experiment_config import ExperimentConfig
    print(config_help(ExperimentConfig if args.experiments else None))
    return 0


def cmd_init(args) -> int:
    """Write a config with every field at its default, each commented with its type and meaning."""
    from opmix_ray.config import ConfigError
    from opmix_ray.storage import atomic_write_bytes
    p = Path(args.path)
    if p.exists():  # never replace what a user owns
        raise ConfigError(f"config error at PATH: {p} already exists (fix: pass a new file name; nothing was written)")
    if not p.parent.is_dir():
        raise ConfigError(f"config error at PATH: {p.parent} is not a directory (fix: create it first)")
    schema = None
    if args.experiments:
        from opmix_ray.experiments.experiment_config import ExperimentConfig
        schema = ExperimentConfig
    head = (f"# opmix-ray config: every field at its default (opmix-ray {opmix_ray.__version__}). Keep what you change,\n"
            "# delete the rest; `opmix-ray run THIS_FILE` checks every value before Ray starts.\n")
    atomic_write_bytes(p, (head + config_help(schema)).encode())
    print(f"wrote {p}; run it with `opmix-ray run {p}`")
    return 0


if __name__ == "__main__":
    print(reference(), end="")
