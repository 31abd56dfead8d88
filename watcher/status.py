"""`watcher status`: a report read from the database, so it works while the daemon runs."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

from watcher.index import connect
from watcher.queue import JobQueue


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def daemon_pid(db_path: Path) -> int | None:
    if not db_path.exists():
        return None
    db = connect(db_path)
    try:
        row = db.conn.execute("SELECT pid, stopped FROM daemon WHERE id = 1").fetchone()
    finally:
        db.conn.close()
    if row and row[1] is None and _alive(row[0]):
        return row[0]
    return None


def collect(db_path: Path) -> dict:
    if not db_path.exists():
        return {"database": str(db_path), "images": 0, "queue": {}, "daemon": None,
                "failures": [], "sidecars_pending": 0, "images_per_second": 0.0}
    db = connect(db_path)
    try:
        jobs = JobQueue(db)
        now = time.time()
        row = db.conn.execute(
            "SELECT pid, started, heartbeat, folders, stopped FROM daemon WHERE id = 1"
        ).fetchone()
        daemon = None
        if row:
            pid, started, heartbeat, folders, stopped = row
            running = stopped is None and _alive(pid)
            daemon = {"running": running, "pid": pid, "started": started,
                      "heartbeat": heartbeat, "folders": json.loads(folders or "[]")}
        images = db.conn.execute("SELECT count(*) FROM images").fetchone()[0]
        pending_sidecars = db.conn.execute(
            "SELECT path, sidecar_error FROM images WHERE sidecar_state = 'pending' "
            "ORDER BY updated DESC LIMIT 10").fetchall()
        n_pending_sidecars = db.conn.execute(
            "SELECT count(*) FROM images WHERE sidecar_state = 'pending'").fetchone()[0]
        n_skipped, skipped = jobs.skipped(10)
        try:  # failures of images deleted since are not failures any more
            from watcher.captioning import forget_vanished_failures

            forget_vanished_failures(db)
        except sqlite3.Error:  # a read-only or busy database: list them anyway
            pass
        return {
            "database": str(db_path),
            "images": images,
            "queue": jobs.counts(),
            "images_per_second": round(jobs.done_since(now - 60) / 60.0, 3),
            "daemon": daemon,
            "failures": [{"path": f.path, "reason": f.error, "attempts": f.attempts,
                          "when": f.updated} for f in jobs.failures(10)],
            "sidecars_pending": n_pending_sidecars,
            "sidecars_pending_list": [{"path": p, "reason": r} for p, r in pending_sidecars],
            "skipped": n_skipped,
            "skipped_list": [{"path": p, "reason": r} for p, r in skipped],
            "missing": missing_rows_estimate(db),
        }
    finally:
        db.conn.close()


def missing_rows_estimate(db) -> int:
    """Index rows whose folder no longer exists (moved, deleted, unmounted): one stat per
    distinct folder, not per row, so status stays quick on a large index. Single deleted
    files are found by the next scan; `watcher prune` finds them all."""
    n = 0
    for root, count in db.conn.execute("SELECT root, count(*) FROM images GROUP BY root"):
        if not os.path.isdir(root):
            n += count
    return n


def shown(path: str) -> str:
    """A path for a terminal line: control characters (a newline in a file name) escaped so
    one entry stays on one line. --json output keeps the exact path."""
    return "".join(c if c.isprintable() or c == " " else f"\\x{ord(c):02x}" for c in path)


def render(report: dict) -> str:
    lines = [f"database: {report['database']}"]
    d = report.get("daemon")
    if d and d["running"]:
        lines.append(f"daemon: running (pid {d['pid']}), watching {len(d['folders'])} folders")
        for f in d["folders"]:
            lines.append(f"  {shown(f['path'])}"
                         + (f"  [{f['error']}]" if f.get("error") else ""))
    else:
        lines.append("daemon: not running")
    q = report.get("queue") or {}
    lines.append(f"images indexed: {report['images']}")
    lines.append("queue: " + ", ".join(f"{q.get(s, 0)} {s}"
                                       for s in ("pending", "running", "done", "failed")))
    lines.append(f"rate: {report['images_per_second']:.2f} images/s over the last minute")
    if report.get("sidecars_pending"):
        lines.append(f"sidecars pending (folder not writable; `watcher retry --all` once it is):"
                     f" {report['sidecars_pending']}")
        for s in report.get("sidecars_pending_list", []):
            lines.append(f"  {shown(s['path'])}: {s['reason']}")
    if report.get("skipped"):
        lines.append(f"skipped, not captioned: {report['skipped']}")
        for s in report.get("skipped_list", []):
            lines.append(f"  {shown(s['path'])}: {s['reason']}")
    if report.get("missing"):
        lines.append(f"index rows of missing files: {report['missing']} (their folders are "
                     "gone; `watcher prune` removes them)")
    if report["failures"]:
        lines.append("last failures:")
        for f in report["failures"]:
            lines.append(f"  {shown(f['path'])}: {f['reason']}")
    return "\n".join(lines) + "\n"
