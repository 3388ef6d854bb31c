"""docs/config.md, generated from the config models so that it cannot drift from them.

    python -m opmix_ray.cli.config_doc > docs/config.md      (tests/test_config.py checks it is current)
"""
from __future__ import annotations

import typing

import yaml
from pydantic import BaseModel

from opmix_ray.experiments.config import ExperimentConfig

HEAD = """# Config reference

Generated from `opmix_ray/config.py` and `opmix_ray/experiments/config.py` by `python -m opmix_ray.cli.config_doc > docs/config.md`; do not
edit by hand. A run is one YAML file with these sections; unknown keys are errors, and a bad value
stops the run with one line naming the field and the fix (exit 2). `opmix-ray config-help` prints
the same in the terminal. `bench` and `schedule` are read only by `opmix-ray bench` and
`opmix-ray continual`.
"""


def _type(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("NoneType", "None")
    if isinstance(annotation, type):
        text = annotation.__name__
    elif typing.get_origin(annotation) is typing.Literal:
        text = " \\| ".join(repr(a) for a in typing.get_args(annotation))
    return text.replace("|", "\\|") if "\\|" not in text else text


def _default(field) -> str:
    value = field.default_factory() if field.default_factory else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def reference() -> str:
    out = [HEAD]
    for name, sec in ExperimentConfig.model_fields.items():
        model = sec.default_factory().__class__
        doc = (model.__doc__ or "").strip()
        out += [f"## `{name}`", ""] + ([doc, ""] if doc else []) + ["| field | type | default | meaning |",
                                                                   "|---|---|---|---|"]
        for fname, f in model.model_fields.items():
            desc = (f.description or "").replace("|", "\\|")
            out.append(f"| `{fname}` | {_type(f.annotation)} | `{_default(f)}` | {desc} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(reference(), end="")
