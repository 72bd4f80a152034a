"""``python -m controller``: runs the controller service (see :mod:`controller.server`)."""

import sys

from controller.server import main

sys.exit(main())
