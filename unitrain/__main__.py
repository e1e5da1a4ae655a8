"""``python -m unitrain`` is the ``unitrain`` command."""

import sys

from unitrain.app.cli import main

sys.exit(main())
