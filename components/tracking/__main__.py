"""``python -m components.tracking``: see :mod:`components.tracking.cli`."""

from components.cli import exit_process
from components.tracking.cli import main

exit_process(main())
