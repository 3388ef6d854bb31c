"""What a run prints while it works: `[opmix HH:MM:SS] message` lines, and progress for the main run
and each round's adapters and search. On a terminal a progress line redraws in place with a bar and an ETA; in a
file or a pipe it is a plain line at most every tenth of the way (and at the end), so a redirected
log stays short and greppable. Every line is flushed as it happens.

Verbosity (`opmix-ray --quiet` / `--verbose`, or OPMIX_VERBOSITY=quiet|normal|verbose): quiet prints
only what a command ends with (tables, errors); verbose also lets Ray's and Hugging Face's own
messages through. NO_COLOR, or output that is not a terminal, turns colour off (Ray's coloured
prefixes too).
"""
from __future__ import annotations

import os
import sys
import time

LEVELS = ("quiet", "normal", "verbose")


def verbosity() -> str:
    v = os.environ.get("OPMIX_VERBOSITY", "normal")
    return v if v in LEVELS else "normal"


def set_verbosity(level: str) -> None:
    """For this process and every Ray worker it starts (they inherit the environment)."""
    os.environ["OPMIX_VERBOSITY"] = level if level in LEVELS else "normal"


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def colour() -> bool:
    return is_terminal() and not os.environ.get("NO_COLOR")


_open_bar: list = []  # the Progress whose line a terminal shows unfinished


def say(msg: str) -> None:
    if verbosity() == "quiet":
        return
    if _open_bar:
        _open_bar[0].break_line()
    print(f"[opmix {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _duration(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """progress = Progress("main run", total=400, unit="steps"); progress.update(25, "loss 6.35")."""

    WIDTH = 24

    def __init__(self, label: str, total: int, unit: str = "", stream=None):
        self.label, self.total, self.unit = label, max(1, int(total)), unit
        self._stream = stream  # None: whatever sys.stdout is when a line is written
        self.tty = is_terminal(self.stream)
        self.t0, self.done, self._last_tenth, self._drawn = time.time(), 0, -1, False

    @property
    def stream(self):
        return self._stream or sys.stdout

    def __getstate__(self):  # Tune pickles its callbacks (a search's progress) with the experiment
        return {**self.__dict__, "_stream": None}

    def _text(self, note: str) -> str:
        frac = min(1.0, self.done / self.total)
        elapsed = time.time() - self.t0
        eta = f"ETA {_duration(elapsed * (1 - frac) / frac)}" if 0 < frac < 1 else f"{_duration(elapsed)}"
        unit = f" {self.unit}" if self.unit else ""
        head = f"[opmix {time.strftime('%H:%M:%S')}] {self.label} {self.done}/{self.total}{unit}"
        if self.tty:
            filled = int(round(frac * self.WIDTH))
            head = f"[opmix {time.strftime('%H:%M:%S')}] {self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] " \
                   f"{self.done}/{self.total}{unit}"
        return f"{head} {eta}" + (f"; {note}" if note else "")

    def update(self, done: int, note: str = "") -> None:
        self.done = int(done)
        if verbosity() == "quiet":
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + self._text(note) if colour() else "\r" + self._text(note).ljust(100))
            self.stream.flush()
            self._drawn = True
            _open_bar[:] = [self]
            if self.done >= self.total:
                self.close()
            return
        tenth = int(10 * min(1.0, self.done / self.total))
        if tenth > self._last_tenth or self.done >= self.total:
            self._last_tenth = tenth
            print(self._text(note), file=self.stream, flush=True)

    def break_line(self) -> None:
        """A message is about to be printed under an unfinished bar: end the bar's line first."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def close(self) -> None:
        self.break_line()
        if _open_bar and _open_bar[0] is self:
            _open_bar.clear()


# Ray's own warnings that say nothing a user can act on in an opmix-ray run. The worker-pool one
# comes every round: each adapter is an actor and trials reuse actors, so a 2-core machine starts
# more worker processes than Ray's per-core guess. They stay in Ray's logs (raylet.out) and are
# printed with --verbose.
_RAY_NOISE = ("PYTHON worker processes have been started on node",)


def hide_ray_noise() -> None:
    """Drop the lines of _RAY_NOISE from what the Ray driver prints (it prints the raylet's warnings
    through ray._private.worker.print_to_stdstream); a no-op with --verbose or if Ray moves it."""
    import ray._private.worker as ray_worker
    real = getattr(ray_worker, "print_to_stdstream", None)
    if verbosity() == "verbose" or real is None or getattr(real, "_opmix_filtered", False):
        return

    def filtered(data, *args, **kwargs):
        lines = [ln for ln in data.get("lines", []) if not any(n in ln for n in _RAY_NOISE)]
        if lines:
            real({**data, "lines": lines}, *args, **kwargs)

    filtered._opmix_filtered = True
    ray_worker.print_to_stdstream = filtered
