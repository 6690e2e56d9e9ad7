"""The ``carfast`` command (``app``: score, prune, report, demo; ``layers``)."""
from carfast.cli.app import main

__all__ = ["main"]
