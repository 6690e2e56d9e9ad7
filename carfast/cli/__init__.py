"""The ``carfast`` command: ``app`` (the parser and ``main``), one module per subcommand (``score``,
``prune``, ``report``, ``demo``, ``layers``) and the options they share (``common``)."""
from carfast.cli.app import main

__all__ = ["main"]
