"""The `opmix-ray` command: main.py (parser and commands), submit.py (Ray Jobs), domains.py (the
domain commands of a live run), check.py (`opmix-ray check`), config_doc.py (`config-help`)."""
from opmix_ray.cli.main import main

__all__ = ["main"]
