"""The last stage: atomic sidecar write, then index row and job state in one transaction."""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from watcher import faults
from watcher.config import Config, FolderConfig
from watcher.embedding import VectorBatch
from watcher.index import ImageRow, Index, connect, transaction
from watcher.jobs import JobQueue
from watcher.messages import (
    STOP,
    Captioned,
    Failed,
    Job,
    JobState,
    Outcome,
    OutcomeState,
    SidecarState,
)
from watcher.outputs import metadata
from watcher.outputs.base import Content, Place, Record, Result, keywords_for, output_for
from watcher.outputs.pending import error_reason
from watcher.outputs.sidecar import (
    TRANSIENT_ERRNOS,
    FolderMoved,
    TxtOutput,
    fsync_dir,
    open_folder,
    remove_if_ours,
)
from watcher.pipeline import WRITE
from watcher.tasks import clean_caption

log = structlog.get_logger("watcher.pipeline.writer")


class Writer(threading.Thread):
    """Consumes Captioned/Failed from `inbox`, batching everything waiting into one
    transaction (one fsync for many images), then reports Outcomes."""

    def __init__(
        self,
        cfg: Config,
        inbox: queue.Queue,
        db_path: Path,
        on_outcome: Callable[[Outcome], None],
        on_job_end: Callable[[], None],
        embed: Callable[[list[str]], VectorBatch | None] | None = None,
        embed_now: Callable[[int], bool] | None = None,
        on_deferred: Callable[[list[str]], None] | None = None,
    ) -> None:
        super().__init__(name=WRITE.name, daemon=True)
        self.cfg = cfg
        self.inbox = inbox
        self.db_path = db_path
        self.on_outcome = on_outcome
        self.on_job_end = on_job_end
        self.embed = embed  # caption -> vector for search (watcher.embedding); None: none
        # Given this batch's size, whether to embed its captions now; False: they are
        # written without vectors, for the backfill (None: always now).
        self.embed_now = embed_now
        # Told, after the commit, the images whose vectors were left for later (the backfill).
        self.on_deferred = on_deferred
        self._deferred: list = []  # a batch the database refused, to be written again
        self._deferred_at = 0.0
        self._db_failures = 0
        self._created: set[str] = set()  # sidecars this batch created (none existed before)
        # Folders this batch renamed sidecars into (-> their watched root): each is fsynced
        # once, before the rows that point at them commit (one per sidecar cost 0.4 ms each
        # on ext4 here).
        self._dirty: dict[Path, Path] = {}
        # The other outputs' records (image_outputs) of this batch's rows, by image path.
        self._extras: dict[str, list[Record]] = {}
        # Asks whichever index the writer has when it writes: its own connection's (run), or
        # the snapshot a Ray actor gives it (watcher.cluster), which never calls run().
        self._txt = TxtOutput(lambda sidecar: self.index.sidecar_owner(sidecar), sync_dir=False)
        # This batch's outcome log lines (level, event, fields), said only once its
        # transaction has committed: whoever reads a line finds the index already saying it.
        self._said: list[tuple[str, str, dict[str, Any]]] = []

    def _say(self, level: str, event: str, **fields: Any) -> None:
        self._said.append((level, event, fields))

    def _say_now(self) -> None:
        """Log the outcome lines kept back: after the batch's commit. (A Ray actor's lines
        travel with its results and are said by the driver, after its commit.)"""
        said, self._said = self._said, []
        for level, event, fields in said:
            getattr(log, level)(event, **fields)

    def run(self) -> None:
        self.db = connect(self.db_path)
        self.index = Index(self.db)
        self.jobs = JobQueue(self.db)
        if not self.index.vectors_usable():
            self.embed = None
        stop = False
        while not stop:
            timeout = None
            if self._deferred:
                timeout = max(0.0, self._deferred_at - time.monotonic())
            try:
                items = [self.inbox.get(timeout=timeout)]
            except queue.Empty:
                items = []
            while len(items) < 256:
                try:
                    items.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            if any(i is STOP for i in items):
                stop = True
                items = [i for i in items if i is not STOP]
            if self._deferred and (stop or time.monotonic() >= self._deferred_at):
                items, self._deferred = self._deferred + items, []
            if items:
                try:
                    self._write(items, last_chance=stop)
                except Exception as e:  # a bug here must not stop the writer for good
                    self._said.clear()  # nothing of the batch was committed
                    self._give_back(
                        items, f"unexpected error writing results: {type(e).__name__}: {e}"
                    )
                    log.error("unexpected error in the writer; jobs will be retried", exc_info=e)
                    self._end(items)
        self.db.conn.close()
        # The ExifTool process the xmp/embed outputs started for this thread, if any.
        metadata.close_session()

    # -- one batch ----------------------------------------------------------------------
    def _write(self, items: list, *, last_chance: bool = False) -> None:
        """Write one batch. Every item ends its job exactly once (on_job_end), except when
        the database cannot be written: then the batch is kept and written again later."""
        outcomes: list[Outcome] = []
        rows: list[tuple[ImageRow, Job, Captioned]] = []
        failures: list[Failed] = []
        requeue: list[Job] = []  # changed while being captioned: run again
        gone: list[Job] = []  # deleted while being captioned: forget
        skipped: list[tuple[Job, str]] = []  # its folder became a link: not captioned there
        self._dirty.clear()
        self._extras.clear()
        self._said.clear()
        for item in items:
            if isinstance(item, Failed):
                failures.append(item)
                continue
            p = item.prepared
            try:
                row = self._sidecar(item)
            except OSError as e:  # disk full, I/O error: nothing was left; try again later
                failures.append(
                    Failed(
                        p.job,
                        error_reason("writing sidecar", e),
                        transient=True,
                        identity=(p.size, p.mtime_ns),
                    )
                )
                continue
            except Exception as e:
                log.error("unexpected error writing a sidecar", path=str(p.job.path), exc_info=e)
                failures.append(
                    Failed(
                        p.job,
                        f"unexpected error writing the sidecar: {type(e).__name__}: {e}",
                        identity=(p.size, p.mtime_ns),
                    )
                )
                continue
            if isinstance(row, Failed):  # nothing worth a sidecar
                failures.append(row)
                continue
            if isinstance(row, Outcome):  # stale, gone or skipped: no row
                if row.state == OutcomeState.SKIPPED:
                    skipped.append((p.job, row.reason or ""))
                else:
                    (gone if row.state == OutcomeState.GONE else requeue).append(p.job)
                outcomes.append(row)
                continue
            rows.append((row, p.job, item))
        for folder, root in self._dirty.items():  # renames durable before the rows say so
            try:
                fsync_dir(folder, root)
            except OSError as e:
                log.warning("cannot sync folder", folder=str(folder), error=str(e))
        # Search vectors, made before BEGIN: the write lock is not held while the model runs.
        vectors = None
        later = False
        if self.embed and rows:
            if self.embed_now is None or self.embed_now(len(items)):
                vectors = self.embed([r.caption for r, _, _ in rows])
            else:
                later = True
                log.debug("search vectors left to the backfill", captions=len(rows))
        try:
            with transaction(self.db):
                for job in requeue:
                    self.jobs.release(job)
                for job in gone:  # as when decode finds the file gone: forget it
                    self.jobs.forget(str(job.path))
                    self.index.delete(str(job.path))
                for job, reason in skipped:
                    self.jobs.skip_running(job, reason)
                finished = []
                orphans = []
                for row, job, item in rows:
                    # Only a job still current gets its row: one re-queued, moved or deleted
                    # while it ran must not leave a row (for a path that may be gone).
                    if self.jobs.finish(job):
                        self.index.upsert(row)
                        self.index.set_outputs(row.path, self._extras.get(row.path, []))
                        finished.append((row, item))
                    else:
                        outcomes.append(
                            Outcome(
                                row.path,
                                OutcomeState.REQUEUED,
                                "changed, moved or deleted meanwhile",
                            )
                        )
                        orphans.append(row)
                if vectors is not None:
                    self.index.put_caption_vectors(vectors, [r for r, _ in finished])
                for f in failures:
                    outcomes.append(self._failure(f))
                # Test-only seam (watcher.faults) where SQLite reports a full disk: COMMIT.
                faults.hit("db_commit", [r.path for r, _, _ in rows])
        except sqlite3.OperationalError as e:
            # Disk full or I/O error on the database: nothing was committed (so nothing of
            # it is said). Sidecars already written hold the same deterministic text, so the
            # next attempt finds them "same".
            self._said.clear()
            if not last_chance and self._defer(items, e):
                return
            self._retry_later(rows, failures, requeue + gone + [j for j, _ in skipped], e)
            self._end(items)
            return
        self._db_failures = 0
        self._say_now()
        if later and finished and self.on_deferred is not None:
            self.on_deferred([row.path for row, _ in finished])
        for row in orphans:
            self._remove_orphan(row)
        self._created.clear()
        for row, item in finished:
            outcomes.append(
                Outcome(
                    row.path,
                    OutcomeState.DONE,
                    row.sidecar_error,
                    row.caption,
                    row.sidecar,
                    SidecarState(row.sidecar_state),
                    item.reused,
                )
            )
            log.info(
                "captioned",
                path=row.path,
                task=row.task,
                model=row.model,
                ms=round(item.model_ms, 1),
                outcome=row.sidecar_state,
                reused=item.reused,
                batch=item.batch,
            )
        for o in outcomes:
            self.on_outcome(o)
        self._end(items)

    def _remove_orphan(self, row: ImageRow) -> None:
        """A sidecar this batch created for an image that moved or vanished before its row
        was committed describes nothing now: remove it (the new name gets its own)."""
        if (
            row.sidecar in self._created
            and row.sidecar_sha256
            and not os.path.lexists(row.path)
            and remove_if_ours(Path(row.root), Path(row.sidecar), row.sidecar_sha256)
        ):
            log.info(
                "image moved or deleted while its sidecar was written; sidecar removed",
                path=row.path,
                sidecar=row.sidecar,
            )

    def _give_back(self, items: list, reason: str) -> None:
        """Jobs still `running` after an unexpected error go back to the queue (with backoff,
        up to max_attempts), so neither the daemon nor `watcher caption` waits on them."""
        try:
            with transaction(self.db):
                for item in items:
                    job = item.job if isinstance(item, Failed) else item.prepared.job
                    self.jobs.fail(
                        job,
                        reason,
                        transient=True,
                        max_attempts=self.cfg.max_attempts,
                        backoff=self.cfg.retry_backoff,
                    )
        except sqlite3.Error as e:
            log.error("cannot give jobs back to the queue", error=str(e))

    def _end(self, items: list) -> None:
        for _ in items:
            self.on_job_end()

    def _defer(self, items: list, exc: Exception) -> bool:
        """Keep the batch (captions included) in memory and write it again after a pause, so
        a full disk costs no model work. False once that has failed max_attempts times."""
        self._db_failures += 1
        if self._db_failures > self.cfg.max_attempts:
            return False
        delay = min(60.0, max(0.1, self.cfg.retry_backoff) * 2 ** (self._db_failures - 1))
        log.warning(
            "database write failed; will write again",
            error=str(exc),
            images=len(items),
            seconds=round(delay, 1),
        )
        self._deferred = items + self._deferred
        self._deferred_at = time.monotonic() + delay
        return True

    def _retry_later(self, rows, failures, recheck, exc: Exception) -> None:
        reason = f"database write failed: {exc}"
        try:
            with transaction(self.db):
                for _, job, _ in rows:
                    self.jobs.fail(
                        job,
                        reason,
                        transient=True,
                        max_attempts=self.cfg.max_attempts,
                        backoff=self.cfg.retry_backoff,
                    )
                for f in failures:
                    self.jobs.release(f.job, self.cfg.retry_backoff)
                for job in recheck:  # changed or gone: the next run sees which
                    self.jobs.release(job)
        except sqlite3.OperationalError:
            # Still failing: the jobs stay `running` and are recovered at the next start.
            log.error("database still not writable", error=str(exc))
            return
        log.warning("database write failed; jobs will be retried", error=str(exc))

    def _failure(self, f: Failed) -> Outcome:
        path = str(f.job.path)
        if f.vanished:
            self.jobs.forget(path)
            self.index.delete(path)
            self._say("info", "image gone before it was captioned", path=path)
            return Outcome(path, OutcomeState.GONE, f.reason)
        state = self.jobs.fail(
            f.job,
            f.reason,
            transient=f.transient,
            max_attempts=self.cfg.max_attempts,
            backoff=self.cfg.retry_backoff,
            identity=f.identity,
        )
        if state == JobState.FAILED:
            self._say("warning", "image failed", path=path, reason=f.reason, outcome="failed")
            return Outcome(path, OutcomeState.FAILED, f.reason)
        self._say("info", "will retry", path=path, reason=f.reason, outcome="retry")
        return Outcome(path, OutcomeState.RETRY, f.reason)

    def _folder(self, job: Job) -> FolderConfig:
        folder = self.cfg.folder_for(job.path)
        if folder is None:  # e.g. a job queued under a folder since removed from the config
            folder = self.cfg.with_folders([job.root]).folders[0]
        return folder

    def _sidecar(self, item: Captioned) -> ImageRow | Outcome | Failed:
        p = item.prepared
        job = p.job
        path = str(job.path)
        # Everything below goes through the image's folder opened from the watched root
        # without following links: a folder swapped for a symbolic link while the model ran
        # gets nothing written through it (nor anything outside the root).
        try:
            dir_fd = open_folder(Path(job.root), job.path.parent)
        except (FileNotFoundError, NotADirectoryError):
            self._say("info", "image deleted while being captioned", path=path)
            return Outcome(path, OutcomeState.GONE, "image deleted while being captioned")
        except FolderMoved as e:
            reason = f"{e.reason}; not captioned there (captioned once it is a folder again)"
            self._say(
                "warning",
                "folder replaced while being captioned; no sidecar written",
                path=path,
                reason=reason,
            )
            return Outcome(path, OutcomeState.SKIPPED, reason)
        try:
            return self._sidecar_in(item, dir_fd)
        finally:
            os.close(dir_fd)

    def _sidecar_in(self, item: Captioned, dir_fd: int) -> ImageRow | Outcome | Failed:
        p = item.prepared
        job = p.job
        path = str(job.path)
        try:
            # Follows a file link (one inside the root was read); only looks.
            st = os.stat(job.path.name, dir_fd=dir_fd)
        except (FileNotFoundError, NotADirectoryError):
            self._say("info", "image deleted while being captioned", path=path)
            return Outcome(path, OutcomeState.GONE, "image deleted while being captioned")
        same_file = p.ino == 0 or (st.st_dev, st.st_ino) == (p.dev, p.ino)
        if (st.st_size, st.st_mtime_ns) != (p.size, p.mtime_ns) or not same_file:
            # Replaced while the model ran: this caption describes old bytes. Run it again.
            self._say("info", "image changed while being captioned; re-queued", path=path)
            return Outcome(path, OutcomeState.REQUEUED, "image changed while being captioned")
        folder = self._folder(job)
        texts = {t.key: clean_caption(o) for t, o in zip(item.tasks, item.outputs, strict=True)}
        if not texts[item.tasks[0].key]:
            # An empty sidecar would pass for a caption (and the prefix alone is none):
            # failed, for `watcher retry` (with another model or setting) to run again.
            return Failed(job, no_text_reason(item.outputs[0]), identity=(p.size, p.mtime_ns))
        caption = clean_caption(item.outputs[0], folder.prefix, folder.suffix)
        existing = self.index.get(path)
        place = Place(job.path, Path(job.root), dir_fd, folder)
        content = Content(
            caption,
            item.tasks[0].key,
            item.model,
            item.revision,
            keywords_for(item.tasks[0].key, caption, folder.xmp_keywords),
        )
        previous = (
            Record("txt", existing.sidecar, existing.sidecar_sha256, existing.sidecar_state)
            if existing
            else None
        )
        result = (
            self._txt.write(place, content, previous)
            if "txt" in folder.outputs
            else Result(Record("txt", None, None, SidecarState.WRITTEN.value))
        )
        rec = result.record
        sidecar = rec.target
        ours, state, error = rec.sha256, SidecarState(rec.state), rec.error
        shown_caption = caption
        if result.wrote and sidecar is not None:
            self._dirty[Path(sidecar).parent] = Path(job.root)
            if result.created:
                self._created.add(sidecar)
        if state == SidecarState.KEPT:
            if result.theirs is not None:
                shown_caption = result.theirs
            self._say(
                "info", "kept existing sidecar (not ours)", path=path, sidecar=sidecar, reason=error
            )
        elif state == SidecarState.PENDING:
            self._say(
                "warning",
                "sidecar not written; caption kept in the index",
                path=path,
                sidecar=sidecar,
                reason=error,
            )
        identity = (p.sha256, p.size, p.mtime_ns)
        others = self._other_outputs(place, content, folder, existing)
        for other in others:
            if other.image_identity is not None:
                identity = other.image_identity
        self._extras[path] = [o.record for o in others]
        now = time.time()
        return ImageRow(
            path=path,
            root=str(job.root),
            sha256=identity[0],
            size=identity[1],
            mtime_ns=identity[2],
            width=p.width,
            height=p.height,
            caption=shown_caption,
            task=item.tasks[0].key,
            outputs=texts,
            model=item.model,
            revision=item.revision,
            sidecar=sidecar,
            sidecar_sha256=ours,
            sidecar_state=state,
            sidecar_error=error,
            created=existing.created if existing else now,
            updated=now,
            model_caption=caption,
        )

    def _other_outputs(
        self, place: Place, content: Content, folder: FolderConfig, existing: ImageRow | None
    ) -> list[Result]:
        """The folder's outputs other than txt (xmp, embed), each with its own ownership
        rule. A problem in one is its own `pending` record; the others still update."""
        results = []
        for name in folder.outputs:
            if name == "txt":
                continue
            previous = self.index.output(place.image, name) if existing else None
            try:
                result = output_for(name).write(place, content, previous)
            except Exception as e:
                if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
                    raise
                # One output's trouble (a read-only folder, ExifTool refusing a file) is
                # its own pending record: the caption, the row and the other outputs stand.
                why = (
                    error_reason(f"cannot write {name}", e)
                    if isinstance(e, OSError)
                    else f"cannot write {name}: {type(e).__name__}: {e}"
                )
                result = Result(
                    Record(
                        name,
                        previous.target if previous else None,
                        previous.sha256 if previous else None,
                        SidecarState.PENDING.value,
                        why,
                    )
                )
            said = _OUTPUT_SAID.get(result.record.state)
            if said is not None:
                self._say(*said, path=str(place.image), output=name, reason=result.record.error)
            results.append(result)
        return results


# What the writer says of an xmp/embed output left pending or kept: (level, event).
_OUTPUT_SAID = {
    SidecarState.PENDING.value: ("warning", "output not written; caption kept in the index"),
    SidecarState.KEPT.value: ("info", "output kept (edited by someone else)"),
}


def no_text_reason(output: str) -> str:
    """Why a model answer gives no caption: nothing at all, or nothing but a stock opening."""
    if not output.strip():
        return "the model returned no text"
    said = " ".join(output.split())
    said = said if len(said) <= 80 else said[:77] + "..."
    return f"the model returned no caption, only its opening ({said!r}), removed in clean-up"
