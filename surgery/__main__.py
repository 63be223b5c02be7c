"""``python -m surgery ...``: see :mod:`surgery.cli`."""

import sys

from .cli import main

sys.exit(main())
