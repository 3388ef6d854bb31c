"""Artifact writes: every file appears whole or not at all, locally and in object storage.

    store = RunStore(local_dir)                        # run.storage_path is a directory
    store = RunStore(staging_dir, "s3://bucket/runs", "demo")   # ... or a pyarrow.fs URI
    store.write_json("history.json", obj)              # local file + <uri>/demo/history.json
    store.upload_dir("main/round_0")                   # a checkpoint dir, after Ray Train wrote it

A local write goes to a temp file beside the target, then renames it. With a URI the run still
works in a local staging dir (Ray Train/Tune, the adapters and the merge all read local paths) and
each artifact is mirrored to `<uri>/<run name>/<same relative path>` through pyarrow.fs: an S3 or
GCS object only becomes visible when its upload completes, so a reader never sees half a file.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from opmix_ray import rundir

STAGING_ENV = "OPMIX_RAY_STAGING"  # where URI runs stage locally (default ~/.cache/opmix-ray/staging)


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def redact(uri: str, query: bool = True) -> str:
    """The URI without user:secret@ (pyarrow accepts S3 keys there), and without its ?options
    unless query: safe for messages and files."""
    scheme, sep, rest = str(uri).partition("://")
    host, slash, tail = rest.partition("/")
    out = scheme + sep + host.rpartition("@")[2] + slash + tail if sep else str(uri)
    return out if query or not sep else out.partition("?")[0]


def remote_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a pyarrow.fs URI; query options such as
    ?endpoint_override=HOST:PORT&scheme=http configure the filesystem, credentials come from the
    environment (AWS_ACCESS_KEY_ID..., GOOGLE_APPLICATION_CREDENTIALS) as for any AWS/GCS client."""
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


STORAGE_TIMEOUT_ENV = "OPMIX_RAY_STORAGE_TIMEOUT"  # seconds a bucket gets to answer the first probe
STORAGE_TIMEOUT_S = 5.0


def storage_timeout() -> float:
    try:
        return max(0.1, float(os.environ.get(STORAGE_TIMEOUT_ENV) or STORAGE_TIMEOUT_S))
    except ValueError:
        return STORAGE_TIMEOUT_S


# Where each object store's client looks for credentials (besides a cloud VM's metadata server)
_CREDENTIALS = {
    "s3": (("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"), ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
           "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or ~/.aws/credentials"),
    "gs": (("GOOGLE_APPLICATION_CREDENTIALS",), ("CLOUDSDK_CONFIG", "~/.config/gcloud"),
           "GOOGLE_APPLICATION_CREDENTIALS, or `gcloud auth application-default login`"),
}
_CREDENTIALS["gcs"] = _CREDENTIALS["gs"]


def missing_credentials(uri: str) -> str | None:
    """What an s3:// or gs:// URI lacks when no credentials can be found in the environment or the
    usual files ("no AWS credentials found (set ...)"), else None (found, anonymous, or another scheme).
    A cloud VM's metadata server may still provide some: this names where to look, it does not refuse."""
    scheme, _, rest = str(uri).partition("://")
    kind = _CREDENTIALS.get(scheme.lower())
    if kind is None or "anonymous=true" in rest.lower() or "@" in rest.partition("/")[0]:
        return None
    env, (file_env, default), hint = kind
    path = Path(os.environ.get(file_env) or default).expanduser()
    if scheme != "s3":  # gcloud keeps the application-default credentials in its config dir
        path = path / "application_default_credentials.json"
    if any(os.environ.get(v) for v in env) or path.is_file():
        return None
    who = "AWS" if scheme == "s3" else "Google Cloud"
    return f"no {who} credentials found (set {hint})"


def within(seconds: float, fn, waiting: str | None = None):
    """fn() in a daemon thread, waited for at most `seconds`; its value, or its exception, or
    TimeoutError. A storage client can block inside C++ for many minutes (a gs:// URI without
    credentials retries the metadata server) and a signal handler runs only between Python steps
    of the main thread: waiting here in short slices keeps SIGINT and SIGTERM working meanwhile.
    `waiting`: a line printed once when the wait passes 1 s, so a slow answer is not a silent hang."""
    import threading
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box["error"] = exc
    t = threading.Thread(target=run, name="opmix-storage-probe", daemon=True)
    t0 = time.monotonic()
    t.start()
    told = waiting is None
    while t.is_alive() and time.monotonic() - t0 < seconds:
        t.join(0.1)
        if not told and time.monotonic() - t0 > 1.0:
            from opmix_ray.console import say
            say(waiting)
            told = True
    if t.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def staging_dir(storage_uri: str, name: str) -> Path:
    """The local dir a URI run works in: one per (URI, run name), so two runs never share one."""
    root = Path(os.environ.get(STAGING_ENV) or "~/.cache/opmix-ray/staging").expanduser()
    return (root / hashlib.sha1(storage_uri.encode()).hexdigest()[:12] / name).resolve()


def split_run_uri(run_uri: str) -> tuple[str, str]:
    """s3://b/runs/NAME?opts -> ("s3://b/runs?opts", "NAME"): a run's storage URI and name."""
    head, sep, query = str(run_uri).partition("?")
    parent, _, name = head.rstrip("/").rpartition("/")
    return parent + sep + query, name


def fetch_run(run_uri: str) -> Path:
    """The local staging dir of the run at run_uri; copied down from the bucket when this machine
    has none (the driver's machine is gone). What the dead driver staged locally is never older
    than the bucket, so an existing staging dir is used as it is."""
    storage, name = split_run_uri(run_uri)
    local = staging_dir(storage, name)
    if not (local / rundir.HISTORY).is_file():
        def reach():
            fs, root = remote_fs(storage)
            fs.get_file_info(f"{root}/{name}/{rundir.HISTORY}")
            return fs, root
        # the first answer within the storage timeout (TimeoutError: an OSError), the copy as long as it takes;
        # both waited for in slices, so a stop signal is honoured meanwhile
        fs, root = within(storage_timeout(), reach)
        local.mkdir(parents=True, exist_ok=True)
        within(float("inf"), lambda: pafs.copy_files(f"{root}/{name}", str(local), source_filesystem=fs,
                                                      destination_filesystem=pafs.LocalFileSystem()))
    return local


def _put(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    if fs.type_name in ("local", "mock"):  # a plain file system: temp file, then rename
        tmp = f"{path}.tmp{os.getpid()}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:  # object stores: a PUT / multipart upload is visible only once complete
        with fs.open_output_stream(path) as f:
            f.write(data)


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """write(tmp) to a temp file beside the local `path`, then rename: readers never see half a file,
    and a crash leaves the old file or the new one. The file is made readable to all, as a plain
    write would be (mkstemp creates 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    if is_uri(path):
        fs, p = remote_fs(str(path))
        parent = p.rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        _put(fs, p, data)
        return
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def _parquet_bytes(rows: list[dict]) -> bytes:
    keys = list(dict.fromkeys(k for r in rows for k in r))  # union of keys, first-seen order
    table = pa.table({k: [r.get(k) for r in rows] for k in keys})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, _json_bytes(obj))


def write_yaml(path: str | Path, obj) -> None:
    atomic_write_bytes(path, yaml.safe_dump(obj, sort_keys=False).encode())


def write_parquet(path: str | Path, rows: list[dict]) -> None:
    atomic_write_bytes(path, _parquet_bytes(rows))


def read_bytes(path: str | Path) -> bytes:
    if is_uri(path):
        fs, p = remote_fs(str(path))
        with fs.open_input_stream(p) as f:
            return f.read()
    return Path(path).read_bytes()


def is_file(path: str | Path) -> bool:
    if is_uri(path):
        fs, p = remote_fs(str(path))
        return fs.get_file_info(p).type == pafs.FileType.File
    return Path(path).is_file()


def _load_safetensors(path: Path) -> None:
    from safetensors.torch import load_file
    load_file(str(path))  # reads every tensor: a truncated file fails here


_READERS = {
    ".json": lambda p: json.loads(p.read_bytes()),
    ".yaml": lambda p: yaml.safe_load(p.read_bytes()),
    ".parquet": lambda p: pq.read_table(p),
    ".safetensors": _load_safetensors,
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksums(run_dir: Path, rels: list[str]) -> dict[str, str]:
    """{path relative to run_dir: sha256} of every file under the dirs and files `rels` (absent ones skipped)."""
    out = {}
    for rel in rels:
        p = run_dir / rel
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
        out.update({f.relative_to(run_dir).as_posix(): sha256_file(f) for f in files})
    return out


def unreadable(path: Path) -> str | None:
    """Why a local artifact does not parse as its suffix says (None: it does, or it is not a kind we
    read). Nothing is unpickled."""
    if path.suffix not in _READERS:
        return None
    try:
        _READERS[path.suffix](path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the finding
        return f"unreadable ({type(exc).__name__})"
    return None


def read_json(path: str | Path):
    return json.loads(read_bytes(path))


def join(base: str | Path, *parts: str) -> str:
    """base/parts..., keeping a URI's ?query (its filesystem options) at the end."""
    base = str(base)
    head, sep, query = base.partition("?") if is_uri(base) else (base, "", "")
    return "/".join([head.rstrip("/"), *parts]) + (sep + query)


class RunStore:
    """A run's artifact store: the local run dir, plus its mirror `<storage_uri>/<name>` if any.
    Picklable (strings only; the filesystem is rebuilt per process), so the controller actor
    gets one too."""

    def __init__(self, local_dir: str | Path, storage_uri: str | None = None, name: str | None = None):
        self.local_dir = Path(local_dir)
        self.storage_uri = storage_uri
        self.name = name
        self._fs = None

    def __getstate__(self):
        return {**self.__dict__, "_fs": None}

    @property
    def remote(self) -> bool:
        return self.storage_uri is not None

    @property
    def location(self) -> str:
        """Where the run's artifacts end up, for messages and summary['run_dir']."""
        return redact(join(self.storage_uri, self.name)) if self.remote else str(self.local_dir)

    def _remote(self) -> tuple[pafs.FileSystem, str]:
        if self._fs is None:
            fs, root = remote_fs(self.storage_uri)
            self._fs = (fs, f"{root}/{self.name}")
        return self._fs

    def write_bytes(self, rel: str, data: bytes) -> None:
        atomic_write_bytes(self.local_dir / rel, data)
        if self.remote:
            fs, root = self._remote()
            fs.create_dir(f"{root}/{rel}".rsplit("/", 1)[0], recursive=True)
            _put(fs, f"{root}/{rel}", data)

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, _json_bytes(obj))

    def write_yaml(self, rel: str, obj) -> None:
        self.write_bytes(rel, yaml.safe_dump(obj, sort_keys=False).encode())

    def write_parquet(self, rel: str, rows: list[dict]) -> None:
        self.write_bytes(rel, _parquet_bytes(rows))

    def upload_dir(self, rel: str) -> None:
        """Mirror the local dir `rel` (a checkpoint, the adapters) to the URI; no-op when local.
        Files are copied one by one, so a reader should wait for summary.json / history.json,
        which are written after the dirs they point to."""
        if not self.remote or not (self.local_dir / rel).is_dir():
            return
        fs, root = self._remote()
        pafs.copy_files(str(self.local_dir / rel), f"{root}/{rel}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)

    def clear_remote(self) -> None:
        """Delete what is under <uri>/<name> (for --overwrite)."""
        if self.remote:
            fs, root = self._remote()
            fs.delete_dir_contents(root, missing_dir_ok=True)

    def list_remote(self, recursive: bool = True) -> list[str]:
        """Relative paths of the files under <uri>/<name> (for tests and checks)."""
        fs, root = self._remote()
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
        return sorted(i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File)
