"""The YAML reader for configs: yaml.safe_load, except that a key given twice in one mapping is an
error (PyYAML keeps the last one, so a duplicated section would silently drop the first)."""
from __future__ import annotations

import typing

import yaml

from opmix_ray.errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the
    last one, so a duplicated section would silently drop the first)."""


def _unique_mapping(loader: _StrictLoader, node, deep: bool = False):
    # only the keys written in this mapping: one that overrides a merged (<<) key is YAML's way
    explicit = [k for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
    seen = set()
    for key_node in explicit:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, typing.Hashable):
            continue  # construct_mapping reports it
        if key in seen:
            raise ConfigError(f"config error at <yaml> line {key_node.start_mark.line + 1}: '{key}' is given twice "
                              "in one mapping (fix: keep one; the second would replace the first)")
        seen.add(key)
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def safe_load_unique(text: str):
    """yaml.safe_load with _StrictLoader (what safe_load does, with our loader)."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
