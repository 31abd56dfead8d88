"""Fault injection for tests: a no-op unless the WATCHER_FAULTS environment variable is set.

TEST-ONLY. Some faults cannot be produced for real on a CI machine (a full disk under the
database, a GPU running out of memory) or only at a moment a test cannot pick (an image
deleted while the model is looking at it). For those, `hit(site, ...)` is called at the one
place where the real error would arise, and raises the real exception type there; everything
above it is the production code path. The sites:

- ``sidecar_write``: each os.write of a sidecar's temp file
  (`watcher.outputs.sidecar.write_atomic`). Raises ``OSError(errno.<errno>)`` (default ENOSPC).
- ``db_commit``: just before the writer commits a batch of index rows and job states
  (`watcher.pipeline.writer.Writer._write`). Raises ``sqlite3.OperationalError("database or disk is
  full")``, what SQLite reports on ENOSPC.
- ``model``: the backend's describe() call (`watcher.pipeline.model_worker.ModelWorker._run`).
  ``error: "oom"`` raises ``torch.cuda.OutOfMemoryError``; ``error: "exception"`` a RuntimeError;
  ``gate: FILE`` holds the call until FILE exists (it first writes FILE.reached with the
  batch's paths), so a test can change the file system while the model works.

WATCHER_FAULTS is JSON: ``{site: rule or [rules]}``. A rule applies when all its conditions
hold: ``match`` (a substring of one of the paths involved), ``min_batch`` (model only),
``until`` (a file that, once it exists, switches the rule off). ``times`` limits how often it
fires (default: no limit). Example::

    WATCHER_FAULTS='{"sidecar_write": {"errno": "ENOSPC", "times": 2},
                     "model": [{"error": "oom", "min_batch": 3}]}'
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

log = structlog.get_logger("watcher.faults")

SITES = ("sidecar_write", "db_commit", "model", "embed_rename")
GATE_TIMEOUT = 300.0  # a forgotten gate releases itself rather than hang a test run forever

_lock = threading.Lock()
_rules: dict[str, list[dict]] = {}


def configure(spec: dict | str | None) -> None:
    """Replace the active faults (None or {} turns them all off). Tests in-process call this;
    a daemon subprocess reads WATCHER_FAULTS at import."""
    if isinstance(spec, str):
        spec = json.loads(spec) if spec.strip() else None
    rules: dict[str, list[dict]] = {}
    for site, value in (spec or {}).items():
        if site not in SITES:
            raise ValueError(f"WATCHER_FAULTS: unknown site {site!r}; expected one of {SITES}")
        items = value if isinstance(value, list) else [value]
        rules[site] = [dict(r, fired=0) for r in items]
    with _lock:
        _rules.clear()
        _rules.update(rules)


def active() -> bool:
    return bool(_rules)


def hit(site: str, paths: Sequence[str] = (), batch: int = 0) -> None:
    """Raise the configured fault for `site`, if a rule applies; otherwise do nothing."""
    if not _rules:  # the production path: one dict check
        return
    with _lock:
        rule = next((r for r in _rules.get(site, ()) if _applies(r, paths, batch)), None)
        if rule is None:
            return
        rule["fired"] += 1
    log.warning(
        "injected fault (test only)",
        site=site,
        paths=list(paths)[:8],
        batch=batch,
        rule={k: v for k, v in rule.items() if k != "fired"},
    )
    if "gate" in rule:
        _wait_at_gate(Path(rule["gate"]), paths)
        return
    if site == "sidecar_write":
        code = getattr(errno, rule.get("errno", "ENOSPC"))
        raise OSError(code, os.strerror(code), paths[0] if paths else None)
    if site == "db_commit":
        raise sqlite3.OperationalError("database or disk is full")
    if rule.get("error", "exception") == "oom":
        import torch

        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB (injected fault)"
        )
    raise RuntimeError(rule.get("message", "injected model failure"))


def _applies(rule: dict, paths: Sequence[str], batch: int) -> bool:
    if "times" in rule and rule["fired"] >= rule["times"]:
        return False
    if "until" in rule and os.path.exists(rule["until"]):
        return False
    if batch < rule.get("min_batch", 0):
        return False
    match = rule.get("match")
    return match is None or any(match in p for p in paths)


def _wait_at_gate(gate: Path, paths: Sequence[str]) -> None:
    reached = gate.with_name(gate.name + ".reached")
    reached.write_text("\n".join(paths) + "\n", encoding="utf-8")
    deadline = time.monotonic() + GATE_TIMEOUT
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


configure(os.environ.get("WATCHER_FAULTS"))
