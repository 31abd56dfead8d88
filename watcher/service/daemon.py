"""`watcher run`: observers + settle + scan feeding the queue, the pipeline draining it."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import structlog

from watcher.config import Config, ConfigError, FolderConfig, load_config
from watcher.index import Index, connect, file_identity, prefix_range, transaction
from watcher.intake.observer import Filter, FolderHandler, PassedOver, Sink, scan
from watcher.intake.settle import Ready, Settler
from watcher.jobs import JobQueue
from watcher.outputs.sidecar import (
    FolderMoved,
    SidecarRefused,
    remove_if_ours,
    rename_if_ours,
    render,
)
from watcher.paths import shown
from watcher.service.lock import AlreadyRunning, DatabaseLock
from watcher.service.notify import Notifier

log = structlog.get_logger("watcher.service.daemon")

# How often each watched folder is checked for being there (and being the same folder):
# a folder deleted, renamed away, replaced or unmounted gives no event we can rely on.
FOLDER_CHECK_SECONDS = 2.0
REPORTED_CAP = 10_000  # passed-over names remembered from events, so a repeat counts once


def with_command_line(cfg: Config, dirs: Sequence[Path]) -> Config:
    """The config's folders plus each folder given on the command line that the config does
    not list itself (those keep their configured settings): at start and at every reload."""
    configured = {f.path for f in cfg.folders}
    extra = [d for d in dict.fromkeys(dirs) if d not in configured]
    if not extra:
        return cfg
    return dataclasses.replace(cfg, folders=cfg.folders + cfg.with_folders(extra).folders)


class Tracker(Sink):
    """Applies file events to the database: enqueue settled files, follow moves, drop deletes.
    One connection, used under a lock by the observer threads, the settler and scans."""

    def __init__(self, cfg: Config, settler_factory) -> None:
        self.cfg = cfg
        self.db = connect(cfg.database)
        self.index = Index(self.db)
        self.jobs = JobQueue(self.db)
        self.lock = threading.Lock()
        self.settler: Settler = settler_factory(self.enqueue_ready)
        self.on_enqueued: Callable[[int], None] = lambda queued: None
        self.stopping = threading.Event()
        # Per watched folder: files passed over by name (last full scan, plus events since).
        self.passed_over: dict[Path, PassedOver] = {}
        self._reported: set[Path] = set()
        self.changed = threading.Event()  # something `watcher status` shows changed

    # -- from the settler ---------------------------------------------------------------
    def enqueue_ready(self, ready: list[Ready]) -> None:
        with self.lock:
            n = self.jobs.enqueue_many((r.path, r.root) for r in ready)
        if n:
            log.debug("queued", files=n)
            self.on_enqueued(n)

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
                self.index.delete(str(dest))
                self.index.move(str(src), str(dest), new_sidecar)
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

    def _move_sidecar(self, row, dest: Path, folder: FolderConfig) -> str | None:
        if not row.sidecar or not row.sidecar_sha256:
            return None
        old = Path(row.sidecar)
        try:
            new = render(folder.sidecar, dest)
            if self.index.sidecar_owner(str(new)):
                return None
            # Both folders opened from the root without following links (sidecar.py).
            rename_if_ours(Path(row.root), old, new, row.sidecar_sha256, folder.extensions)
        except (FileExistsError, ValueError):  # the name is taken, or it is not ours now
            return None
        except (OSError, FolderMoved, SidecarRefused) as e:
            log.warning(
                "could not rename our sidecar with its image",
                sidecar=shown(old),
                reason=getattr(e, "reason", None) or getattr(e, "strerror", str(e)),
            )
            return None
        return str(new)

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
        from watcher.captioning import expected_under, restore_sidecars

        if not os.path.isdir(top or folder.path):
            # Gone (the folder check says so for a root): a scan would see no files and
            # take every row under it for deleted.
            log.info("scan skipped: folder not there", folder=shown(top or folder.path))
            return
        with self.lock:
            # With each row's sidecar and settings: a sidecar written with other settings,
            # or gone, is work to do too.
            indexed = expected_under(self.db, top or folder.path, folder, self.cfg.model)
            failed = self.jobs.failed_under(top or folder.path)
        result = scan(Filter(folder), indexed, failed, top=top)
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
            return self.db.conn.execute(
                "SELECT count(*) FROM images WHERE path >= ? AND path < ?", prefix_range(root)
            ).fetchone()[0]

    def close(self) -> None:
        with self.lock:
            self.db.conn.close()


class Watch:
    """One configured folder: its observer (native events, or polling) and whether the
    folder is there. `state`: watching; missing (not there, or not a folder, or its disk
    not mounted: waiting for it to appear); error (the OS refused the watch)."""

    def __init__(self, folder: FolderConfig, sink: Sink) -> None:
        self.folder = folder
        self.sink = sink
        self.state = "missing"
        self.error: str | None = None  # why, for missing and error
        self.since = time.time()  # when the state began
        self.observer = None
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
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        folder = self.folder
        obs = PollingObserver(timeout=folder.poll_interval) if folder.polling else Observer()
        try:
            st = os.stat(path)
            obs.schedule(FolderHandler(folder, self.sink), str(path), recursive=True)
            obs.start()
        except OSError as e:
            self._set("error", _watch_error(folder, e))
            log.error("cannot watch folder", folder=shown(path), reason=self.error)
            try:
                obs.stop()
            except Exception:
                pass
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

    def _set(self, state: str, error: str | None) -> None:
        if state != self.state:
            self.since = time.time()
        self.state, self.error = state, error

    def check(self) -> str | None:
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

    def describe(self) -> dict:
        passed = getattr(self.sink, "passed_over", {}).get(self.folder.path)
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


def _watch_error(folder: FolderConfig, e: OSError) -> str:
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


class Daemon:
    def __init__(
        self,
        cfg: Config,
        config_path: Path | None,
        err: TextIO,
        cli_dirs: Sequence[Path] = (),
        folder_check_seconds: float | None = None,
    ) -> None:
        self.cli_dirs = tuple(cli_dirs)  # watched across reloads, besides the config's
        cfg = with_command_line(cfg, self.cli_dirs)
        self.cfg = cfg
        self.err = err  # where refusals go for the user, besides the log
        self.config_path = config_path
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.wake = threading.Event()
        self.notifier = Notifier.from_env()
        self.watches: dict[Path, Watch] = {}
        self._worker_stuck = False
        if folder_check_seconds is None:  # the environment: for tests, and slow disks
            folder_check_seconds = float(
                os.environ.get("WATCHER_FOLDER_CHECK_SECONDS", FOLDER_CHECK_SECONDS)
            )
        self.folder_check_seconds = max(0.05, folder_check_seconds)
        self._db_identity: tuple[int, int] | None = None  # (st_dev, st_ino) opened at start
        self.exit_code = 0

    def run(self) -> int:
        from watcher.backends import ModelUnavailable, open_backend
        from watcher.pipeline.stages import Pipeline

        cfg = self.cfg
        lock = DatabaseLock(cfg.database)
        try:
            lock.acquire("run")
        except AlreadyRunning as e:
            log.error("refusing to start", reason=str(e))
            print(f"watcher: {e}", file=self.err)
            return 2
        try:
            db = connect(cfg.database)
            self._db_identity = file_identity(cfg.database)
            recovered = JobQueue(db).recover()
            if recovered:
                log.info("re-queued jobs interrupted by the last run", jobs=recovered)
            db.conn.close()
            try:
                backend = open_backend(cfg.model, cfg.log)
            except ModelUnavailable as e:
                log.error("model unavailable", reason=str(e))
                print(f"watcher: {e}", file=self.err)
                return 2
            # The backend has logged device, dtype and memory in use ("model ready").
            self.tracker = Tracker(cfg, Settler)
            self.pipeline = Pipeline(cfg, backend, upstream=self.tracker.settler.due_within)
            self.tracker.on_enqueued = self.pipeline.wake
            self.pipeline.start()
            self.tracker.settler.start()
            self._install_signals()
            for folder in cfg.folders:
                self._add_folder(folder)
            self._write_daemon_row(started=True)
            self.notifier.ready()
            log.info(
                "watching",
                folders=[shown(f.path) for f in cfg.folders],
                missing=[shown(p) for p, w in self.watches.items() if w.state == "missing"],
            )
            self._loop()
            self.notifier.stopping()
            log.info("stopping")
            self.tracker.stopping.set()
            for w in self.watches.values():
                w.stop()
            self.tracker.settler.stop()
            self.pipeline.stop()
            backend.close()
            self._write_daemon_row(stopped=True)
            self.tracker.close()
            log.info("stopped", exit_code=self.exit_code)
            return self.exit_code
        finally:
            lock.release()

    # -- folders ------------------------------------------------------------------------
    def _add_folder(self, folder: FolderConfig) -> None:
        watch = Watch(folder, self.tracker)
        self.watches[folder.path] = watch
        if watch.start():
            self._catch_up(folder)
        elif watch.state == "missing":
            log.error(
                "watched folder missing",
                folder=shown(folder.path),
                reason=watch.error,
                action="waiting for it to appear; it is watched and scanned once it does",
            )

    def _catch_up(self, folder: FolderConfig) -> None:
        threading.Thread(target=self.tracker.scan, args=(folder,), daemon=True, name="scan").start()

    def _check_folders(self) -> None:
        """Notice watched folders that went away, came back or were replaced: say so, and
        watch and scan again. A missing folder's index rows are kept (it may be a disk
        not mounted); the catch-up scan when it is back removes the rows of files gone."""
        changed = False
        for path, watch in list(self.watches.items()):
            try:
                what = watch.check()
            except Exception as e:  # a bug here must not stop the loop
                log.error(
                    "cannot check a watched folder",
                    folder=shown(path),
                    error=f"{type(e).__name__}: {e}",
                )
                continue
            if what is None:
                continue
            changed = True
            if what == "missing":
                self.tracker.settler.forget_under(path)
                try:
                    rows = self.tracker.indexed_under(path)
                except sqlite3.Error:
                    rows = None
                log.error(
                    "watched folder missing",
                    folder=shown(path),
                    reason=watch.error,
                    indexed_images=rows,
                    action="waiting for it to appear; its index rows are kept until then",
                )
                continue
            if what == "back":
                log.warning(
                    "watched folder is back",
                    folder=shown(path),
                    action="watching it again, with a catch-up scan",
                )
            else:
                log.warning(
                    "watched folder replaced",
                    folder=shown(path),
                    reason="another folder now has its name",
                    action="watching the new one, with a catch-up scan",
                )
            if watch.start():
                self._catch_up(watch.folder)
        if changed or self.tracker.changed.is_set():
            self.tracker.changed.clear()
            try:
                self._write_daemon_row()
            except sqlite3.Error as e:
                log.warning("cannot write to the database", error=str(e))

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            # Started without a config file: the default one, if it exists now, else the
            # defaults; either way the folders given on the command line stay watched.
            new = load_config(
                self.config_path,
                required=self.config_path is not None or self.cfg.source is not None,
            )
        except ConfigError as e:
            log.error("config reload refused; keeping the running config", reason=str(e))
            self.notifier.ready()
            return
        new = with_command_line(new, self.cli_dirs)
        if new.database != self.cfg.database or new.model != self.cfg.model:
            log.warning(
                "database and model changes need a restart; applying folder changes",
                database=str(new.database),
            )
            new = dataclasses.replace(new, database=self.cfg.database, model=self.cfg.model)
        old_folders = {f.path: f for f in self.cfg.folders}
        new_folders = {f.path: f for f in new.folders}
        for path, folder in old_folders.items():
            if new_folders.get(path) != folder:
                self.watches.pop(path).stop()
                log.info("stopped watching", folder=shown(path))
        self.cfg = new
        self.tracker.cfg = new
        self.pipeline.set_config(new)
        for path, folder in new_folders.items():
            if old_folders.get(path) != folder:
                self._add_folder(folder)
                if self.watches[path].state == "watching":
                    log.info("now watching", folder=shown(path))
        self._write_daemon_row()
        self.notifier.ready()
        log.info("config reloaded", folders=len(new_folders))
        self._check_folders()  # a folder that appeared meanwhile is watched now

    # -- main loop ----------------------------------------------------------------------
    def _install_signals(self) -> None:
        def stop(*_) -> None:
            self.stop_event.set()
            self.wake.set()

        def reload(*_) -> None:
            self.reload_event.set()
            self.wake.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def _loop(self) -> None:
        wd = self.notifier.watchdog_interval()
        tick = min(2.0, wd / 3) if wd else 2.0
        tick = min(tick, self.folder_check_seconds)
        next_check = time.monotonic() + self.folder_check_seconds
        next_rescan = {f.path: self._rescan_at(f) for f in self.cfg.folders}
        while not self.stop_event.is_set():
            if self.reload_event.is_set():
                self.reload_event.clear()
                self._reload()
                next_rescan = {f.path: self._rescan_at(f) for f in self.cfg.folders}
            now = time.monotonic()
            if now >= next_check:
                next_check = now + self.folder_check_seconds
                self._check_folders()
            for f in self.cfg.folders:
                due = next_rescan.get(f.path)
                if due is not None and now >= due:
                    next_rescan[f.path] = self._rescan_at(f)
                    watch = self.watches.get(f.path)
                    if watch is not None and watch.state == "watching":
                        self._catch_up(f)
            self._heartbeat(wd)
            self.wake.wait(tick)  # a signal sets it: stop and reload are handled at once
            self.wake.clear()

    def _rescan_at(self, folder: FolderConfig) -> float | None:
        if folder.rescan_minutes <= 0:
            return None
        return time.monotonic() + folder.rescan_minutes * 60

    def _heartbeat(self, wd: float | None) -> None:
        if not self._database_still_there():
            return
        try:
            with self.tracker.lock:
                counts = self.tracker.jobs.counts()
                with transaction(self.tracker.db):
                    self.tracker.db.conn.execute(
                        "UPDATE daemon SET heartbeat = ? WHERE id = 1", (time.time(),)
                    )
        except sqlite3.Error as e:  # disk full under the database: keep running, say so
            log.warning("cannot write to the database", error=str(e))
        else:
            self.notifier.status(
                f"{counts['pending'] + self.tracker.settler.pending()} queued, "
                f"{counts['running']} running, {counts['done']} done, "
                f"{counts['failed']} failed"
            )
        # Only a worker that is alive and not stuck in one model call pets the watchdog.
        worker = self.pipeline.worker
        stuck_after = wd if wd else 600
        silent = worker.stalled_for()
        if worker.is_alive() and silent < stuck_after:
            self.notifier.watchdog()
            if self._worker_stuck:
                log.info("model worker responding again")
                self._worker_stuck = False
        elif not self._worker_stuck:  # said once, not at every tick
            self._worker_stuck = True
            log.error(
                "model worker is not responding; not confirming the watchdog",
                seconds=round(silent),
                alive=worker.is_alive(),
            )

    def _database_still_there(self) -> bool:
        """False (and the daemon stopping, exit 1) once the database file has been deleted or
        replaced: every connection would go on writing into the old, unlinked file, and
        `watcher status`/`search` would read another. Stopping with a failure lets the
        service manager start it again (Restart=on-failure, KeepAlive), on a new database."""
        now = file_identity(self.cfg.database)
        if now == self._db_identity or self.stop_event.is_set():
            return True
        log.error(
            "database file deleted or replaced while running; stopping (exit 1) so "
            "that a restart opens the database at its path",
            database=str(self.cfg.database),
            gone=now is None,
        )
        print(
            f"watcher: the database {self.cfg.database} was "
            f"{'deleted' if now is None else 'replaced'} while running; stopping",
            file=self.err,
        )
        self.exit_code = 1
        self.stop_event.set()
        return False

    def _write_daemon_row(self, *, started: bool = False, stopped: bool = False) -> None:
        folders = json.dumps([w.describe() for w in self.watches.values()])
        with self.tracker.lock, transaction(self.tracker.db):
            if started:
                self.tracker.db.conn.execute(
                    """INSERT OR REPLACE INTO daemon (id, pid, started, heartbeat, folders,
                       stopped) VALUES (1, ?, ?, ?, ?, NULL)""",
                    (os.getpid(), time.time(), time.time(), folders),
                )
            elif stopped:
                self.tracker.db.conn.execute(
                    "UPDATE daemon SET stopped = ?, folders = ? WHERE id = 1",
                    (time.time(), folders),
                )
            else:
                self.tracker.db.conn.execute(
                    "UPDATE daemon SET folders = ? WHERE id = 1", (folders,)
                )


def run_daemon(
    cfg: Config, config_path: Path | None, err: TextIO, cli_dirs: Sequence[Path] = ()
) -> int:
    # The daemon never talks to the Hub: weights come from the local cache or model.path.
    # Set before transformers/huggingface_hub are imported (they read it at import).
    os.environ["HF_HUB_OFFLINE"] = "1"
    return Daemon(cfg, config_path, err, cli_dirs).run()
