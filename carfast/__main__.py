"""``python -m carfast``: the ``carfast`` command."""
import sys

from carfast.cli.app import main

sys.exit(main())
