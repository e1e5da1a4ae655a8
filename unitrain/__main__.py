"""``python -m unitrain`` is the ``unitrain`` command."""

import sys

from unitrain.cli import main

sys.exit(main())
