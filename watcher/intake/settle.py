"""Settle: a file is handed on once it is finished: closed with its end marker, or unchanged."""

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

from watcher.intake.complete import Verdict, check

log = structlog.get_logger("watcher.intake.settle")

# A file that is stable but does not open as an image yet may still be being written by a
# slow writer that pauses; it is handed on anyway (and fails with a clear reason) after this.
UNREADABLE_GRACE = 10.0


@dataclass
class _Watch:
    root: Path
    settle: float
    identity: tuple[int, int] | None  # (size, mtime_ns) when last seen
    stable_since: float
    check_at: float  # when to look at it next
    # The last event was its writer closing it (inotify IN_CLOSE_WRITE): if its end marker
    # is there it is finished now, without the settle wait. Any later change clears it.
    closed: bool = False


@dataclass(frozen=True)
class Ready:
    """A settled file for the queue."""

    path: Path
    root: Path


class Settler(threading.Thread):
    """Collects touched paths and emits them, in batches, once each is finished.

    Finished means: closed by its writer with its format's end marker as the last bytes
    (the close-write fast path, no wait), or stable for its folder's `settle_seconds` and
    then, for a format with an end marker (JPEG, PNG, GIF, WebP), with that marker present,
    for any other format opening as an image. A file that stays stable without either is
    handed on after UNREADABLE_GRACE anyway (and fails with a clear reason if it is broken).

    `clock` (seconds, monotonic) is what every timer is measured on; tests pass a fake one
    and call `run_once` instead of starting the thread, so no test waits for real time.
    """

    def __init__(
        self,
        on_ready: Callable[[list[Ready]], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name="settle", daemon=True)
        self.on_ready = on_ready
        self._clock = clock
        self._pending: dict[Path, _Watch] = {}
        self._cond = threading.Condition()
        self._stopping = False  # (not _stop: Thread has a method of that name, join() calls it)
        self._wake_at = float("inf")  # when the loop's current wait ends
        self._checked_at = 0.0

    def touch(self, path: Path, root: Path, settle_seconds: float, *, closed: bool = False) -> None:
        """An event for `path`: (re)start its stability timer. The file is stat'ed now, so
        one that does not change again is ready exactly `settle_seconds` later.

        `closed`: the event is its writer closing it after writing (Linux IN_CLOSE_WRITE):
        it is checked at once, and goes without the wait if its end marker is there."""
        identity = _identity(path)
        with self._cond:
            now = self._clock()
            w = self._pending.get(path)
            if w is None:
                w = self._pending[path] = _Watch(root, settle_seconds, identity, now, 0.0)
            w.identity, w.stable_since, w.closed = identity, now, closed
            w.check_at = now if closed else now + settle_seconds
            # Wake the loop only if this is due before what it is waiting for: a burst of
            # events then costs no wake-ups.
            if w.check_at < self._wake_at:
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

    def due_within(self, seconds: float) -> bool:
        """Whether a file's settle time ends within `seconds` (or has ended): soon queued.
        (A yes/no that stops at the first: the worker asks every few ms while it waits.)"""
        with self._cond:
            limit = self._clock() + seconds
            return any(w.check_at <= limit for w in self._pending.values())

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                now = self._clock()
                next_at = min((w.check_at for w in self._pending.values()), default=now + 3600.0)
                if next_at > now:
                    self._wake_at = next_at
                    self._cond.wait(next_at - now)
                    self._wake_at = float("inf")
                    continue
            if not self.run_once():
                continue  # could not queue them: they are due again in a second
            # Look again in a little while rather than at once: due files arriving over a
            # burst are then handled in groups.
            with self._cond:
                self._cond.wait(0.01)

    def run_once(self) -> bool:
        """Look at the files due now and hand the finished ones to `on_ready`, without
        waiting. False if `on_ready` failed (they are looked at again a second later).
        The thread's loop calls this; tests call it directly, with a fake clock."""
        with self._cond:
            now = self._clock()
            # What each due file looked like now: an event after this is judged later.
            due = [
                (p, w, _Seen(w.identity, w.stable_since, w.closed))
                for p, w in self._pending.items()
                if w.check_at <= now
            ]
        if not due:
            return True
        ready = self._check(due)
        if not ready:
            return True
        try:
            self.on_ready(ready)
        except Exception as e:  # e.g. disk full under the database
            log.warning(
                "could not queue settled files; will try again",
                error=f"{type(e).__name__}: {e}",
            )
            with self._cond:
                for r in ready:
                    if (w := self._pending.get(r.path)) is not None:
                        w.check_at = self._clock() + 1.0
            return False
        with self._cond:
            for r in ready:
                # Only drop it if no new event arrived meanwhile.
                w = self._pending.get(r.path)
                if w is not None and w.stable_since <= self._checked_at:
                    del self._pending[r.path]
        return True

    def _check(self, items: list[tuple[Path, _Watch, _Seen]]) -> list[Ready]:
        """Stat the due files: ready, changed (wait again), or gone."""
        now = self._clock()
        self._checked_at = now
        ready: list[tuple[Ready, _Watch, _Seen]] = []
        gone: list[tuple[Path, _Seen]] = []
        later: list[tuple[_Watch, _Seen, tuple[int, int] | None, float]] = []
        for path, w, seen in items:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                gone.append((path, seen))
                continue
            except OSError:  # unreadable for now: look again after a settle period
                later.append((w, seen, seen.identity, now + w.settle))
                continue
            if not stat.S_ISREG(st.st_mode):  # never open a FIFO or device to "check" it
                gone.append((path, seen))
                continue
            identity = (st.st_size, st.st_mtime_ns)
            if identity != seen.identity:  # changed without an event (or since it): wait again
                later.append((w, seen, identity, now + w.settle))
                continue
            if seen.closed:
                # Closed by its writer and unchanged since: finished if its end marker is
                # the end of the file. Otherwise (no marker in this format, or not there:
                # a writer that closes between parts) it waits out settle like any file.
                if check(path, strict=True) is Verdict.COMPLETE:
                    ready.append((Ready(path, w.root), w, seen))
                else:
                    later.append((w, seen, identity, seen.stable_since + w.settle))
                continue
            stable_for = now - seen.stable_since
            if _finished(path) or stable_for >= max(UNREADABLE_GRACE, w.settle):
                ready.append((Ready(path, w.root), w, seen))
            else:  # stable but not complete yet: maybe a writer that pauses; look again
                later.append((w, seen, identity, now + min(1.0, w.settle)))
        with self._cond:
            for p, seen in gone:
                current = self._pending.get(p)
                if current is not None and current.stable_since == seen.stable_since:
                    del self._pending[p]
            for w, seen, looked, check_at in later:
                if w.stable_since != seen.stable_since:  # an event since: it decides
                    continue
                if looked != w.identity:
                    w.identity, w.stable_since = looked, now
                w.check_at, w.closed = check_at, False
            # A file with an event since it was looked at is not handed on: its new timer
            # (or close check) decides, from what it holds now.
            return [r for r, w, seen in ready if w.stable_since == seen.stable_since]


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class _Seen:
    """A due file's watch as it was when the settle loop picked it."""

    identity: tuple[int, int] | None
    stable_since: float
    closed: bool


def _finished(path: Path) -> bool:
    """Whether a stable file may be handed on: its end marker is there, for a format that
    has one (a slowly written GIF has a valid header long before its last frame); otherwise
    its header opens as an image."""
    verdict = check(path, strict=False)
    if verdict is Verdict.UNKNOWN:
        return _opens_as_image(path)
    return verdict is Verdict.COMPLETE


def _opens_as_image(path: Path) -> bool:
    """Header check only (cheap): the decode stage does the full, careful read."""
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - reading the header is the point
        return True
    except Exception:
        return False
