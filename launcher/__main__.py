"""``python -m launcher`` = the ``multistream-serve`` command (flags: ``--help``)."""

import sys

from launcher.serve import main

sys.exit(main())
