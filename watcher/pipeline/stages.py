"""Wires the stages of watcher.pipeline.STAGES (claim -> decode -> model -> write), bounded.

`watcher caption` and `watcher run` both drive this; neither adds a stage of its own.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from watcher.backends import Backend
from watcher.config import Config
from watcher.embedding import caption_embedder
from watcher.index import connect, transaction
from watcher.jobs import JobQueue
from watcher.messages import STOP, Failed, Job, Outcome, Work
from watcher.pipeline import CLAIM, DECODE
from watcher.pipeline.decode import DecodeError, prepare
from watcher.pipeline.model_worker import ModelWorker
from watcher.pipeline.writer import Writer

log = structlog.get_logger("watcher.pipeline.stages")


class Pipeline:
    """Runs jobs from the persistent queue through the stages until stopped.

    At most `max_in_flight` jobs are between claim and commit: enough to have the next batch
    decoded and waiting while the model works on one batch and the writer commits the one
    before (three batches), few enough that a kill re-does little. With only two, the slots
    of the batch being written hold back the next one, and the model gets a runt batch (the
    last few decoded) every other call: at the tiny model's speed that cost 20% throughput.

    `upstream(within)` says whether work not yet queued will be within that many seconds
    (the daemon: files settling); the model worker waits for it to fill a batch.

    `defer_embedding`: under a burst the writer leaves the captions' search vectors to the
    backfill (`on_deferred(paths)`, after the commit), so the writer never holds the model
    back: the embedder takes 7 ms of CPU for a short caption and about 45 ms for one of 120
    tokens, more than a fast model's own time per image; and on a CPU shared with the vision
    model it made that model take 2-8% more CPU per image (two runs, bench/RESULTS.md
    2026-12-02 22:38 and 23:12). A burst is every batch written while others are claimed or
    queued, and then the rest of it until nothing is in flight: its last batch too, which
    embedded inline cost the tiny model's 200-image burst 0.36 s of 2.4. A lone batch
    (nothing before it or after it) is embedded with its captions, in the same transaction.
    """

    def __init__(
        self,
        cfg: Config,
        backend: Backend,
        *,
        roots: tuple[Path, ...] | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
        upstream: Callable[[float], bool] = lambda within: False,
        defer_embedding: bool = False,
        on_deferred: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.roots = roots
        self._on_outcome = on_outcome
        batch = max(1, backend.max_batch)
        self.max_in_flight = 3 * batch + 2 * cfg.decode_threads
        self._slots = threading.Semaphore(self.max_in_flight)
        self._in_flight = 0
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)  # notified after every outcome
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.work_q: queue.Queue = queue.Queue()
        self.write_q: queue.Queue = queue.Queue()
        self._decoding = 0  # claimed jobs not yet handed to the worker (or failed)
        self._queued = 0  # jobs announced by wake() and not claimed yet (a hint)
        self._upstream = upstream
        self.worker = ModelWorker(
            backend,
            self.work_q,
            self.write_q,
            cfg.database,
            incoming=self._incoming,
            decoding=lambda: self._decoding,
        )
        self.writer = Writer(
            cfg,
            self.write_q,
            cfg.database,
            self._outcome,
            self._job_end,
            embed=caption_embedder(cfg),
            embed_now=self._embed_now if defer_embedding else None,
            on_deferred=on_deferred,
        )
        self._burst = False  # vectors left for later since in-flight last reached zero
        self._pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix=DECODE.name)
        self._feeder = threading.Thread(target=self._feed, name=CLAIM.name, daemon=True)
        self.outcomes = 0
        self._cancelled: list[Job] = []

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.worker.start()
        self.writer.start()
        self._feeder.start()

    def wake(self, queued: int = 0) -> None:
        """`queued` new jobs were queued: claim them now rather than at the next poll."""
        if queued:
            with self._lock:
                self._queued += queued
        self._wake.set()

    def _embed_now(self, batch: int) -> bool:
        """Whether the writer embeds the captions of the `batch` jobs it is writing now: not
        while other images are claimed (decoding, waiting for the model, on it) or queued,
        nor for the rest of a burst whose earlier vectors were left for later."""
        with self._lock:
            later = self._in_flight > batch or self._queued > 0 or self._burst
            self._burst = later
        return not later

    def _incoming(self, within: float) -> int:
        known = self._decoding + self._queued
        return known if known else int(self._upstream(within))

    def set_config(self, cfg: Config) -> None:
        """A reloaded config: folder settings apply to jobs written from now on."""
        self.cfg = cfg
        self.writer.cfg = cfg

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming, finish the batch on the model, hand the rest back to the queue."""
        self._stopping.set()
        self._wake.set()
        self._feeder.join(timeout)
        # Decodes not started yet still run, only to see the stop and hand their job back
        # (cancelled futures would leave their jobs `running` until the next start).
        self._pool.shutdown(wait=True)
        self.work_q.put(STOP)
        self.worker.join(timeout)
        self.write_q.put(STOP)
        self.writer.join(timeout)
        released = self.worker.released + self._cancelled
        if released:
            db = connect(self.cfg.database)
            jobs = JobQueue(db)
            with transaction(db):
                for job in released:
                    jobs.release(job)
            db.conn.close()
            log.info("handed unfinished jobs back to the queue", jobs=len(released))

    def wait_until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Block until nothing is in flight and `done()` holds (checked after each outcome)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.changed:
            while not (self._in_flight == 0 and done()):
                if deadline is not None and time.monotonic() > deadline:
                    return False
                self.changed.wait(0.5)
        return True

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    # -- stage glue ---------------------------------------------------------------------
    def _feed(self) -> None:
        db = connect(self.cfg.database)
        jobs = JobQueue(db)
        try:
            while not self._stopping.is_set():
                want = 0
                while want < self.max_in_flight and self._slots.acquire(blocking=False):
                    want += 1
                if want == 0:
                    # All slots busy: wait for one to free up (or for stop).
                    if self._slots.acquire(timeout=0.5):
                        want = 1
                    else:
                        continue
                try:
                    claimed = jobs.claim(want, self.roots)
                except sqlite3.Error as e:  # disk full or locked: keep the thread, retry
                    log.warning("cannot claim jobs from the database; will retry", error=str(e))
                    claimed = []
                    self._stopping.wait(1.0)
                for _ in range(want - len(claimed)):
                    self._slots.release()
                with self._lock:
                    # Fewer than asked for: nothing else is queued, whatever was announced.
                    self._queued = (
                        max(0, self._queued - len(claimed)) if len(claimed) == want else 0
                    )
                    self._in_flight += len(claimed)
                    self._decoding += len(claimed)
                if claimed:
                    for job in claimed:
                        self._pool.submit(self._decode, job)
                    continue
                try:
                    due = jobs.next_due()
                except sqlite3.Error:
                    due = None
                wait = 1.0 if due is None else min(1.0, max(0.02, due - time.time()))
                self._wake.wait(wait)
                self._wake.clear()
        finally:
            db.conn.close()

    def _decode(self, job: Job) -> None:
        try:
            self._prepare(job)
        finally:  # after the hand-off: the worker may stop waiting for more
            with self._lock:
                self._decoding -= 1

    def _prepare(self, job: Job) -> None:
        if self._stopping.is_set():
            self._cancelled.append(job)
            self._job_end()
            return
        folder = self.cfg.folder_for(job.path) or self.cfg.with_folders([job.root]).folders[0]
        tasks = folder.tasks(self.cfg.model.max_tokens)
        try:
            prepared = prepare(job, max_pixels=self.cfg.max_pixels, max_side=self.cfg.max_side)
        except DecodeError as e:
            self.write_q.put(Failed(job, e.reason, e.transient, e.vanished, _identity(job)))
            return
        except Exception as e:  # a bug in decoding must not take the daemon down
            log.error("unexpected error preparing image", path=str(job.path), exc_info=e)
            self.write_q.put(
                Failed(
                    job,
                    f"unexpected error: {type(e).__name__}: {e}",
                    transient=False,
                    identity=_identity(job),
                )
            )
            return
        self.work_q.put(Work(prepared, tasks))

    def _outcome(self, outcome: Outcome) -> None:
        if self._on_outcome is not None:
            self._on_outcome(outcome)

    def _job_end(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._burst = False
            self.outcomes += 1
            self.changed.notify_all()
        self._slots.release()
        self._wake.set()


def _identity(job: Job) -> tuple[int, int] | None:
    try:
        st = job.path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)
