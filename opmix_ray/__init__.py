"""opmix-ray: OP-Mix on Ray. The public API (each name loads on first use, so `import opmix_ray`
starts neither torch nor Ray):

    from opmix_ray import load_config, run
    summary = run(load_config("opmix_ray/configs/demo.yaml"))

run / resume: a whole run, or the continuation of one whose driver died (opmix_ray/engine/);
load_config: the typed YAML config (opmix_ray/config.py); Mixture (opmix_ray/mixture.py);
MixtureSearcher, create_searcher: write or build a searcher (opmix_ray/searchers/);
OpMix, OpMixSampler, OpMixLoop, OpMixCallback: OP-Mix decisions for a training loop you already
have, a Hugging Face Trainer or a Ray Train loop (opmix_ray/own_trainer/, docs/own_trainer.md).
"""
from importlib import import_module

_PUBLIC = {
    "run": "opmix_ray.engine.driver",
    "resume": "opmix_ray.engine.resume",
    "load_config": "opmix_ray.config",
    "Mixture": "opmix_ray.mixture",
    "MixtureSearcher": "opmix_ray.searchers",
    "create_searcher": "opmix_ray.searchers",
    "OpMix": "opmix_ray.own_trainer.client",
    "OpMixSampler": "opmix_ray.data.feed",
    "OpMixLoop": "opmix_ray.own_trainer.loop",
    "OpMixCallback": "opmix_ray.own_trainer.hf",
}
__all__ = [*_PUBLIC, "__version__"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("opmix-ray")
    except PackageNotFoundError:  # a source tree on sys.path that was never installed
        return "unknown (not installed)"


def __getattr__(name: str):
    if name == "__version__":
        return _version()
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'opmix_ray' has no attribute {name!r}")
