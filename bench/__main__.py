"""`python -m bench`: the same command line as `bench/run.py`."""

import sys

from bench.cli import main

sys.exit(main())
