"""``python -m components.tracking``: see :mod:`components.tracking.cli`."""

import sys

from components.tracking.cli import main

sys.exit(main())
