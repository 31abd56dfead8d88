"""The persistent job queue: one row per image path in SQLite, pending -> running -> done|failed."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils
import structlog

from watcher.index import prefix_range, transaction
from watcher.messages import Job, JobState
from watcher.paths import decode, encode, safe_text, shown

log = structlog.get_logger("watcher.jobs")

# Every state a job row can be in, in the order `counts()` lists them.
STATES: tuple[JobState, ...] = tuple(JobState)


@dataclass(frozen=True)
class Failure:
    path: str
    error: str
    attempts: int
    updated: float


class JobQueue:
    """Queue operations on the shared database. Each thread uses its own JobQueue."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    # -- producers ----------------------------------------------------------------------
    def enqueue_many(self, items: Iterable[tuple[Path, Path]], *, settled: bool = False) -> int:
        """Queue (path, root) pairs; the same path queued twice is one job. Returns how many
        jobs became pending (new, or re-opened from done/failed/running).

        Each job keeps the file's (size, mtime_ns) as it was queued. `settled` (a file
        event, settled): a running job queued for exactly these bytes is left alone, since
        it reads them or newer. (A file the start-up scan queued while its events were
        still to come ran twice, its first result thrown away.) Otherwise a running job
        runs again: a scan also re-queues unchanged files whose settings changed.

        Paths are stored encoded (watcher.paths): any file name can be queued. An unexpected
        error on one path is recorded against that path (a `skipped` job with the reason, or
        the log if even that fails) and the others are queued: one file never holds back
        another. A database that cannot be written (disk full) raises: nothing was queued."""
        now = time.time()
        n = 0
        with transaction(self.db):
            for path, root in items:
                try:
                    n += self._enqueue_one(path, root, now, settled)
                except sqlite3.OperationalError:
                    raise
                except Exception as e:
                    reason = f"could not be queued: {type(e).__name__}: {e}"
                    log.error("could not queue a file", path=shown(path), reason=reason)
                    try:
                        self.skip(path, root, reason)
                    except sqlite3.OperationalError:
                        raise
                    except Exception:
                        pass  # said in the log above; nothing more can be kept
        return n

    def _enqueue_one(self, path: Path, root: Path, now: float, settled: bool) -> int:
        size: int | None
        mtime_ns: int | None
        try:
            st = os.stat(path)
            size, mtime_ns = st.st_size, st.st_mtime_ns
        except OSError:  # gone or unreadable: decode says which; nothing to compare
            size = mtime_ns = None
        # A running job gets gen+1 so its result is not taken as current: it runs again.
        cur = self.db.conn.execute(
            """INSERT INTO jobs (path, root, state, gen, attempts, next_try, enqueued,
                                 updated, size, mtime_ns)
               VALUES (?, ?, 'pending', 0, 0, 0, ?, ?, ?, ?)
               ON CONFLICT(path) DO UPDATE SET
                 root = excluded.root, gen = gen + 1, attempts = 0, error = NULL,
                 next_try = 0, updated = excluded.updated, size = excluded.size,
                 mtime_ns = excluded.mtime_ns,
                 state = CASE WHEN state = 'running' THEN 'running' ELSE 'pending' END
               WHERE state != 'pending'
                 AND NOT (? AND state = 'running' AND excluded.size IS NOT NULL
                          AND size IS excluded.size AND mtime_ns IS excluded.mtime_ns)""",
            (encode(path), encode(root), now, now, size, mtime_ns, settled),
        )
        return cur.rowcount

    def skip(self, path: Path, root: Path, reason: str) -> None:
        """Record an image name that is not captioned (a link out of the root, a named
        pipe), and why: state `skipped`, shown by `watcher status`, never claimed. Queuing
        the path again (it became a regular file) makes it pending. Runs inside the caller's
        transaction."""
        now = time.time()
        self.db.conn.execute(
            """INSERT INTO jobs (path, root, state, error, enqueued, updated)
               VALUES (?, ?, 'skipped', ?, ?, ?)
               ON CONFLICT(path) DO UPDATE SET state = 'skipped', error = excluded.error,
                 root = excluded.root, updated = excluded.updated
               WHERE state != 'running'""",
            (encode(path), encode(root), safe_text(reason), now, now),
        )

    def set_skipped(self, under: Path, root: Path, found: Iterable[tuple[Path, str]]) -> None:
        """A scan of `under` found exactly these skipped names: record them, and forget
        skipped entries it no longer found (gone, or a regular file now). Runs inside the
        caller's transaction."""
        keep = set()
        for path, reason in found:
            self.skip(path, root, reason)
            keep.add(encode(path))
        rows = self.db.conn.execute(
            "SELECT path FROM jobs WHERE state = 'skipped' AND path >= ? AND path < ?",
            prefix_range(under),
        ).fetchall()
        self.db.conn.executemany(
            "DELETE FROM jobs WHERE path = ? AND state = 'skipped'",
            [(p,) for (p,) in rows if p not in keep],
        )

    def skipped(self, limit: int = 10) -> tuple[int, list[tuple[str, str]]]:
        """How many image names are skipped, and the newest `limit` as (path, reason)."""
        n = self.db.conn.execute("SELECT count(*) FROM jobs WHERE state = 'skipped'").fetchone()[0]
        rows = self.db.conn.execute(
            "SELECT path, error FROM jobs WHERE state = 'skipped' ORDER BY updated DESC, path "
            "LIMIT ?",
            (limit,),
        ).fetchall()
        return n, [(decode(p), r) for p, r in rows]

    def enqueue(self, path: Path, root: Path) -> bool:
        return self.enqueue_many([(path, root)]) > 0

    # -- the consumer -------------------------------------------------------------------
    def recover(self) -> int:
        """Jobs left `running` by a crash or kill are pending again. Call once at start."""
        with transaction(self.db):
            return self.db.conn.execute(
                "UPDATE jobs SET state = 'pending', next_try = 0 WHERE state = 'running'"
            ).rowcount

    def claim(self, limit: int, roots: tuple[Path, ...] | None = None) -> list[Job]:
        """Move up to `limit` due pending jobs to running, oldest first (only under `roots`)."""
        now = time.time()
        where = "state = 'pending' AND next_try <= ?"
        args: list = [now]
        if roots is not None:
            ranges = []
            for root in roots:
                lo, hi = prefix_range(root)
                ranges.append("(path >= ? AND path < ?)")
                args += [lo, hi]
            where += " AND (" + " OR ".join(ranges or ["0"]) + ")"
        with transaction(self.db):
            rows = self.db.conn.execute(
                f"""UPDATE jobs SET state = 'running', attempts = attempts + 1, updated = ?
                    WHERE id IN (SELECT id FROM jobs WHERE {where} ORDER BY id LIMIT ?)
                    RETURNING id, path, root, gen, attempts""",
                (now, *args, limit),
            ).fetchall()
        rows.sort()
        return [Job(i, Path(decode(p)), Path(decode(r)), g, a) for i, p, r, g, a in rows]

    def finish(self, job: Job) -> bool:
        """Mark done, inside the caller's transaction (the one that wrote the index row).
        False when the file was re-queued meanwhile: it stays pending and runs again."""
        cur = self.db.conn.execute(
            "UPDATE jobs SET state = 'done', error = NULL, updated = ? WHERE id = ? AND gen = ?",
            (time.time(), job.id, job.gen),
        )
        if cur.rowcount == 0:
            self._reopen(job)
            return False
        return True

    def fail(
        self,
        job: Job,
        reason: str,
        *,
        transient: bool,
        max_attempts: int,
        backoff: float,
        identity: tuple[int, int] | None = None,
    ) -> JobState:
        """Record a failure; transient ones retry with exponential backoff up to max_attempts.
        Returns the new state (pending or failed). Runs inside the caller's transaction."""
        now = time.time()
        if transient and job.attempts < max_attempts:
            delay = backoff * (2 ** (job.attempts - 1))
            self.db.conn.execute(
                """UPDATE jobs SET state = 'pending', error = ?, next_try = ?, updated = ?
                   WHERE id = ? AND state = 'running'""",
                (safe_text(reason), now + delay, now, job.id),
            )
            return JobState.PENDING
        if transient:
            reason = f"{reason} (gave up after {job.attempts} attempts)"
        cur = self.db.conn.execute(
            """UPDATE jobs SET state = 'failed', error = ?, updated = ?, size = ?, mtime_ns = ?
               WHERE id = ? AND gen = ? AND state = 'running'""",
            (safe_text(reason), now, *(identity or (None, None)), job.id, job.gen),
        )
        if cur.rowcount == 0:
            self._reopen(job)
            return JobState.PENDING
        return JobState.FAILED

    def skip_running(self, job: Job, reason: str) -> None:
        """The writer found the running job's image no longer captionable where it is (its
        folder became a symbolic link): `skipped` with the reason, like a scan's refusal, so
        it is shown and queued again once the name is a regular image inside the folder.
        Inside the caller's transaction."""
        cur = self.db.conn.execute(
            "UPDATE jobs SET state = 'skipped', error = ?, updated = ? WHERE id = ? AND gen = ?",
            (reason, time.time(), job.id, job.gen),
        )
        if cur.rowcount == 0:
            self._reopen(job)

    def release(self, job: Job, delay: float = 0.0) -> None:
        """Back to pending without counting an attempt (shutdown, stale file)."""
        self.db.conn.execute(
            """UPDATE jobs SET state = 'pending', attempts = max(attempts - 1, 0),
               next_try = ?, updated = ? WHERE id = ?""",
            (time.time() + delay, time.time(), job.id),
        )

    def _reopen(self, job: Job) -> None:
        self.db.conn.execute(
            "UPDATE jobs SET state = 'pending', next_try = 0 WHERE id = ? AND state = 'running'",
            (job.id,),
        )

    # -- housekeeping -------------------------------------------------------------------
    def forget(self, path: str) -> None:
        self.db.conn.execute("DELETE FROM jobs WHERE path = ?", (encode(path),))

    def move(self, src: str, dest: str, *, rerun: bool = False) -> bool:
        """The job follows its file. With `rerun` it is pending again (and a result already
        in flight for the old name is stale). True if there was a job to move."""
        src, dest = encode(src), encode(dest)
        self.db.conn.execute("DELETE FROM jobs WHERE path = ?", (dest,))
        if rerun:
            return (
                self.db.conn.execute(
                    """UPDATE jobs SET path = ?, gen = gen + 1, attempts = 0, error = NULL,
                   next_try = 0, updated = ?,
                   state = CASE WHEN state = 'running' THEN 'running' ELSE 'pending' END
                   WHERE path = ?""",
                    (dest, time.time(), src),
                ).rowcount
                > 0
            )
        return (
            self.db.conn.execute("UPDATE jobs SET path = ? WHERE path = ?", (dest, src)).rowcount
            > 0
        )

    def failed_existing(self, paths: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
        """Failed jobs (all, or those for `paths`), split into (files that still exist,
        files deleted since): only the first are worth retrying."""
        if paths is None:
            rows = [
                decode(p)
                for (p,) in self.db.conn.execute(
                    "SELECT path FROM jobs WHERE state = 'failed' ORDER BY path"
                )
            ]
        else:
            rows = [
                p
                for p in paths
                if self.db.conn.execute(
                    "SELECT 1 FROM jobs WHERE state = 'failed' AND path = ?", (encode(p),)
                ).fetchone()
            ]
        exist = [p for p in rows if os.path.lexists(p)]
        kept = set(exist)
        return exist, [p for p in rows if p not in kept]

    def forget_failed(self, paths: Iterable[str]) -> int:
        """Forget failures (of files deleted since): no longer listed or retried."""
        with transaction(self.db):
            return sum(
                self.db.conn.execute(
                    "DELETE FROM jobs WHERE path = ? AND state = 'failed'", (encode(p),)
                ).rowcount
                for p in paths
            )

    def retry(self, paths: Iterable[str] | None = None) -> int:
        """Re-queue failed jobs (all of them, or those for `paths`)."""
        with transaction(self.db):
            if paths is None:
                return self.db.conn.execute(
                    """UPDATE jobs SET state = 'pending', attempts = 0, next_try = 0,
                        gen = gen + 1 WHERE state = 'failed'"""
                ).rowcount
            n = 0
            for p in paths:
                n += self.db.conn.execute(
                    """UPDATE jobs SET state = 'pending', attempts = 0, next_try = 0,
                       gen = gen + 1 WHERE state = 'failed' AND path = ?""",
                    (encode(p),),
                ).rowcount
            return n

    def state_of(self, path: str) -> tuple[str, str | None] | None:
        row = self.db.conn.execute(
            "SELECT state, error FROM jobs WHERE path = ?", (encode(path),)
        ).fetchone()
        return (row[0], row[1]) if row else None

    def counts(self, root: Path | None = None) -> dict[str, int]:
        """Jobs by state (every state, zeros included; keys are the plain state strings)."""
        sql, args = "SELECT state, count(*) FROM jobs", []
        if root is not None:
            sql += " WHERE path >= ? AND path < ?"
            args = list(prefix_range(root))
        got = dict(self.db.conn.execute(sql + " GROUP BY state", args).fetchall())
        return {s.value: got.get(s.value, 0) for s in STATES}

    def next_due(self) -> float | None:
        row = self.db.conn.execute(
            "SELECT min(next_try) FROM jobs WHERE state = 'pending'"
        ).fetchone()
        return row[0]

    def failures(self, limit: int = 10, root: Path | None = None) -> list[Failure]:
        sql, args = "SELECT path, error, attempts, updated FROM jobs WHERE state = 'failed'", []
        if root is not None:
            sql += " AND path >= ? AND path < ?"
            args = list(prefix_range(root))
        rows = self.db.conn.execute(sql + " ORDER BY updated DESC LIMIT ?", (*args, limit))
        return [Failure(decode(p), *rest) for p, *rest in rows]

    def failed_under(self, root: Path) -> dict[str, tuple[int | None, int | None]]:
        """path -> (size, mtime_ns) at the time of failure, for the catch-up scan."""
        cur = self.db.conn.execute(
            "SELECT path, size, mtime_ns FROM jobs WHERE state = 'failed' AND path >= ? "
            "AND path < ?",
            prefix_range(root),
        )
        return {decode(p): (s, m) for p, s, m in cur}

    def done_since(self, since: float) -> int:
        return self.db.conn.execute(
            "SELECT count(*) FROM jobs WHERE state = 'done' AND updated >= ?", (since,)
        ).fetchone()[0]
