"""``python -m uba_auto.cli`` behaves like the ``uba-auto`` command."""

import sys

from . import main

sys.exit(main())
