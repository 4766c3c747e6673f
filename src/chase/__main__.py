"""``python -m chase``: the ``chase`` command."""

import sys

from chase.cli import main

sys.exit(main())
