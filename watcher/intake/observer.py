"""Watching a folder: a watchdog observer per folder, its handler turning events into Sink calls.

As in watchdog: the observer (native inotify/FSEvents, or polling) runs an emitter thread per
watched folder that produces events; the handler scheduled with it is called for each one.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler

from watcher.config import FolderConfig
from watcher.intake.filter import NOT_REGULAR, Filter

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

log = structlog.get_logger("watcher.intake.observer")


class Sink:
    """What a folder's handler reports to (the daemon's FileEvents; a recorder in tests).
    Every method is a no-op here: a sink overrides those it acts on."""

    def file_touched(self, path: Path, folder: FolderConfig) -> None: ...

    def file_closed(self, path: Path, folder: FolderConfig) -> None:
        """Its writer closed it after writing (Linux inotify IN_CLOSE_WRITE)."""
        self.file_touched(path, folder)

    def file_deleted(self, path: Path, folder: FolderConfig) -> None: ...
    def file_moved(self, src: Path, dest: Path, folder: FolderConfig) -> None: ...
    def dir_appeared(self, path: Path, folder: FolderConfig) -> None: ...
    def dir_deleted(self, path: Path, folder: FolderConfig) -> None: ...
    def file_skipped(self, path: Path, folder: FolderConfig, reason: str) -> None: ...
    def file_passed_over(self, path: Path, folder: FolderConfig, reason: str) -> None: ...


class FolderHandler(FileSystemEventHandler):
    """watchdog event handler for one watched folder: turns raw events into Sink calls."""

    def __init__(self, folder: FolderConfig, sink: Sink) -> None:
        self.folder = folder
        self.filter = Filter(folder)
        self.sink = sink
        # Files with the sidecar pattern's extension are our own writes (or look like them):
        # never reported as passed over from an event (a scan checks them exactly).
        self._sidecar_ext = os.path.splitext(folder.sidecar)[1].lower()

    def dispatch(self, event: FileSystemEvent) -> None:  # watchdog calls this for every event
        # In place of the base class's on_created/on_moved/...: a move is one decision
        # about both names, and an error in one event must not reach watchdog's thread.
        try:
            self._dispatch(event)
        except Exception:
            log.exception("error handling a file event", file_event=repr(event))

    def _followable(self, path: Path) -> bool:
        """Not a symlink out of the root or in a loop, and not a named pipe, socket or
        device (opening a FIFO blocks until someone writes to it)."""
        refused = self.filter.refused_link(path)
        if refused is None:
            try:
                mode = os.stat(path).st_mode
            except OSError:
                return True  # gone already, or not readable: the later stages say so
            if not stat.S_ISREG(mode):
                refused = NOT_REGULAR
        if refused is not None:
            log.warning("skipped", path=str(path), reason=refused)
            self.sink.file_skipped(path, self.folder, refused)
        return refused is None

    def _dispatch(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        if kind in ("opened", "closed_no_write"):
            return
        src = Path(os.fsdecode(event.src_path))
        dest = Path(os.fsdecode(event.dest_path)) if getattr(event, "dest_path", "") else None
        if event.is_directory:
            if src == self.folder.path and kind in ("deleted", "moved"):
                # The watched folder itself went away: the daemon's folder check says so and
                # keeps its rows (it may be a disk unmounted); a catch-up scan when it is
                # back removes what is really gone.
                return
            if kind == "created" and self.filter.wants_dir(src):
                self.sink.dir_appeared(src, self.folder)
            elif kind == "deleted":
                self.sink.dir_deleted(src, self.folder)
            elif kind == "moved" and not getattr(event, "is_synthetic", False):
                # Rows under the old name go; a scan of the new name re-finds the files
                # (their bytes are known, so no model work) and their sidecars came along.
                self.sink.dir_deleted(src, self.folder)
                if dest is not None and self.filter.wants_dir(dest):
                    self.sink.dir_appeared(dest, self.folder)
            return
        if getattr(event, "is_synthetic", False):
            return  # sub-events of a directory move; the dir_appeared scan covers them
        if kind in ("created", "modified", "closed"):
            if self.filter.wants(src):
                if self._followable(src):
                    # Only inotify reports closes; `fast_close: false` treats them as any change.
                    if kind == "closed" and self.folder.fast_close:
                        self.sink.file_closed(src, self.folder)
                    else:
                        self.sink.file_touched(src, self.folder)
            elif kind == "created":
                self._passed_over(src)
        elif kind == "deleted":
            if self.filter.wants(src):
                self.sink.file_deleted(src, self.folder)
        elif kind == "moved" and dest is not None:
            src_ok = self.filter.wants(src)
            dest_ok = self.filter.wants(dest) and self.filter.relative(dest) is not None
            if dest_ok and not self._followable(dest):
                if src_ok:
                    self.sink.file_deleted(src, self.folder)
            elif src_ok and dest_ok:
                self.sink.file_moved(src, dest, self.folder)
            elif dest_ok:  # atomic save: `photo.jpg.part` -> `photo.jpg`, or moved in
                self.sink.file_touched(dest, self.folder)
            elif src_ok:  # moved out of the tree, or renamed to something we ignore
                self.sink.file_deleted(src, self.folder)
            if not dest_ok and self.filter.relative(dest) is not None:
                self._passed_over(dest)

    def _passed_over(self, path: Path) -> None:
        if path.suffix.lower() == self._sidecar_ext:
            return
        reason = self.filter.passed_over(path)
        if reason is not None:
            self.sink.file_passed_over(path, self.folder, reason)


def start_observer(folder: FolderConfig, sink: Sink) -> BaseObserver:
    """A started observer on `folder` (recursive), its events going to `sink`: native events,
    or polling every `poll_interval` with `polling: true` (network shares, FUSE mounts).
    Raises OSError when the OS refuses the watch (the observer is stopped again then)."""
    from watchdog.observers import Observer
    from watchdog.observers.polling import PollingObserver

    obs = PollingObserver(timeout=folder.poll_interval) if folder.polling else Observer()
    try:
        obs.schedule(FolderHandler(folder, sink), str(folder.path), recursive=True)
        obs.start()
    except OSError:
        try:
            obs.stop()
        except Exception:  # it never started: nothing to clean up
            pass
        raise
    return obs
