"""`watcher run`: observers + settle + scan feeding the queue, the pipeline draining it."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import structlog

from watcher.config import Config, ConfigError, FolderConfig, load_config
from watcher.index import Index, connect, transaction
from watcher.lock import AlreadyRunning, DatabaseLock
from watcher.notify import Notifier
from watcher.observer import Filter, FolderHandler, Sink, scan
from watcher.queue import JobQueue
from watcher.settle import Ready, Settler
from watcher.sidecar import file_hash, render

log = structlog.get_logger("watcher.daemon")


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
        log.info("image deleted; index row removed", path=str(path))
        if folder.on_delete == "remove-ours" and row.sidecar and row.sidecar_sha256:
            sidecar = Path(row.sidecar)
            if file_hash(sidecar) == row.sidecar_sha256:
                sidecar.unlink(missing_ok=True)
                log.info("removed our sidecar", sidecar=row.sidecar)

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
            log.info("image moved; index row follows", src=str(src), dest=str(dest),
                     sidecar=new_sidecar)
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
        new = render(folder.sidecar, dest)
        if file_hash(old) != row.sidecar_sha256 or new.exists() or \
                self.index.sidecar_owner(str(new)):
            return None
        try:
            os.rename(old, new)
        except OSError as e:
            log.warning("could not rename our sidecar with its image", sidecar=str(old),
                        reason=e.strerror)
            return None
        return str(new)

    def dir_appeared(self, path: Path, folder: FolderConfig) -> None:
        # Files created before the new folder's watch existed produce no events: scan it.
        threading.Thread(target=self.scan, args=(folder, path), daemon=True,
                         name="scan-dir").start()

    def dir_deleted(self, path: Path, folder: FolderConfig) -> None:
        self.settler.forget_under(path)
        with self.lock:
            gone = list(self.index.stats_under(str(path)))
            with transaction(self.db):
                for p in gone:
                    self.index.delete(p)
                    self.jobs.forget(p)
        if gone:
            log.info("folder gone; index rows removed", folder=str(path), images=len(gone))

    # -- catch-up scan ------------------------------------------------------------------
    def scan(self, folder: FolderConfig, top: Path | None = None) -> None:
        """Catch-up scan; a database error (disk full) is retried with backoff."""
        delay = 1.0
        while not self.stopping.is_set():
            try:
                self._scan(folder, top)
                return
            except sqlite3.Error as e:
                log.warning("scan could not write to the database; will retry",
                            folder=str(top or folder.path), error=str(e), seconds=delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, 60.0)

    def _scan(self, folder: FolderConfig, top: Path | None = None) -> None:
        t0 = time.perf_counter()
        from watcher.captioning import expected_under, restore_sidecars

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
            restore_sidecars(self.db, result.restore)
        log.info("scan done", folder=str(top or folder.path), new=result.new,
                 changed=result.changed, up_to_date=result.up_to_date,
                 removed=len(result.removed), failed_before=result.failed_before,
                 outdated=len(result.outdated), sidecars_restored=len(result.restore),
                 skipped=len(result.skipped), seconds=round(time.perf_counter() - t0, 3))
        if n:
            self.on_enqueued(n)

    def close(self) -> None:
        with self.lock:
            self.db.conn.close()


class Watch:
    """One configured folder's observer (native events, or polling)."""

    def __init__(self, folder: FolderConfig, sink: Sink) -> None:
        self.folder = folder
        self.error: str | None = None
        self.observer = None
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        obs = PollingObserver(timeout=folder.poll_interval) if folder.polling else Observer()
        try:
            if not folder.path.is_dir():
                raise FileNotFoundError(errno.ENOENT, "folder does not exist", str(folder.path))
            obs.schedule(FolderHandler(folder, sink), str(folder.path), recursive=True)
            obs.start()
        except OSError as e:
            self.error = _watch_error(folder, e)
            log.error("cannot watch folder", folder=str(folder.path), reason=self.error)
            try:
                obs.stop()
            except Exception:
                pass
            return
        self.observer = obs

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(5)

    def describe(self) -> dict:
        return {"path": str(self.folder.path), "polling": self.folder.polling,
                "task": self.folder.task, "error": self.error}


def _watch_error(folder: FolderConfig, e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EMFILE):
        limit = ("fs.inotify.max_user_watches" if e.errno == errno.ENOSPC
                 else "fs.inotify.max_user_instances")
        return (f"the OS refused more file watches ({limit} reached). Fix: raise it, e.g. "
                f"`sudo sysctl {limit}=524288` (and persist it in /etc/sysctl.d/), or set "
                f"`polling: true` for this folder")
    return f"{e.strerror or e}: {folder.path}"


class Daemon:
    def __init__(self, cfg: Config, config_path: Path | None, err: TextIO) -> None:
        self.cfg = cfg
        self.err = err  # where refusals go for the user, besides the log
        self.config_path = config_path
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.wake = threading.Event()
        self.notifier = Notifier.from_env()
        self.watches: dict[Path, Watch] = {}
        self._worker_stuck = False

    def run(self) -> int:
        from watcher.backends import ModelUnavailable, open_backend
        from watcher.pipeline import Pipeline

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
            self.pipeline = Pipeline(cfg, backend)
            self.tracker = Tracker(cfg, Settler)
            self.tracker.on_enqueued = self.pipeline.wake
            self.pipeline.upstream = self.tracker.settler.due_within
            self.pipeline.start()
            self.tracker.settler.start()
            self._install_signals()
            for folder in cfg.folders:
                self._add_folder(folder)
            self._write_daemon_row(started=True)
            self.notifier.ready()
            log.info("watching", folders=[str(f.path) for f in cfg.folders])
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
            log.info("stopped")
            return 0
        finally:
            lock.release()

    # -- folders ------------------------------------------------------------------------
    def _add_folder(self, folder: FolderConfig) -> None:
        watch = Watch(folder, self.tracker)
        self.watches[folder.path] = watch
        if watch.error is None:
            threading.Thread(target=self.tracker.scan, args=(folder,), daemon=True,
                             name="scan").start()

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.config_path, required=True)
        except ConfigError as e:
            log.error("config reload refused; keeping the running config", reason=str(e))
            self.notifier.ready()
            return
        if new.database != self.cfg.database or new.model != self.cfg.model:
            log.warning("database and model changes need a restart; applying folder changes",
                        database=str(new.database))
            new = dataclasses.replace(new, database=self.cfg.database, model=self.cfg.model)
        old_folders = {f.path: f for f in self.cfg.folders}
        new_folders = {f.path: f for f in new.folders}
        for path, folder in old_folders.items():
            if new_folders.get(path) != folder:
                self.watches.pop(path).stop()
                log.info("stopped watching", folder=str(path))
        self.cfg = new
        self.tracker.cfg = new
        self.pipeline.set_config(new)
        for path, folder in new_folders.items():
            if old_folders.get(path) != folder:
                self._add_folder(folder)
                log.info("now watching", folder=str(path))
        self._write_daemon_row()
        self.notifier.ready()
        log.info("config reloaded", folders=len(new_folders))

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
        next_rescan = {f.path: self._rescan_at(f) for f in self.cfg.folders}
        while not self.stop_event.is_set():
            if self.reload_event.is_set():
                self.reload_event.clear()
                self._reload()
                next_rescan = {f.path: self._rescan_at(f) for f in self.cfg.folders}
            now = time.monotonic()
            for f in self.cfg.folders:
                due = next_rescan.get(f.path)
                if due is not None and now >= due:
                    next_rescan[f.path] = self._rescan_at(f)
                    threading.Thread(target=self.tracker.scan, args=(f,), daemon=True).start()
            self._heartbeat(wd)
            self.wake.wait(tick)  # a signal sets it: stop and reload are handled at once
            self.wake.clear()

    def _rescan_at(self, folder: FolderConfig) -> float | None:
        if folder.rescan_minutes <= 0:
            return None
        return time.monotonic() + folder.rescan_minutes * 60

    def _heartbeat(self, wd: float | None) -> None:
        try:
            with self.tracker.lock:
                counts = self.tracker.jobs.counts()
                with transaction(self.tracker.db):
                    self.tracker.db.conn.execute(
                        "UPDATE daemon SET heartbeat = ? WHERE id = 1", (time.time(),))
        except sqlite3.Error as e:  # disk full under the database: keep running, say so
            log.warning("cannot write to the database", error=str(e))
        else:
            self.notifier.status(
                f"{counts['pending'] + self.tracker.settler.pending()} queued, "
                f"{counts['running']} running, {counts['done']} done, "
                f"{counts['failed']} failed")
        # Only a worker that is alive and not stuck in one model call pets the watchdog.
        worker = self.pipeline.worker
        stuck_after = wd if wd else 600
        silent = time.monotonic() - worker.heartbeat
        if worker.is_alive() and silent < stuck_after:
            self.notifier.watchdog()
            if self._worker_stuck:
                log.info("model worker responding again")
                self._worker_stuck = False
        elif not self._worker_stuck:  # said once, not at every tick
            self._worker_stuck = True
            log.error("model worker is not responding; not confirming the watchdog",
                      seconds=round(silent), alive=worker.is_alive())

    def _write_daemon_row(self, *, started: bool = False, stopped: bool = False) -> None:
        folders = json.dumps([w.describe() for w in self.watches.values()])
        with self.tracker.lock, transaction(self.tracker.db):
            if started:
                self.tracker.db.conn.execute(
                    """INSERT OR REPLACE INTO daemon (id, pid, started, heartbeat, folders,
                       stopped) VALUES (1, ?, ?, ?, ?, NULL)""",
                    (os.getpid(), time.time(), time.time(), folders))
            elif stopped:
                self.tracker.db.conn.execute(
                    "UPDATE daemon SET stopped = ?, folders = ? WHERE id = 1",
                    (time.time(), folders))
            else:
                self.tracker.db.conn.execute(
                    "UPDATE daemon SET folders = ? WHERE id = 1", (folders,))


def run_daemon(cfg: Config, config_path: Path | None, err: TextIO) -> int:
    # The daemon never talks to the Hub: weights come from the local cache or model.path.
    # Set before transformers/huggingface_hub are imported (they read it at import).
    os.environ["HF_HUB_OFFLINE"] = "1"
    return Daemon(cfg, config_path, err).run()
