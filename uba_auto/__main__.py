"""``python -m uba_auto`` behaves like the ``uba-auto`` command."""

import sys

from .cli import main

sys.exit(main())
