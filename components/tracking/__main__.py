"""``python -m components.tracking``: see :mod:`components.tracking.cli`."""

from components.cli import run_as_process
from components.tracking.cli import main

run_as_process(main)
