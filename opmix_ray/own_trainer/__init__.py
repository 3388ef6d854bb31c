"""OP-Mix decisions for a training loop you already have (docs/own_trainer.md).

    client.py   OpMix: the config, the token shards, the run dir, the boundary call
    runner.py    the round runner, a Ray actor running the engine's rounds (engine/driver.run_round)
    loop.py      OpMixLoop: boundaries and pushes for your own loop, one process or every DDP rank
    hf.py        OpMixCallback: the same for a Hugging Face Trainer (imports transformers)

The sampler is opmix_ray/data/feed.py's OpMixSampler, the one the main run draws from too. Each
name loads on first use.
"""
from importlib import import_module

_PUBLIC = {
    "OpMix": "opmix_ray.own_trainer.client",
    "BoundaryDecision": "opmix_ray.own_trainer.client",
    "PendingRound": "opmix_ray.own_trainer.client",
    "OpMixLoop": "opmix_ray.own_trainer.loop",
    "OpMixCallback": "opmix_ray.own_trainer.hf",
    "OpMixSampler": "opmix_ray.data.feed",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'opmix_ray.own_trainer' has no attribute {name!r}")
