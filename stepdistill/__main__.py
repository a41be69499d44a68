"""``python -m stepdistill ...`` (and ``accelerate launch -m stepdistill ...``): the ``stepdistill`` command."""
import sys

from .frontends.cli import main

sys.exit(main())
