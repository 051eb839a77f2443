"""`python -m candlekeeper`: the same CLI as the `candlekeeper` command and `python run.py`."""

import sys

from .surfaces.cli import main

sys.exit(main())
