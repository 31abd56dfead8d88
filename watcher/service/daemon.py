"""`watcher run`: observers + settle + scan feeding the queue, the pipeline draining it."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import structlog

from watcher.config import Config, ConfigError, FolderConfig, load_config
from watcher.index import connect, file_identity
from watcher.intake.events import FileEvents
from watcher.intake.settle import Settler
from watcher.jobs import JobQueue
from watcher.paths import shown
from watcher.pipeline.backfill import Backfill
from watcher.service import lifecycle
from watcher.service.lock import AlreadyRunning, DatabaseLock
from watcher.service.notify import Notifier
from watcher.service.watches import Watch

if TYPE_CHECKING:
    from watcher.web.app import WebServer

log = structlog.get_logger("watcher.service.daemon")

# How often each watched folder is checked for being there (and being the same folder):
# a folder deleted, renamed away, replaced or unmounted gives no event we can rely on.
FOLDER_CHECK_SECONDS = 2.0


def with_command_line(cfg: Config, dirs: Sequence[Path]) -> Config:
    """The config's folders plus each folder given on the command line that the config does
    not list itself (those keep their configured settings): at start and at every reload."""
    configured = {f.path for f in cfg.folders}
    extra = [d for d in dict.fromkeys(dirs) if d not in configured]
    if not extra:
        return cfg
    return dataclasses.replace(cfg, folders=cfg.folders + cfg.with_folders(extra).folders)


class Daemon:
    """`watcher run`: wires the stages (watches -> FileEvents -> settler -> job queue ->
    pipeline), then runs the loop: signals (stop, reload), folder checks, rescans, the
    heartbeat and the service manager's watchdog."""

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
        self.web: WebServer | None = None

    def run(self) -> int:
        from watcher.backends import ModelUnavailable, open_backend, runs_on_cpu
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
            # The web port before the model: one in use is an error now, not a daemon
            # without its page after seconds of loading.
            if cfg.web.enabled:
                from watcher.web.app import WebServer, WebUnavailable

                self.web = WebServer(cfg.web)
                try:
                    self.web.bind()
                except WebUnavailable as e:
                    self.web = None
                    log.error("refusing to start", reason=str(e))
                    print(f"watcher: {e}", file=self.err)
                    return 2
            try:
                backend = open_backend(cfg.model, cfg.log)
            except ModelUnavailable as e:
                log.error("model unavailable", reason=str(e))
                print(f"watcher: {e}", file=self.err)
                return 2
            # The backend has logged device, dtype and memory in use ("model ready").
            # The pipeline asks how many files are about to settle (to fill its batch); the
            # events sink wakes the pipeline when it queues some: each gets the other's
            # method at construction, the settler's through a bound lookup below.
            # Captions indexed before semantic search (or by another model) get vectors, and
            # so do those the writer leaves to it under a burst: after the burst where the
            # vision model shares this CPU, alongside it where the model is on a GPU.
            self.backfill = Backfill(cfg, yield_to_pipeline=runs_on_cpu(backend))
            self.pipeline = Pipeline(
                cfg,
                backend,
                upstream=self._settling_within,
                defer_embedding=cfg.search.backfill,
                on_deferred=self.backfill.poke,
            )
            self.events = FileEvents(cfg, Settler, on_enqueued=self.pipeline.wake)
            self.pipeline.start()
            self._start_web()
            if cfg.search.backfill:
                self.backfill.start()
            self.events.settler.start()
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
            self.events.stopping.set()
            if self.web is not None:  # no new interactive requests; open ones end
                self.web.stop()
            for w in self.watches.values():
                w.stop()
            self.events.settler.stop()
            self.backfill.stop()
            self.pipeline.stop()
            backend.close()
            self._write_daemon_row(stopped=True)
            self.events.close()
            log.info("stopped", exit_code=self.exit_code)
            return self.exit_code
        finally:
            if self.web is not None:
                self.web.stop()  # closes the socket of a server that never started
            lock.release()

    def _start_web(self) -> None:
        if self.web is None:
            return
        from watcher.web.context import WebContext
        from watcher.web.lane import WorkerLane

        lane = WorkerLane(self.pipeline.worker)
        self.web.start(
            WebContext(self.cfg, self.cfg.database, lane, daemon=True, source=lambda: self.cfg)
        )
        print(f"watcher: web page and API at {self.web.url}", file=self.err, flush=True)

    # -- folders ------------------------------------------------------------------------
    def _add_folder(self, folder: FolderConfig) -> None:
        watch = Watch(folder, self.events)
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

    def _settling_within(self, within: float) -> bool:
        """Whether the settler will hand on a file within `within` seconds."""
        return self.events.settler.due_within(within)

    def _catch_up(self, folder: FolderConfig) -> None:
        threading.Thread(target=self.events.scan, args=(folder,), daemon=True, name="scan").start()

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
                self.events.settler.forget_under(path)
                try:
                    rows = self.events.indexed_under(path)
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
        if changed or self.events.changed.is_set():
            self.events.changed.clear()
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
        if new.web != self.cfg.web:
            log.warning("web changes need a restart; keeping the running web server")
            new = dataclasses.replace(new, web=self.cfg.web)
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
        self.events.set_config(new)
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
            with self.events.lock:
                counts = self.events.jobs.counts()
                lifecycle.beat(self.events.db)
        except sqlite3.Error as e:  # disk full under the database: keep running, say so
            log.warning("cannot write to the database", error=str(e))
        else:
            self.notifier.status(
                f"{counts['pending'] + self.events.settler.pending()} queued, "
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
        folders = [w.describe(self.events.passed_over.get(p)) for p, w in self.watches.items()]
        with self.events.lock:
            if started:
                url = self.web.url if self.web is not None else None
                lifecycle.record_start(self.events.db, folders, url)
            elif stopped:
                lifecycle.record_stop(self.events.db, folders)
            else:
                lifecycle.record_folders(self.events.db, folders)


def run_daemon(
    cfg: Config, config_path: Path | None, err: TextIO, cli_dirs: Sequence[Path] = ()
) -> int:
    # The daemon never talks to the Hub: weights come from the local cache or model.path.
    # Set before transformers/huggingface_hub are imported (they read it at import).
    os.environ["HF_HUB_OFFLINE"] = "1"
    return Daemon(cfg, config_path, err, cli_dirs).run()
