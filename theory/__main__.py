"""``python -m theory {verify,basin} ...``: the theory command line."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
