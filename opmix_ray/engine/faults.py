"""When the cluster loses a node mid-run: what survives, what is retried, and what the user is told.

- The MixtureController and the main run's coordinator are pinned to the driver's node
  (`on_driver_node`), so losing any other node cannot take the run's history or its Train
  controller with it.
- A round's adapter job that fails because a node died is rerun once on what is left
  (adapters.train_adapters); Tune reruns trials on their own (engine/search.py, FailureConfig).
- Anything else that fails while a node is missing (most often the main run's worker was on it)
  ends the run with RunInterrupted: one line naming the lost nodes, what is saved, and the
  `opmix-ray resume` command. The CLI exits with status 3.
- Any other failure inside a run (not the user's input) ends it with RunFailed: one line naming
  the step and the file involved, the traceback in <run_dir>/error.log, exit status 1; the run
  resumes like one whose driver was killed.

    nodes = alive_nodes()
    ...                        # something fails
    if lost_since(nodes): raise RunInterrupted(...)
"""
from __future__ import annotations

import errno
import re
import tempfile
import traceback
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from opmix_ray import rundir
from opmix_ray.errors import RunFailed, RunInterrupted
from opmix_ray.storage import atomic_write_bytes


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """Scheduling for the actors that must live as long as the driver (hard affinity: if the
    driver's node dies, the driver is gone anyway)."""
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def lost_since(before: set[str]) -> set[str]:
    """Nodes alive in `before` that are dead now."""
    return before - alive_nodes()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _summary_line(exc: BaseException) -> str:
    """The line of an error's text that says what went wrong: for a Ray task error (whose text is
    the worker's traceback) its last "...Error: ..." line, else the first line."""
    lines = [_ANSI.sub("", s).strip() for s in str(exc).splitlines()]
    lines = [s for s in lines if s]
    errors = [s for s in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", s)]
    return (errors[-1] if errors else lines[0] if lines else "")[:300]


def run_failed(exc: BaseException, step: str, run_dir: Path, location: str) -> RunFailed:
    """RunFailed for an internal failure: one line with the step, the file involved (if any) and where
    the full traceback went (the run dir's error.log; the system temp dir when the run dir cannot
    take it, e.g. a full disk)."""
    text = "".join(traceback.format_exception(exc)).encode()
    log: Path = run_dir / rundir.ERROR_LOG
    try:
        atomic_write_bytes(log, text)
    except OSError:
        log = Path(tempfile.gettempdir()) / f"opmix-error-{run_dir.name}.log"
        try:
            log.write_bytes(text)
        except OSError:
            log = Path("(not written: no writable place)")
    cause = getattr(exc, "cause", None)  # a RayTaskError carries the worker's exception
    file = getattr(exc, "filename", None) or getattr(cause, "filename", None)
    what = _summary_line(exc)
    errno_ = getattr(exc, "errno", None) or getattr(cause, "errno", None)
    if errno_ == errno.ENOSPC or "No space left on device" in str(exc):  # the disk filled (also inside Ray's wrappers)
        held = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file()) / 2**20
        what += f" (the storage at {location} is full; the run dir holds {held:.0f} MiB; free space there)"
    return RunFailed(f"{step} failed: {type(exc).__name__}: {what}" + (f"; file {file}" if file else "") +
                     f" (full traceback: {log}; once the cause is fixed, `opmix-ray resume {location}` continues "
                     "from the last pushed round)")


def interrupted(lost: set[str], where: str, location: str, cause: BaseException) -> RunInterrupted:
    ids = ", ".join(sorted(n[:12] for n in lost))
    return RunInterrupted(
        f"the run lost Ray node(s) {ids} during {where} ({type(cause).__name__}); every pushed round and "
        f"its checkpoint are saved in {location} (fix: `opmix-ray resume {location}` once the cluster "
        "has capacity again)")
