"""candlekeeper: `python run.py [--config FILE] [--simulate]`, or `python run.py ctl ...`."""

import sys

from candlekeeper.surfaces.cli import main

if __name__ == "__main__":
    sys.exit(main())
