"""What every opmix-ray searcher shares: the metric it minimises and its error type."""
from __future__ import annotations

METRIC = "objective"  # what a trial reports and every searcher minimises
MODE = "min"


class SearcherError(ValueError):
    """A bad searcher name, path or argument; the message names the config field and the fix."""
