"""Checks a run's inputs before anything is written (and, with data.reader: driver, before Ray starts).

    run_dir, shards = preflight(cfg, overwrite)   # raises ConfigError / DataError / SearcherError

Cheap checks first (storage, searcher, ray address, resources, model checkpoint), then the data is read and
tokenized once (the shards are returned, so this costs the run nothing extra; with data.reader:
ray_data this starts Ray, after the cheap checks and the data layout checks), then the checks
that need the data (objective/cap keys, model vocab vs tokenizer). Every error is one line that
names the config field and says what to fix; on any error the run dir has not been touched.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from pyarrow.fs import FileSelector

from opmix_ray import rundir
from opmix_ray.config import Config, ConfigError
from opmix_ray.data.read import build_shards
from opmix_ray.data.shards import TokenShards
from opmix_ray.data.tokenizer import vocab_problem
from opmix_ray.mixture import Mixture, MixtureError
from opmix_ray.storage import (STORAGE_TIMEOUT_ENV, is_uri, join, missing_credentials, redact, remote_fs, staging_dir,
                               storage_timeout, within)

_ADDRESS = re.compile(r"^(auto|local|(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5})$")


def run_dir_of(cfg: Config) -> Path:
    """The local dir the run works in: the run dir itself, or a URI run's staging dir."""
    if is_uri(cfg.run.storage_path):
        return staging_dir(cfg.run.storage_path, cfg.run.name)
    return Path(cfg.run.storage_path).expanduser().resolve() / cfg.run.name


def check_remote_storage(cfg: Config, overwrite: bool) -> None:
    """A pyarrow.fs URI: it parses, a probe object can be written and deleted beside the run
    dir (so bad credentials or a missing bucket fail here, not after the first round), and
    <uri>/<name> is empty unless overwrite. The probe gets storage_timeout() seconds (any scheme:
    an object store client may otherwise retry for many minutes), and a stop signal ends the wait."""
    uri, name = cfg.run.storage_path, cfg.run.name
    shown = redact(uri, query=False)
    creds = missing_credentials(uri)
    note = f"; {creds}" if creds else ""

    def probe():
        try:
            fs, root = remote_fs(uri)
        except (ValueError, ImportError) as exc:
            return "parse", exc
        path = f"{root}/.opmix-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(path) as f:
            f.write(b"opmix-ray write probe\n")
        fs.delete_file(path)
        return "ok", fs.get_file_info(FileSelector(f"{root}/{name}", allow_not_found=True))

    seconds = storage_timeout()
    try:
        kind, used = within(seconds, probe, f"waiting for {shown} to answer (up to {seconds:g} s; Ctrl-C stops)")
    except TimeoutError:
        raise ConfigError(f"config error at run.storage_path: no answer from '{shown}' within {seconds:g} s{note} "
                          f"(fix: check the bucket, the endpoint and the credentials, or use a directory; "
                          f"{STORAGE_TIMEOUT_ENV}=SECONDS waits longer)") from None
    except OSError as exc:
        raise ConfigError(f"config error at run.storage_path: cannot write to '{shown}' ({_first_line(exc)}){note} "
                          "(fix: check the bucket exists, the credentials in the environment and the "
                          "endpoint, or use a directory)") from None
    if kind == "parse":
        raise ConfigError(f"config error at run.storage_path: '{shown}' is not a URI pyarrow.fs can open "
                          f"({_first_line(used)}) (fix: use a directory, s3://bucket/path or gs://bucket/path)")
    if used and not overwrite:
        raise ConfigError(f"config error at run.name: {redact(join(uri, name), query=False)} already holds a run (fix: pick "
                          "another run.name, delete it, or pass --overwrite)")
    if used and not rundir.is_run_dir(i.base_name for i in used):
        raise ConfigError(f"config error at run.name: --overwrite refused: {redact(join(uri, name), query=False)} holds "
                          f"objects that are not an opmix-ray run (no {rundir.RUN_MARKER}) (fix: pick another run.name "
                          "or run.storage_path; nothing was deleted)")


def dangling_link(path: Path) -> Path | None:
    """The first part of `path` that is a symbolic link to nothing (a write would go through it,
    creating a directory somewhere the path does not show), or None."""
    p = Path(os.path.abspath(path))
    for part in [*reversed(p.parents), p]:
        if part.is_symlink() and not part.exists():
            return part
    return None


def _first_line(exc: Exception) -> str:
    msg = str(exc).strip().splitlines()
    return (msg[0] if msg else type(exc).__name__)[:300]


def check_storage(cfg: Config, overwrite: bool) -> Path:
    """The run dir can be created (or replaced with overwrite) and its storage is writable."""
    # run.name is a safe path component already (config.name_problem)
    if is_uri(cfg.run.storage_path):
        check_remote_storage(cfg, overwrite)
        return run_dir_of(cfg)  # the staging dir is wiped by the engine: no used-dir check here
    given = Path(cfg.run.storage_path).expanduser()
    for field, path in (("run.storage_path", given), ("run.name", given / cfg.run.name)):
        link = dangling_link(path)
        if link is not None:
            raise ConfigError(f"config error at {field}: {link} is a symbolic link to {os.readlink(link)}, which does "
                              "not exist (fix: create the link's target, or point run.storage_path at a real directory)")
    try:
        run_dir = run_dir_of(cfg)
    except (OSError, RuntimeError) as exc:  # a symlink loop, a path too long
        raise ConfigError(f"config error at run.storage_path: {cfg.run.storage_path} cannot be resolved "
                          f"({type(exc).__name__}: {exc}) (fix: use a plain directory path)") from None
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"config error at run.name: {run_dir} is a file, not a run dir "
                          "(fix: pick another run.name or run.storage_path)")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise ConfigError(f"config error at run.name: {run_dir} already holds a run (fix: pick another "
                          "run.name, delete it, or pass --overwrite)")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not rundir.is_run_dir(p.name for p in run_dir.iterdir()):
        raise ConfigError(f"config error at run.name: --overwrite refused: {run_dir} holds files that are not an "
                          f"opmix-ray run (no {rundir.RUN_MARKER}) (fix: pick another run.name or run.storage_path; "
                          "nothing was deleted)")
    anc = run_dir
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(f"config error at run.storage_path: {anc} is a file, so {run_dir} cannot be "
                          "created (fix: use a writable directory)")
    try:  # a real probe: os.access says yes to root even on a read-only mount
        fd, probe = tempfile.mkstemp(prefix=".opmix-probe-", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"config error at run.storage_path: cannot write in {anc} ({exc.strerror}) "
                          "(fix: use a writable directory)") from None
    return run_dir


def checkpoint_bytes(cfg: Config, vocab: int) -> int:
    """About what one round checkpoint takes: fp32 weights plus AdamW's two moments."""
    if cfg.model.path:
        p = Path(cfg.model.path).expanduser()
        weights = sum(f.stat().st_size for f in p.glob("model*.safetensors"))
    else:
        m, h, inter = cfg.model, cfg.model.hidden_size, cfg.model.intermediate_size
        weights = 4 * (vocab * h + m.num_layers * (4 * h * h + 3 * h * inter + 2 * h) + h)
    return 3 * weights


def check_free_space(cfg: Config, run_dir: Path, vocab: int) -> None:
    """Refuse a run whose checkpoints (one per round and the final one, plus about 10% for adapters
    and trial files) cannot fit the free space where the run dir goes."""
    need = int(1.1 * (cfg.rounds.num_rounds + 1) * checkpoint_bytes(cfg, vocab))
    anc = run_dir
    while not anc.exists():
        anc = anc.parent
    free = shutil.disk_usage(anc).free
    if free < need:
        raise ConfigError(f"config error at run.storage_path: {anc} has {free / 2**20:.0f} MiB free and the run needs "
                          f"about {need / 2**20:.0f} MiB ({cfg.rounds.num_rounds + 1} checkpoints of "
                          f"{checkpoint_bytes(cfg, vocab) / 2**20:.0f} MiB) (fix: free space there, or point "
                          "run.storage_path at a larger disk)")


def module_names(cfg: Config, vocab: int) -> list[str]:
    """The model's module names, from a weightless build on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from opmix_ray.model import build_model
    with torch.device("meta"):
        if cfg.model.path:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(Path(cfg.model.path).expanduser()))
        else:
            model = build_model(cfg.model, vocab, cfg.data.seq_len)
    return [n for n, _ in model.named_modules() if n]


def check_target_modules(cfg: Config, vocab: int) -> None:
    """Every adapters.target_modules entry names modules of the model, as PEFT matches them (the
    full name, or its last dotted parts); otherwise PEFT fails inside the first adapter job."""
    problem = target_modules_problem(cfg.adapters.target_modules, module_names(cfg, vocab))
    if problem:
        raise ConfigError(f"config error at adapters.target_modules: {problem}")


def target_modules_problem(targets: list[str], names: list[str]) -> str | None:
    """What is wrong when some of `targets` match none of the module `names`, with the fix; else None."""
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return None
    # leaves inside the repeated blocks (model.layers.0.self_attn.q_proj, transformer.h.0.attn.c_attn)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names
                     if any(p.isdigit() for p in n.split(".")[:-1]) and not n.rsplit(".", 1)[-1].isdigit()})
    return f"{missing} match no module of the model (fix: use names such as {leaves[:10]})"


def check_searcher(cfg: Config) -> None:
    """Build the searcher once, as a round would (name or dotted path, search.searcher_options, the
    context keywords), over a stand-in space, and throw it away: an import that fails in any way, a
    class that is not a Searcher or lacks propose, and options it does not take are one line here,
    not an error inside the first round's Tune job."""
    from opmix_ray.searchers import create_searcher
    from search_spaces import SimplexSpace
    space = SimplexSpace(("old", "a", "b"))
    create_searcher(cfg.search.searcher, space=space, seed=cfg.run.seed, points_to_evaluate=None,
                    objective_weights={"a": 1.0, "b": 1.0}, **cfg.search.searcher_options)


def check_ray_address(cfg: Config) -> None:
    addr = cfg.ray.address
    if addr is not None and not _ADDRESS.match(addr):
        raise ConfigError(f"config error at ray.address: '{addr}' is not a Ray address (fix: use 'auto', "
                          "'HOST:PORT' or 'ray://HOST:10001'; null starts local Ray)")


def model_vocab(cfg: Config) -> int | None:
    """The vocab size in model.path's config.json (None when the model is built from config)."""
    if not cfg.model.path:
        return None
    p = Path(cfg.model.path).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(f"config error at model.path: {p} has no config.json (fix: point it at a Hugging "
                          "Face checkpoint dir, e.g. a round checkpoint of an earlier run)")
    if not any((p / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise ConfigError(f"config error at model.path: {p} has no model.safetensors (fix: save the "
                          "checkpoint with save_pretrained(safe_serialization=True))")
    try:
        conf = json.loads((p / "config.json").read_text())
        vocab = conf.get("vocab_size")
    except (ValueError, OSError, AttributeError):
        conf, vocab = {}, None
    if not isinstance(vocab, int) or vocab <= 0:
        raise ConfigError(f"config error at model.path: {p}/config.json is not a valid model config with "
                          "a vocab_size (fix: point it at a Hugging Face checkpoint dir)")
    problem = attention_shape_problem(conf)
    if problem:
        raise ConfigError(f"config error at model.path: {p}/config.json: {problem} (fix: a checkpoint whose "
                          "attention shapes its architecture can build)")
    return vocab


ROTARY = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "phi3", "smollm3")


def attention_shape_problem(conf: dict) -> str | None:
    """Why a model config's attention cannot be built (heads that do not divide the width, query
    heads that are not a multiple of the key/value heads, an odd rotary head width), or None."""
    ints = {k: conf.get(k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")}
    h, n, kv, hd = (v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None for v in ints.values())
    if n and kv and n % kv:
        return f"num_attention_heads={n} is not a multiple of num_key_value_heads={kv}"
    if h and n and hd is None and h % n:
        return f"num_attention_heads={n} does not divide hidden_size={h}"
    width = hd or (h // n if h and n else None)
    rotary = "rope_theta" in conf or conf.get("model_type") in ROTARY
    if width and rotary and width % 2 and not conf.get("partial_rotary_factor"):
        return f"attention heads {width} wide, an odd width that rotary position embeddings cannot take"
    return None


def check_against_data(cfg: Config, shards: TokenShards, vocab: int | None) -> None:
    for field, keys in (("search.objective_weights", cfg.search.objective_weights or {}),
                        ("data.max_epochs", cfg.data.max_epochs)):
        known = set(shards.domains) | (set(shards.eval_only) if field.startswith("search") else set())
        unknown = sorted(set(keys) - known)
        if unknown:
            raise ConfigError(f"config error at {field}: unknown domains {unknown}; the run's domains are "
                              f"{sorted(known)} (fix: use those names)")
    own = cfg.adapters.domains
    if own is not None:
        unknown = sorted(set(own) - set(shards.domains))
        if unknown or not own:
            raise ConfigError(f"config error at adapters.domains: {unknown or own} are not among the run's domains "
                              f"{list(shards.domains)} (fix: list some of those, or null for all)")
        if not cfg.adapters.include_old:
            raise ConfigError("config error at adapters.domains: a subset needs the 'old' adapter to move the "
                              "other domains (fix: set adapters.include_old: true, or adapters.domains: null)")
    if isinstance(cfg.rounds.initial, dict):
        try:
            Mixture.from_dict(cfg.rounds.initial, shards.domains)
        except MixtureError as exc:
            raise ConfigError(f"config error at rounds.initial: {exc}") from None
    if cfg.rounds.initial_stay is not None:
        _check_initial_stay(cfg, shards)
    problem = vocab_problem(vocab, shards.vocab_size) if vocab is not None else None
    if problem:
        raise ConfigError(f"config error at model.path: {problem}")


def _check_initial_stay(cfg: Config, shards: TokenShards) -> None:
    from opmix_ray.engine.rule import stay_old_share
    try:
        stay = Mixture.from_dict(cfg.rounds.initial_stay, shards.domains).as_dict()
    except MixtureError as exc:
        raise ConfigError(f"config error at rounds.initial_stay: {exc}") from None
    init = cfg.rounds.initial
    start = (Mixture.from_dict(init, shards.domains) if isinstance(init, dict)
             else shards.natural() if init == "natural" else shards.uniform()).as_dict()
    own = set(cfg.adapters.domains or shards.domains)
    if stay_old_share(start, stay, own) is None:
        raise ConfigError("config error at rounds.initial_stay: the domains without their own adapter move only with "
                          "'old', so they must keep rounds.initial's proportions, and no domain with an adapter may "
                          "fall below them (fix: give those domains rounds.initial's ratios, or list them in "
                          "adapters.domains)")


def cluster_nodes() -> list[dict[str, float]]:
    """Each alive node's resources ({"CPU": 16.0, "GPU": 1.0, ...}) of the Ray this process joined."""
    import ray
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_resources(cfg: Config, nodes: list[dict[str, float]] | None = None) -> None:
    """Every Ray resource request of the run fits the cluster it runs on; else one line naming the
    field. A request larger than the cluster is not an error to Ray: it waits for resources that
    never come, and the run would hang at its first round. The main run's workers hold their CPUs
    while a round runs (in both rounds.mode), so the round's trials and adapters get the rest.

    nodes: each alive node's resources (cluster_nodes()); None = the Ray this process joined, or
    the local Ray this config starts (ray.num_cpus, or the cores plus the main run's CPUs) before
    it starts; a cluster not joined yet (ray.address) is checked by the driver once joined, and so
    are the GPUs of a local Ray that Ray finds when it starts (ray.num_gpus: null). GPUs: engine/placement.py."""
    import ray

    from opmix_ray.engine.placement import gpu_problem
    from opmix_ray.ray_init import joins_cluster, local_cpus
    gpus_known = True
    if nodes is None:
        if ray.is_initialized():
            nodes = cluster_nodes()
        elif joins_cluster(cfg):
            return
        else:
            gpus = cfg.ray.num_gpus
            nodes, gpus_known = [{"CPU": float(local_cpus(cfg)), "GPU": float(gpus or 0)}], gpus is not None
    problem = gpu_problem(cfg, nodes) if gpus_known else None
    if problem:
        raise ConfigError(problem)
    cpus = [float(n.get("CPU", 0.0)) for n in nodes]
    total, largest = sum(cpus), max(cpus, default=0.0)
    has = f"the cluster has {total:g} CPUs" + (f", at most {largest:g} on one node" if len(cpus) > 1 else "")
    more = "or give Ray more CPUs (ray.num_cpus, or a larger cluster)"
    m = cfg.main
    held = m.num_workers * m.cpus_per_worker
    if m.cpus_per_worker > largest:
        raise ConfigError(f"config error at main.cpus_per_worker: {m.cpus_per_worker:g} CPUs per main-run worker, but "
                          f"{has} (fix: at most {largest:g}, {more})")
    if held > total:
        raise ConfigError(f"config error at main.num_workers: {m.num_workers} workers x {m.cpus_per_worker:g} CPUs = "
                          f"{held:g}, but {has} (fix: fewer workers or CPUs per worker, {more})")
    if cfg.run.baseline != "none" or cfg.rounds.num_rounds == 0:
        return  # no rounds: no adapters, no trials
    left = total - held
    if left < 1:
        raise ConfigError(f"config error at main.cpus_per_worker: the main run holds {held:g} of the cluster's {total:g} "
                          f"CPUs while a round runs, leaving none for the round's adapters and trials (fix: lower "
                          f"main.cpus_per_worker or main.num_workers, {more})")
    trial = cfg.search.cpus_per_trial
    if trial > min(left, largest):
        raise ConfigError(f"config error at search.cpus_per_trial: {trial:g} CPUs per trial, but {has} and the main "
                          f"run holds {held:g} of them while a round runs, so a trial could never start (fix: at most "
                          f"{min(left, largest):g}, {more})")
    p = cfg.placement
    for field, cpus in (("placement.adapter_cpus", p.adapter_cpus), ("placement.confirm_cpus", p.confirm_cpus or 0)):
        if cpus > min(left, largest):
            raise ConfigError(f"config error at {field}: {cpus:g} CPUs, but {has} and the main run holds {held:g} of "
                              f"them while a round runs (fix: at most {min(left, largest):g}, {more})")
    workers = cfg.adapters.num_workers
    if workers is not None and workers * p.adapter_cpus > left:
        raise ConfigError(f"config error at adapters.num_workers: {workers} adapter workers of {p.adapter_cpus:g} CPU(s) "
                          f"each, but {has} and the main run holds {held:g} of them while a round runs (fix: at most "
                          f"{int(left // p.adapter_cpus)}, or null to use the CPUs free, {more})")


def preflight(cfg: Config, overwrite: bool = False) -> tuple[Path, TokenShards]:
    """Validate everything a run needs; return (run dir, token shards). Writes nothing."""
    run_dir = check_storage(cfg, overwrite)
    check_searcher(cfg)
    check_ray_address(cfg)
    check_resources(cfg)
    vocab = model_vocab(cfg)
    shards = build_shards(cfg)
    check_against_data(cfg, shards, vocab)
    check_target_modules(cfg, shards.vocab_size)
    check_free_space(cfg, run_dir, shards.vocab_size)
    return run_dir, shards
