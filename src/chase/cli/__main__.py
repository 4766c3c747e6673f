"""``python -m chase.cli`` (e.g. under ``torchrun -m chase.cli train ...``)."""

import sys

from chase.cli import main

sys.exit(main())
