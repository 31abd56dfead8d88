"""File events and scans into job rows: the daemon's intake, behind the observers."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from watcher.captioning import restore_sidecars
from watcher.config import Config, FolderConfig
from watcher.index import ImageRow, Index, connect, transaction
from watcher.intake.filter import PassedOver
from watcher.intake.observer import Sink
from watcher.intake.scan import scan_folder
from watcher.intake.settle import Ready, Settler
from watcher.jobs import JobQueue
from watcher.outputs.embed import OWN_WRITES
from watcher.outputs.sidecar import follow_image, remove_if_ours
from watcher.outputs.xmp import follow as follow_xmp
from watcher.paths import shown

log = structlog.get_logger("watcher.intake.events")

REPORTED_CAP = 10_000  # passed-over names remembered from events, so a repeat counts once


class FileEvents(Sink):
    """Keeps the index and the job queue in step with the files in the watched folders: file
    events (from the observers) and catch-up scans become job rows (through the settler for
    new and changed files), moves and deletes carry or drop index rows and our sidecars.
    One connection, used under `lock` by the observer threads, the settler, scans and the
    daemon's loop (heartbeat, lifecycle row)."""

    def __init__(
        self,
        cfg: Config,
        settler_factory: Callable[[Callable[[list[Ready]], None]], Settler],
        on_enqueued: Callable[[int], None] = lambda queued: None,
    ) -> None:
        self.cfg = cfg  # see set_config
        self.db = connect(cfg.database)
        self.index = Index(self.db)
        self.jobs = JobQueue(self.db)
        self.lock = threading.Lock()
        # The settler hands settled files back here (enqueue_ready).
        self.settler: Settler = settler_factory(self.enqueue_ready)
        self.on_enqueued = on_enqueued  # jobs were queued (or a queued one moved): wake
        self.stopping = threading.Event()
        # Per watched folder: files passed over by name (last full scan, plus events since).
        self.passed_over: dict[Path, PassedOver] = {}
        self._reported: set[Path] = set()
        self.changed = threading.Event()  # something `watcher status` shows changed

    def set_config(self, cfg: Config) -> None:
        """A reload: scans from now on use the new config (model settings, to tell outdated
        sidecars; sidecar restores). Folder settings come with each event and scan."""
        self.cfg = cfg

    # -- from the settler ---------------------------------------------------------------
    def enqueue_ready(self, ready: list[Ready]) -> None:
        with self.lock:
            # The rename that embedded a description (the embed output) is an event like
            # any other: the file as that write left it is known, not new work.
            ready = [r for r in ready if not self._own_write(r.path)]
            n = self.jobs.enqueue_many(((r.path, r.root) for r in ready), settled=True)
        if n:
            log.debug("queued", files=n)
            self.on_enqueued(n)

    def _own_write(self, path: Path) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        # Written by this process but perhaps not committed yet (OWN_WRITES), or recorded in
        # the index row (written before a restart, or by `watcher retry`).
        seen = (str(path), st.st_size, st.st_mtime_ns)
        return OWN_WRITES.matches(*seen) or self.index.is_own_write(*seen)

    # -- from the observers -------------------------------------------------------------
    def file_touched(self, path: Path, folder: FolderConfig) -> None:
        self.settler.touch(path, folder.path, folder.settle_seconds)

    def file_passed_over(self, path: Path, folder: FolderConfig, reason: str) -> None:
        with self.lock:
            if path in self._reported:
                return
            if len(self._reported) < REPORTED_CAP:
                self._reported.add(path)
            self.passed_over.setdefault(folder.path, PassedOver()).add(path, reason)
        log.info("passed over", path=shown(path), reason=reason)
        self.changed.set()

    def file_closed(self, path: Path, folder: FolderConfig) -> None:
        self.settler.touch(path, folder.path, folder.settle_seconds, closed=True)

    def file_skipped(self, path: Path, folder: FolderConfig, reason: str) -> None:
        self.settler.forget(path)
        with self.lock, transaction(self.db):
            self.jobs.skip(path, folder.path, reason)

    def file_deleted(self, path: Path, folder: FolderConfig) -> None:
        self.settler.forget(path)
        with self.lock, transaction(self.db):
            row = self.index.get(str(path))
            self.index.delete(str(path))
            self.jobs.forget(str(path))
        if row is None:
            return
        log.info("image deleted; index row removed", path=shown(path))
        if folder.on_delete == "remove-ours" and row.sidecar and row.sidecar_sha256:
            # Through the folder opened from the root without following links (sidecar.py).
            if remove_if_ours(Path(row.root), Path(row.sidecar), row.sidecar_sha256):
                log.info("removed our sidecar", sidecar=shown(row.sidecar))

    def file_moved(self, src: Path, dest: Path, folder: FolderConfig) -> None:
        self.settler.forget(src)
        # One write transaction from reading the row to moving it: the writer cannot commit
        # this image's row in between (it would be left behind under the old name).
        with self.lock, transaction(self.db):
            row = self.index.get(str(src))
            if row is None:
                # Not captioned yet, perhaps in flight: the job follows the file and runs
                # again under the new name; a result in flight for the old name is dropped.
                moved = self.jobs.move(str(src), str(dest), rerun=True)
                new_sidecar = None
            else:
                moved = False
                new_sidecar = self._move_sidecar(row, dest, folder)
                xmp = follow_xmp(self.index, Path(row.root), src, dest, folder)
                self.index.delete(str(dest))
                self.index.move(str(src), str(dest), new_sidecar)
                if xmp is not None:  # its record follows the row; now its new name too
                    self.index.set_outputs(str(dest), [xmp])
                self.jobs.move(str(src), str(dest))
        if row is not None:
            log.info(
                "image moved; index row follows",
                src=shown(src),
                dest=shown(dest),
                sidecar=new_sidecar and shown(new_sidecar),
            )
        if moved:
            self.on_enqueued(0)
        elif new_sidecar is None:
            # No sidecar followed (or never captioned): queue the new name; identical bytes
            # are known, so no model work.
            self.settler.touch(dest, folder.path, folder.settle_seconds)

    def _move_sidecar(self, row: ImageRow, dest: Path, folder: FolderConfig) -> str | None:
        if not row.sidecar or not row.sidecar_sha256:
            return None
        new = follow_image(
            Path(row.root),
            Path(row.sidecar),
            folder.sidecar,
            dest,
            row.sidecar_sha256,
            folder.extensions,
            what="sidecar",
            refuse=lambda new: bool(self.index.sidecar_owner(str(new))),
            log=log,
        )
        return None if new is None else str(new)

    def dir_appeared(self, path: Path, folder: FolderConfig) -> None:
        # Files created before the new folder's watch existed produce no events: scan it.
        threading.Thread(
            target=self.scan, args=(folder, path), daemon=True, name="scan-dir"
        ).start()

    def dir_deleted(self, path: Path, folder: FolderConfig) -> None:
        self.settler.forget_under(path)
        with self.lock:
            gone = list(self.index.stats_under(str(path)))
            with transaction(self.db):
                for p in gone:
                    self.index.delete(p)
                    self.jobs.forget(p)
        if gone:
            log.info("folder gone; index rows removed", folder=shown(path), images=len(gone))

    # -- catch-up scan ------------------------------------------------------------------
    def scan(self, folder: FolderConfig, top: Path | None = None) -> None:
        """Catch-up scan; a database error (disk full) is retried with backoff. Any other
        error is logged with its folder (the thread ends; the next scan starts afresh)."""
        delay = 1.0
        while not self.stopping.is_set():
            try:
                self._scan(folder, top)
                return
            except sqlite3.Error as e:
                log.warning(
                    "scan could not write to the database; will retry",
                    folder=shown(top or folder.path),
                    error=str(e),
                    seconds=delay,
                )
                self.stopping.wait(delay)
                delay = min(delay * 2, 60.0)
            except Exception as e:
                log.error(
                    "scan failed",
                    folder=shown(top or folder.path),
                    error=f"{type(e).__name__}: {e}",
                    exc_info=e,
                )
                return

    def _scan(self, folder: FolderConfig, top: Path | None = None) -> None:
        t0 = time.perf_counter()
        if not os.path.isdir(top or folder.path):
            # Gone (the folder check says so for a root): a scan would see no files and
            # take every row under it for deleted.
            log.info("scan skipped: folder not there", folder=shown(top or folder.path))
            return
        result = scan_folder(self.db, folder, self.cfg.model, top=top, lock=self.lock)
        with self.lock:
            with transaction(self.db):
                for p in result.removed:
                    self.index.delete(p)
                    self.jobs.forget(p)
                self.jobs.set_skipped(top or folder.path, folder.path, result.skipped)
            n = self.jobs.enqueue_many((p, folder.path) for p in result.queue)
            if top is None or top == folder.path:
                self.passed_over[folder.path] = result.passed_over
                self._reported.clear()
            else:
                self.passed_over.setdefault(folder.path, PassedOver()).merge(result.passed_over)
            restore_sidecars(self.db, self.cfg, result.restore)
        self.changed.set()
        log.info(
            "scan done",
            folder=shown(top or folder.path),
            new=result.new,
            changed=result.changed,
            up_to_date=result.up_to_date,
            removed=len(result.removed),
            failed_before=result.failed_before,
            outdated=len(result.outdated),
            sidecars_restored=len(result.restore),
            skipped=len(result.skipped),
            passed_over=result.passed_over.total,
            seconds=round(time.perf_counter() - t0, 3),
        )
        if n:
            self.on_enqueued(n)

    def indexed_under(self, root: Path) -> int:
        with self.lock:
            return Index(self.db).count_under(root)

    def close(self) -> None:
        with self.lock:
            self.db.conn.close()
