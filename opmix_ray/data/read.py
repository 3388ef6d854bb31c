"""The one entry point from a config to a run's tokenized domains: data.reader picks who reads them.

    from opmix_ray.config import load_config
    from opmix_ray.data.read import build_shards
    shards = build_shards(load_config("opmix_ray/configs/tiny.yaml"))

data.reader: driver tokenizes in this process (shards.tokenize_on_driver); data.reader: ray_data
reads and tokenizes with Ray Data tasks and keeps the train tokens in the object store
(ray_reader.build_shards_ray), and so does a live run's added or revised domain
(domain_file_reader). Both give bit-identical tokens and the same data_hash, so a run's hashes do
not depend on the reader. The choice lives here, above both readers, because the Ray Data
reader is built on the driver reader's functions.
"""
from __future__ import annotations

from opmix_ray.config import Config
from opmix_ray.data.ray_reader import build_shards_ray, ray_domain_file
from opmix_ray.data.shards import TokenShards, driver_domain_file, tokenize_on_driver


def build_shards(cfg: Config) -> TokenShards:
    """Tokenize every domain of `cfg` with the reader data.reader names (after building data.path,
    with data.build_revisions)."""
    if cfg.data.build_revisions:
        from opmix_ray.data.revisions import ensure_built
        ensure_built(cfg.data.path)  # seconds; checks the sha256s of an existing build
    return build_shards_ray(cfg) if cfg.data.reader == "ray_data" else tokenize_on_driver(cfg)


def domain_file_reader(cfg: Config):
    """How one file of a domain added or revised in a live run is read (engine/domains.py), by the
    same reader as the run's first domains: shards.with_domain's `read`."""
    return ray_domain_file if cfg.data.reader == "ray_data" else driver_domain_file
