"""Background embedding of captions that have no vector yet: resumable, yields to the pipeline."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from watcher.config import Config
from watcher.embedding import caption_embedder
from watcher.index import Index, connect, transaction

log = structlog.get_logger("watcher.pipeline.backfill")

BATCH = 32  # captions per embedding call and per transaction: a short write lock
BUSY_WAIT = 2.0  # seconds between looks at the queue while the pipeline has work
RECHECK = 600.0  # seconds between looks for rows left without a vector (a failed embed)
PROGRESS_KEY = "embedding_backfill"  # meta row `watcher status` reads
NICE = 10  # this thread's niceness (Linux: per thread), below the pipeline's


@dataclass(frozen=True)
class Progress:
    """What the backfill is doing, as `watcher status` shows it (meta row, JSON)."""

    state: str  # loading | running | paused | done | off
    rate: float = 0.0  # captions/s over the batches of this run
    reason: str | None = None  # off: why
    updated: float = 0.0


class Backfill(threading.Thread):
    """Embeds the captions of rows without a vector (made before semantic search existed,
    by another model, or while the model was missing), a batch at a time, in rowid order
    from the start at each daemon start (so a kill loses at most one batch). While the
    pipeline has jobs queued or running it waits (`yield_to_pipeline`: where the vision model
    shares this CPU): the vision model comes first. The writer embeds new captions itself,
    except those it leaves here under a burst (`poke`: look again now rather than at the
    next RECHECK).

    `scoped` (`watcher caption`): only the captions poked by path, not the whole index (a
    library left without vectors by a model change is the daemon's to embed, not a one-off
    command's); `drain` waits for them. `busy` replaces the look at the jobs table."""

    def __init__(
        self,
        cfg: Config,
        *,
        yield_to_pipeline: bool = True,
        scoped: bool = False,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(name="embed-backfill", daemon=True)
        self.cfg = cfg
        # Wait while images are queued or being captioned: where the vision model shares
        # this CPU. A model on a GPU (or a server) leaves the CPU to this thread.
        self.yield_to_pipeline = yield_to_pipeline
        self.scoped = scoped
        self._busy = busy
        self.stopping = threading.Event()
        self._poked = threading.Event()  # rows without vectors may exist before `after`
        self._nudge = threading.Event()  # look now: a poke, a drain or a stop
        self._closing = threading.Event()  # scoped: stop once nothing poked is left
        self._lock = threading.Lock()
        self._pending: list[str] = []  # scoped: image paths poked and not embedded yet
        self._threads: int | None = None  # scoped, draining: torch threads for the rest
        self.embedded = 0  # captions embedded by this run

    def poke(self, paths: Sequence[str] = ()) -> None:
        """Captions were written without their vectors (at `paths`): embed them once the
        pipeline lets it."""
        if self.scoped:
            with self._lock:
                self._pending.extend(paths)
        self._poked.set()
        self._nudge.set()

    def drain(self, threads: int | None = None) -> int:
        """Scoped: wait until every caption poked has its vector (or the model turned out
        missing: they stay for the daemon's backfill), then stop. How many it embedded.
        `threads`: torch threads for what is left, once the vision model is done and the
        cores are free (two embedded 125-word-piece captions in 21 ms each, one in 39 ms, on
        2 cores)."""
        self._threads = threads
        self._closing.set()
        self._nudge.set()
        if self.is_alive():
            self.join()
        return self.embedded

    def stop(self, timeout: float = 10.0) -> None:
        """Ask it to stop and wait (a batch being embedded finishes first)."""
        self.stopping.set()
        self._poked.set()
        self._nudge.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # never takes the daemon down: search stays text-only
            log.error("embedding backfill failed", error=f"{type(e).__name__}: {e}", exc_info=e)

    def _run(self) -> None:
        _lower_priority()
        if self.scoped:  # nothing to load the embedder for before the first poke
            while not (self._pending or self._closing.is_set() or self.stopping.is_set()):
                self._nudge.wait(1.0)
                self._nudge.clear()
            if not self._pending:
                return
        db = connect(self.cfg.database)
        index = Index(db)
        try:
            if not index.vectors_usable():
                from watcher.index import VEC_PROBLEM

                self._report(index, Progress("off", reason=VEC_PROBLEM[0] if VEC_PROBLEM else None))
                return
            embed = caption_embedder(self.cfg)
            if embed is None:
                self._report(index, Progress("off", reason="search.embedding_model: null"))
                return
            self._report(index, Progress("loading"))
            embedder = embed.get()
            if embedder is None:
                self._report(index, Progress("off", reason=embed.error))
                return
            dim = int(embedder.encode(["x"]).vectors.shape[1])
            with transaction(db):
                changed = index.use_vector_model(embedder.tag, dim)
            if changed:
                log.info(
                    "embedding model changed; every caption is embedded again", model=embedder.tag
                )
            self._loop(index, embedder)
        finally:
            db.conn.close()

    def _waiting(self, index: Index) -> bool:
        if not self.yield_to_pipeline:
            return False
        return self._busy() if self._busy is not None else _pipeline_busy(index)

    def _rows(self, index: Index, after: int) -> list[tuple[int, str]] | None:
        """The next batch to embed; [] for none now, None for none left (scoped, closing)."""
        if not self.scoped:
            return index.missing_vectors(after, BATCH)
        while True:
            with self._lock:
                paths, self._pending = self._pending[:BATCH], self._pending[BATCH:]
            if not paths:
                return None if self._closing.is_set() else []
            rows = index.missing_vectors_at(paths)
            if rows:
                return rows

    def _loop(self, index: Index, embedder) -> None:
        after = 0
        spent = 0.0
        restore: int | None = None
        while not self.stopping.is_set():
            if self._waiting(index):
                self._report(index, Progress("paused", self._rate(spent)))
                self._nudge.wait(BUSY_WAIT)
                self._nudge.clear()
                continue
            if self._poked.is_set():  # new rows without vectors, maybe before `after`
                self._poked.clear()
                after = 0
            rows = self._rows(index, after)
            if rows is None:
                if restore is not None:  # the process's setting, for threads started later
                    _use_threads(restore)
                return
            if not rows:
                self._report(index, Progress("done", self._rate(spent)))
                if not self.scoped:
                    log.info("all captions embedded", embedded=self.embedded)
                self._nudge.wait(RECHECK)
                self._nudge.clear()
                after = 0
                continue
            if self._threads:  # set by drain
                restore = _use_threads(self._threads)
                self._threads = None
            t0 = time.perf_counter()
            batch = embedder.encode([caption for _, caption in rows])
            try:
                with transaction(index.db):
                    index.use_vector_model(batch.model, int(batch.vectors.shape[1]))
                    # Only a caption unchanged since it was read: a new one was (or will
                    # be) embedded by the writer.
                    items = [
                        (rowid, batch.vectors[n])
                        for n, (rowid, caption) in enumerate(rows)
                        if index.caption_of(rowid) == caption
                    ]
                    index.put_vectors(items)
            except sqlite3.OperationalError as e:  # disk full, locked: try again later
                if self.scoped:  # a one-off command does not wait out a full disk
                    log.warning(
                        "cannot store caption vectors; left to the daemon's backfill",
                        captions=len(rows),
                        error=str(e),
                    )
                    continue
                log.warning("cannot store caption vectors; will retry", error=str(e))
                self.stopping.wait(BUSY_WAIT)
                continue
            spent += time.perf_counter() - t0
            self.embedded += len(items)
            after = rows[-1][0]
            self._report(index, Progress("running", self._rate(spent)))

    def _rate(self, spent: float) -> float:
        return round(self.embedded / spent, 1) if spent > 0 else 0.0

    def _report(self, index: Index, p: Progress) -> None:
        if self.scoped:  # `watcher status` shows the daemon's backfill, not a command's
            return
        p = Progress(p.state, p.rate, p.reason, time.time())
        try:
            with transaction(index.db):
                index.db.conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    (PROGRESS_KEY, json.dumps(p.__dict__)),
                )
        except sqlite3.OperationalError as e:
            log.debug("cannot record backfill progress", error=str(e))


def _pipeline_busy(index: Index) -> bool:
    """Whether images are queued or being captioned (the pipeline's work comes first)."""
    return (
        index.db.conn.execute(
            "SELECT 1 FROM jobs WHERE state IN ('pending', 'running') LIMIT 1"
        ).fetchone()
        is not None
    )


def _use_threads(n: int) -> int:
    """Torch threads for this thread's work from now on; returns the number before. Torch
    keeps the number per thread once a thread has run parallel work: set from another
    thread, it did not apply here (measured: still one thread, 36 ms a caption)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


def _lower_priority() -> None:
    """Nice this thread (Linux schedules threads on their own; threads it starts, such as
    torch's, inherit it). Elsewhere it applies to the process: left alone there."""
    if not hasattr(os, "setpriority") or not os.uname().sysname == "Linux":
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    except OSError:
        pass


def read_progress(index: Index) -> Progress | None:
    """The backfill's last report (None: never ran)."""
    row = index.db.conn.execute("SELECT value FROM meta WHERE key = ?", (PROGRESS_KEY,)).fetchone()
    if not row:
        return None
    try:
        return Progress(**json.loads(row[0]))
    except (ValueError, TypeError):
        return None
