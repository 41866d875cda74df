"""``python -m load --users N --seconds T --out DIR [--url HOST:PORT]``."""

import sys

from .runner import main

sys.exit(main())
