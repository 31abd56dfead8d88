#!/usr/bin/env python
"""`bench/run.py [BENCHMARK ...] [options]`: runs the benchmarks (see bench/README.md)."""

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, this folder is sys.path[0], where the package's modules (daemon,
    # models, ...) would import under bare names; the repository root instead: `bench.*`.
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    from bench.cli import main

    sys.exit(main())
