"""Searchers over mixtures: a name -> class registry with lazy imports, as in ray.tune.search.

    searcher = create_searcher("optuna-tpe", space=SimplexSpace(coords), seed=0)
    searcher = create_searcher("mypkg.mymod:MySearcher", space=..., seed=0)   # your own

Every searcher is a `ray.tune.search.Searcher` that suggests `u_<coord>` (see
search_spaces.simplex) or `w_<coord>` keys and minimises the trial's "objective".
"""
from __future__ import annotations

import importlib

from opmix_ray.searchers.base import METRIC, MODE, SearcherError

_REGISTRY = {
    "optuna-tpe": "opmix_ray.searchers._optuna:make_tpe",
    "optuna-gp": "opmix_ray.searchers._optuna:make_gp",
    "random": "opmix_ray.searchers._random:RandomSimplexSearcher",
}

__all__ = ["create_searcher", "registered", "METRIC", "MODE", "SearcherError"]


def registered() -> list[str]:
    return sorted(_REGISTRY)


def _import(target: str, field: str = "search.searcher"):
    mod_name, _, attr = target.partition(":")
    if not attr:
        raise SearcherError(f"{field}: '{target}' is neither a registered searcher {registered()} nor a "
                            "dotted path 'pkg.module:Class' (fix: use one of those)")
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SearcherError(f"{field}: cannot import '{target}' ({exc}) (fix: check the module is "
                            "importable and the class name)") from None


def create_searcher(name: str, *, space, seed: int = 0, points_to_evaluate=None, **kwargs):
    """A ready Searcher for `name` (registered or 'pkg.mod:Class') over `space`."""
    factory = _import(_REGISTRY.get(name, name))
    return factory(space=space, seed=seed, points_to_evaluate=points_to_evaluate, **kwargs)
