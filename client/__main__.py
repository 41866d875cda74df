"""``python -m client`` = the ``multistream`` command."""

import sys

from .cli import main

sys.exit(main())
