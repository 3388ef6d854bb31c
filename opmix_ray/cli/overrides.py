"""--set a.b=value pairs, the command line's way to change one config field without editing the file.

    opmix-ray run tiny.yaml --set main.lr=0.001 --set search.searcher=random
"""
from __future__ import annotations

import yaml

from opmix_ray.config import ConfigError


def parse_overrides(pairs: list[str] | None) -> dict:
    """--set a.b=value pairs -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"config error at --set {pair}: expected key=value (fix: e.g. --set main.lr=0.001)")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"config error at --set {pair}: '{key}' is not a dotted field name "
                              "(fix: e.g. --set search.num_samples=32)")
        node = out
        *parents, leaf = parts
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config error at --set {pair}: '{p}' is set twice, once as a value "
                                  "(fix: set the section's fields one by one)")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"config error at --set {pair}: '{value}' is not a YAML value "
                              "(fix: quote it, e.g. --set run.name='\"x\"')") from None
    return out
