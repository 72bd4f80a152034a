"""``python -m switchyard``: the ``switchyard`` command (see :mod:`switchyard.cli`)."""

import sys

from switchyard.cli import main

sys.exit(main())
