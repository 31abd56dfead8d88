"""moondream-watcher's benchmarks (issue 7): is the model kept busy, does it scale?"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The benchmarks run on the tests' harness (daemon_harness, images, tiny_models): a folder of
# modules that conftest puts on the path, not a package.
_TESTS = str(ROOT / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def quiet_logging() -> None:
    """watcher's own log lines in this process: warnings and up, to stderr. (An in-process
    `watcher caption` configures logging for itself; the pipeline benchmark restores this.)"""
    from watcher.config import LogConfig
    from watcher.log import configure_logging

    configure_logging(LogConfig(format="console", level="warning"), stream=sys.stderr)


def log(msg: str) -> None:
    """A progress line of the benchmark's own, to stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
