"""`opmix-ray submit`: run a config as a Ray job on a cluster, through Ray's Jobs API.

    opmix-ray submit opmix_ray/configs/demo.yaml --address http://HEAD:8265 \
        --runtime-env cluster/runtime_env.yaml [--set search.num_samples=32] [--no-wait]

is the same as

    ray job submit --address http://HEAD:8265 --runtime-env cluster/runtime_env.yaml \
        -- python -m opmix_ray.cli run opmix_ray/configs/demo.yaml

The config is validated here first (a bad config never reaches the cluster); paths inside it
(data, tokenizer, storage) are resolved on the cluster, relative to the runtime_env working_dir.
Inside the job, RAY_ADDRESS is set by Ray, so the run joins the cluster instead of starting Ray.
With token authentication on (RAY_AUTH_MODE=token), the client sends the token from RAY_AUTH_TOKEN
or ~/.ray/auth_token; see cluster/README.md.
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import yaml

from opmix_ray.config import ConfigError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def load_runtime_env(path: str | None) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config error at --runtime-env: {p} does not exist (fix: pass a runtime_env "
                          "YAML such as cluster/runtime_env.yaml)")
    try:
        env = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ConfigError(f"config error at --runtime-env: {p} is not valid YAML (fix: check indentation "
                          "and colons)") from None
    if not isinstance(env, dict):
        raise ConfigError(f"config error at --runtime-env: {p} is not a mapping (fix: start with "
                          "`working_dir: .`)")
    return env  # a relative working_dir is taken from the current dir, as `ray job submit` does


def upload_sizes(working_dir: str | Path, excludes: list[str]) -> tuple[int, dict[str, int]]:
    """(bytes Ray would upload from working_dir, bytes per top-level entry), with the runtime_env's
    excludes plus .gitignore and .rayignore, walked by Ray's own packaging code (ray==2.60.0)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes
    root = Path(working_dir).resolve()
    per: dict[str, int] = {}

    def add(path: Path) -> None:
        if path.is_file() and not path.is_symlink():
            top = path.relative_to(root).parts[0]
            per[top] = per.get(top, 0) + path.stat().st_size
    _dir_travel(root, [_get_excludes(root, list(excludes))], add, include_gitignore=True)
    return sum(per.values()), per


def check_upload(env: dict | None, limit: int | None = None) -> None:
    """Refuse before submitting when working_dir cannot fit Ray's upload limit, naming what to
    exclude (Ray itself answers "413 Maximum request body size" with a raw traceback). Ray zips the
    package without compression (ZIP_STORED), so the files' total is the package's size."""
    if not env or not isinstance(env.get("working_dir"), str) or "://" in env["working_dir"]:
        return
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE
    limit = limit or GCS_STORAGE_MAX_SIZE
    wd = Path(env["working_dir"])
    if not wd.is_dir():
        raise ConfigError(f"config error at --runtime-env: working_dir {wd} is not a directory (fix: run from the "
                          "repository root, or set working_dir to the directory to upload)")
    total, per = upload_sizes(wd, env.get("excludes") or [])
    if total < limit:
        return
    top = sorted(per.items(), key=lambda kv: -kv[1])[:4]
    largest = ", ".join(f"{name} ({n / 2**20:.0f} MiB)" for name, n in top)
    raise ConfigError(f"config error at --runtime-env: working_dir {wd.resolve()} would upload {total / 2**20:.0f} MiB, "
                      f"over Ray's upload limit of {limit / 2**20:.0f} MiB; the largest entries: {largest} (fix: add "
                      "them to the runtime_env's excludes or to .rayignore; put data and runs on shared storage)")


def entrypoint(config: str, sets: list[str] | None = None, overwrite: bool = False) -> str:
    parts = ["python", "-m", "opmix_ray.cli", "run", config]
    for s in sets or []:
        parts += ["--set", s]
    if overwrite:
        parts.append("--overwrite")
    return " ".join(shlex.quote(x) for x in parts)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, auth errors, bad URL
        why = " ".join(str(exc).split())[:200]
        raise ConfigError(f"config error at --address: cannot reach the Ray dashboard at {address} ({why}) "
                          "(fix: pass http://HEAD:8265 of a running cluster, and its auth token if it has "
                          "one)") from None


def follow(client, job_id: str, poll_s: float = 2.0, out=sys.stdout) -> str:
    """Print the job's logs as they grow until it ends; return its final status name."""
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            out.write(logs[shown:])
            out.flush()
            shown = len(logs)
        if str(getattr(status, "value", status)) in TERMINAL:
            return str(getattr(status, "value", status))
        time.sleep(poll_s)


def submit(config: str, address: str, runtime_env: str | None = None, wait: bool = True,
           sets: list[str] | None = None, overwrite: bool = False, submission_id: str | None = None) -> int:
    """Validate, submit, and (unless wait=False) follow the job; return the exit code to use."""
    from opmix_ray.cli.overrides import parse_overrides
    from opmix_ray.config import load_config
    load_config(config, parse_overrides(sets))  # fail here, not on the cluster
    env = load_runtime_env(runtime_env)
    check_upload(env)
    client = _client(address)
    job_id = client.submit_job(entrypoint=entrypoint(config, sets, overwrite), runtime_env=env,
                               submission_id=submission_id, metadata={"tool": "opmix-ray"})
    print(f"submitted Ray job {job_id} to {address}\n"
          f"  logs: ray job logs --address {address} -f {job_id}\n"
          f"  stop: ray job stop --address {address} {job_id}", flush=True)
    if not wait:
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (stop it: ray job stop --address {address} "
              f"{job_id})", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {status}" + (f" ({info.message})" if info.message and status != "SUCCEEDED" else ""))
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1
