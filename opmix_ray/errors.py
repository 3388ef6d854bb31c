"""Every error the product raises on purpose, and the exit codes the CLI maps them to.

BadInput and its subclasses are the user's input being wrong (a config field, a domain file, a
mixture, an adapter dir, a searcher, a run dir): the message is one line naming what is wrong and
the fix, and `opmix-ray` prints it and exits with EXIT_BAD_INPUT. RunInterrupted is a run that
cannot go on because Ray lost a node (EXIT_INTERRUPTED), RunFailed one that failed inside for
another reason (EXIT_FAILED); `opmix-ray resume RUN_DIR` continues either.
"""
from __future__ import annotations

from contextlib import contextmanager

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 3


class BadInput(ValueError):
    """A user's input is wrong; str(err) is one line naming it and the fix."""


class ConfigError(BadInput):
    """A bad config value; the message names the field and the fix."""


class DataError(BadInput):
    """Bad domain data; the message names the domain/file and the fix."""


class MixtureError(BadInput):
    """An invalid mixture; the message names the domain and the fix."""


class AdapterError(BadInput):
    """A missing, corrupted or mismatched adapter; the message names the file and the fix."""


class SearcherError(BadInput):
    """A bad searcher name, path or argument; the message names the config field and the fix."""


class RunDirError(BadInput):
    """A run dir that is not one, or lacks what a command needs; the message names the dir and the fix."""


class RunInterrupted(RuntimeError):
    """The run cannot go on because Ray lost a node; the message says how to continue."""


class RunFailed(RuntimeError):
    """Something inside a run failed that is not the user's input: the message names the step and
    the file involved, the full traceback is in the run dir's error.log, and the run resumes."""


@contextmanager
def failing_step(name: str):
    """Tag an exception raised inside with the step of the run it came from (the innermost wins)."""
    try:
        yield
    except Exception as exc:
        if not hasattr(exc, "opmix_step"):
            exc.opmix_step = name
        raise


class TrainerSetupError(BadInput):
    """A trainer of your own wired to OP-Mix wrongly (its model, sampler, boundary steps, callback);
    the message names what and the fix."""
