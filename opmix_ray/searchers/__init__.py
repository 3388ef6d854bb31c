"""Searchers over mixtures: a name -> "module:attr" registry with lazy imports, as in ray.tune.search.

    searcher = create_searcher("optuna-tpe", space=SimplexSpace(coords), seed=0)
    searcher = create_searcher("mypkg.mymod:MySearcher", space=..., seed=0)   # your own

Every searcher is a `ray.tune.search.Searcher` (the built-ins are MixtureSearchers, see base.py)
that suggests the space's params (`u_<coord>`, or `w_<coord>` directly) and minimises the trial's
"objective". Only the chosen searcher's module is imported, so e.g. scipy loads only when needed.
"""
from __future__ import annotations

import importlib
import inspect

from opmix_ray.searchers.base import (
    METRIC,
    MODE,
    MixtureSearcher,
    SearcherError,
    TrialResult,
)

_REGISTRY = {
    "optuna-tpe": "opmix_ray.searchers._optuna:make_tpe",
    "optuna-gp": "opmix_ray.searchers._optuna:make_gp",
    "random": "opmix_ray.searchers._random:RandomSimplexSearcher",
    "grid": "opmix_ray.searchers._grid:GridSimplexSearcher",
    "mixing-law": "opmix_ray.searchers._mixing_law:MixingLawSearcher",
}

# Facts about the run that engine/search.py offers every searcher; one that does not take a keyword
# simply does not get it (a user's 3-argument searcher keeps working).
CONTEXT_KWARGS = ("objective_weights", "journal_path")

# the mixing-law math, shared with the Olmix baseline (loaded on first use: it needs scipy)
_LAW = ("KL_LAMBDA", "fit_laws", "propose_mixture")

__all__ = ["create_searcher", "registered", "METRIC", "MODE", "MixtureSearcher", "SearcherError", "TrialResult",
           *_LAW]


def __getattr__(name: str):
    if name in _LAW:
        from opmix_ray.searchers import _mixing_law
        return getattr(_mixing_law, name)
    raise AttributeError(f"module 'opmix_ray.searchers' has no attribute {name!r}")


def registered() -> list[str]:
    return sorted(_REGISTRY)


def _import(target: str, field: str = "search.searcher"):
    mod_name, _, attr = target.partition(":")
    if not attr or not mod_name:
        raise SearcherError(f"{field}: '{target}' is neither a registered searcher {registered()} nor a "
                            "dotted path 'pkg.module:Class' (fix: use one of those)")
    try:
        module = importlib.import_module(mod_name)
    except (Exception, SystemExit) as exc:  # not only ImportError: a module may raise anything, or not parse
        raise SearcherError(f"{field}: cannot import '{mod_name}' ({type(exc).__name__}: {exc}) (fix: check the "
                            "module imports cleanly from where the run starts)") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise SearcherError(f"{field}: '{mod_name}' has no '{attr}' (fix: check the class name)") from None


def _accepts(factory, name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def create_searcher(name: str, *, space, seed: int = 0, points_to_evaluate=None, **kwargs):
    """A ready Searcher for `name` (registered or 'pkg.mod:Class') over `space`."""
    factory = _import(_REGISTRY.get(name, name))
    if not callable(factory):
        raise SearcherError(f"search.searcher: '{name}' is not a class or factory (fix: point at a Searcher class)")
    missing = sorted(getattr(factory, "__abstractmethods__", ()))
    if missing:
        raise SearcherError(f"search.searcher: '{name}' does not implement {missing} (fix: define "
                            "propose(self, trial_id) returning weights over space.coords, None or FINISHED)")
    for k in CONTEXT_KWARGS:
        if k in kwargs and not _accepts(factory, k):
            kwargs.pop(k)
    try:
        searcher = factory(space=space, seed=seed, points_to_evaluate=points_to_evaluate, **kwargs)
    except TypeError as exc:
        raise SearcherError(f"search.searcher: '{name}' cannot be built with space=, seed=, "
                            f"points_to_evaluate= and search.searcher_options {sorted(kwargs)} ({exc}) (fix: "
                            "give its __init__ those keyword arguments, as MixtureSearcher does, and only "
                            "options it takes)") from None
    except SearcherError:
        raise
    except Exception as exc:  # a searcher that validates its options raises ValueError and the like
        raise SearcherError(f"search.searcher_options: '{name}' refused them ({type(exc).__name__}: {exc}) "
                            "(fix: check the options against its __init__)") from None
    from ray.tune.search import Searcher
    if not isinstance(searcher, Searcher):
        raise SearcherError(f"search.searcher: '{name}' built a {type(searcher).__name__}, not a "
                            "ray.tune.search.Searcher (fix: subclass opmix_ray.searchers.MixtureSearcher)")
    return searcher
