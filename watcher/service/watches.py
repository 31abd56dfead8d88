"""The watched folders: one observer each, and whether each folder is there (and the same)."""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import TYPE_CHECKING, Any, Literal

import structlog

from watcher.config import FolderConfig
from watcher.intake.filter import PassedOver
from watcher.intake.observer import Sink, start_observer
from watcher.paths import shown

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

log = structlog.get_logger("watcher.service.watches")

# watching; missing (not there, not a folder, or its disk not mounted: waiting for it to
# appear); error (the OS refused the watch: a limit reached, or no permission).
WatchState = Literal["watching", "missing", "error"]
# What a check noticed: the folder went away, appeared, or another folder has its name.
Change = Literal["missing", "back", "replaced"]


class Watch:
    """One configured folder: its observer (native events, or polling) and whether the
    folder is there. `state`: watching; missing (not there, or not a folder, or its disk
    not mounted: waiting for it to appear); error (the OS refused the watch)."""

    def __init__(self, folder: FolderConfig, sink: Sink) -> None:
        self.folder = folder
        self.sink = sink
        self.state: WatchState = "missing"
        self.error: str | None = None  # why, for missing and error
        self.since = time.time()  # when the state began
        self.observer: BaseObserver | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) being watched
        self._mount = False  # the folder is a mount point: unmounted is missing

    def start(self) -> bool:
        """Watch the folder if it is there. True when watching (the caller scans it)."""
        self.stop()
        path = self.folder.path
        missing = self._missing_reason()
        if missing is not None:
            self._set("missing", missing)
            return False
        try:
            st = os.stat(path)
            obs = start_observer(self.folder, self.sink)
        except OSError as e:
            self._set("error", watch_error(self.folder, e))
            log.error("cannot watch folder", folder=shown(path), reason=self.error)
            return False
        self.observer = obs
        self._identity = (st.st_dev, st.st_ino)
        self._mount = os.path.ismount(path)
        self._set("watching", None)
        return True

    def _missing_reason(self) -> str | None:
        path = self.folder.path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return "does not exist"
        except OSError as e:
            return e.strerror or str(e)
        if not stat.S_ISDIR(st.st_mode):
            return "not a folder"
        if self._mount and not os.path.ismount(path):
            return "its disk is not mounted"
        return None

    def _set(self, state: WatchState, error: str | None) -> None:
        if state != self.state:
            self.since = time.time()
        self.state, self.error = state, error

    def check(self) -> Change | None:
        """Look at the folder again: 'missing' (it went away), 'back' (it appeared) or
        'replaced' (another folder now has its name), when that happened; else None.
        The caller then calls start() for 'back' and 'replaced', and scans."""
        if self.state == "error":
            return None
        missing = self._missing_reason()
        if self.state == "missing":
            return "back" if missing is None else None
        if missing is not None:
            self.stop()
            self._set("missing", missing)
            return "missing"
        try:
            st = os.stat(self.folder.path)
        except OSError:
            return None  # raced with a removal: the next check sees it
        if (st.st_dev, st.st_ino) != self._identity or not self._emitting():
            return "replaced"
        return None

    def _emitting(self) -> bool:
        # A folder removed and made again at once often gets the same inode number back, so
        # the identity alone misses it; the old watch, though, ended with its folder
        # (watchdog stops an emitter whose root is deleted).
        obs = self.observer
        return obs is None or all(e.is_alive() for e in getattr(obs, "emitters", ()))

    def stop(self) -> None:
        if self.observer is not None:
            try:
                self.observer.stop()
                self.observer.join(5)
            except Exception as e:  # its folder is gone: nothing to clean up
                log.debug("observer stop", error=str(e))
            self.observer = None

    def describe(self, passed: PassedOver | None = None) -> dict[str, Any]:
        """The folder as `watcher status` shows it (kept in the daemon row), with the files
        passed over in it (by name: FileEvents.passed_over)."""
        return {
            "path": str(self.folder.path),
            "polling": self.folder.polling,
            "task": self.folder.task,
            "state": self.state,
            "since": self.since,
            "error": self.error if self.state == "error" else None,
            "missing": self.error if self.state == "missing" else None,
            "passed_over": passed.to_json() if passed else [],
        }


def watch_error(folder: FolderConfig, e: OSError) -> str:
    """Why the OS refused to watch `folder`, and the fix when it is a limit."""
    if e.errno in (errno.ENOSPC, errno.EMFILE):
        limit = (
            "fs.inotify.max_user_watches"
            if e.errno == errno.ENOSPC
            else "fs.inotify.max_user_instances"
        )
        return (
            f"the OS refused more file watches ({limit} reached). Fix: raise it, e.g. "
            f"`sudo sysctl {limit}=524288` (and persist it in /etc/sysctl.d/), or set "
            f"`polling: true` for this folder"
        )
    return f"{e.strerror or e}: {folder.path}"
