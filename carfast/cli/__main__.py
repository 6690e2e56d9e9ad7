"""``python -m carfast.cli``: the ``carfast`` command."""
import sys

from carfast.cli.app import main

sys.exit(main())
