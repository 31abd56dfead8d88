"""Python processes we start never import from the working directory (a watched folder)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

# `python -I -c BOOT PATH MODULE ARGS...`: -I keeps the working directory, PYTHON* variables
# and the user's site-packages off sys.path; BOOT then puts the entries in PATH (a JSON list)
# first and runs MODULE as `python -m MODULE ARGS...` would.
BOOT = (
    "import json, runpy, sys; "
    "sys.path[:0] = [p for p in json.loads(sys.argv.pop(1)) if p not in sys.path]; "
    "sys.argv.pop(0); "
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)


def safe_sys_path(path: Sequence[str] | None = None) -> list[str]:
    """`path` (default sys.path) without the working directory: '' and any entry naming it,
    as `python -m`, `python -c` and a `.` in PYTHONPATH put there."""
    cwd = _real(os.getcwd())
    return [p for p in (sys.path if path is None else path) if p and _real(p) != cwd]


def python_command(
    module: str,
    args: Sequence[str] = (),
    *,
    python: str = sys.executable,
    path: Sequence[str] | None = None,
) -> list[str]:
    """argv for `python -m module args` with an isolated path: this process's sys.path
    (less the working directory) when `path` is None, so the child imports what we import
    (an editable checkout, the user's site-packages, PYTHONPATH) and nothing from where it
    was started. -u: the PYTHONUNBUFFERED that -I ignores (log lines reach the journal)."""
    entries = safe_sys_path() if path is None else list(path)
    return [python, "-I", "-u", "-c", BOOT, json.dumps(entries), module, *args]


def drop_cwd_from_sys_path() -> None:
    """For `python -m watcher`: Python put the working directory first on sys.path before
    our code ran; take it off before anything else (structlog, yaml, torch) is imported."""
    sys.path[:] = safe_sys_path()


def _real(p: str) -> str:
    try:
        return os.path.realpath(p)
    except (OSError, ValueError):
        return p
