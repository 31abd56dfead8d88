"""Settle: a file is handed on only once its size and mtime have stopped changing."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from PIL import Image

log = structlog.get_logger("watcher.settle")

# A file that is stable but does not open as an image yet may still be being written by a
# slow writer that pauses; it is handed on anyway (and fails with a clear reason) after this.
UNREADABLE_GRACE = 10.0


@dataclass
class _Watch:
    root: Path
    settle: float
    identity: tuple[int, int] | None
    stable_since: float


@dataclass(frozen=True)
class Ready:
    """A settled file for the queue."""

    path: Path
    root: Path


class Settler(threading.Thread):
    """Collects touched paths and emits them, in batches, once each has been stable for its
    folder's `settle_seconds` and opens as an image (or has been stable for UNREADABLE_GRACE)."""

    def __init__(self, on_ready: Callable[[list[Ready]], None]) -> None:
        super().__init__(name="settle", daemon=True)
        self.on_ready = on_ready
        self._pending: dict[Path, _Watch] = {}
        self._cond = threading.Condition()
        self._stop = False

    def touch(self, path: Path, root: Path, settle_seconds: float) -> None:
        """An event for `path`: (re)start its stability timer."""
        with self._cond:
            w = self._pending.get(path)
            now = time.monotonic()
            if w is None:
                self._pending[path] = _Watch(root, settle_seconds, None, now)
            else:
                w.stable_since = now
            self._cond.notify()

    def forget(self, path: Path) -> None:
        with self._cond:
            self._pending.pop(path, None)

    def forget_under(self, folder: Path) -> None:
        with self._cond:
            for p in [p for p in self._pending if folder in p.parents]:
                del self._pending[p]

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()

    def run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                if not self._pending:
                    self._cond.wait()
                    continue
                tick = min(0.25, max(0.02, min(w.settle for w in self._pending.values()) / 4))
                self._cond.wait(tick)
                if self._stop:
                    return
                items = list(self._pending.items())
            ready = self._check(items)
            if ready:
                try:
                    self.on_ready(ready)
                except Exception as e:  # e.g. disk full under the database
                    log.warning("could not queue settled files; will try again",
                                error=f"{type(e).__name__}: {e}")
                    with self._cond:
                        self._cond.wait(1.0)
                    continue
                with self._cond:
                    for r in ready:
                        # Only drop it if no new event arrived meanwhile.
                        w = self._pending.get(r.path)
                        if w is not None and w.identity is not None and w.stable_since <= \
                                self._checked_at:
                            del self._pending[r.path]

    def _check(self, items: list[tuple[Path, _Watch]]) -> list[Ready]:
        now = time.monotonic()
        self._checked_at = now
        ready: list[Ready] = []
        gone: list[Path] = []
        for path, w in items:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                gone.append(path)
                continue
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):  # never open a FIFO or device to "check" it
                gone.append(path)
                continue
            identity = (st.st_size, st.st_mtime_ns)
            if identity != w.identity:
                w.identity = identity
                w.stable_since = now
                continue
            stable_for = now - w.stable_since
            if stable_for < w.settle:
                continue
            if _opens_as_image(path) or stable_for >= max(UNREADABLE_GRACE, w.settle):
                ready.append(Ready(path, w.root))
        if gone:
            with self._cond:
                for p in gone:
                    self._pending.pop(p, None)
        return ready


def _opens_as_image(path: Path) -> bool:
    """Header check only (cheap): the decode stage does the full, careful read."""
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - reading the header is the point
        return True
    except Exception:
        return False
