"""`watcher status`: a report read from the database, so it works while the daemon runs."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watcher.index import Index, NoDatabase, connect
from watcher.jobs import JobQueue
from watcher.paths import decode, shown
from watcher.service import lifecycle
from watcher.service.lifecycle import daemon_pid

if TYPE_CHECKING:
    import sqlite_utils

    from watcher.config import ModelConfig

__all__ = ["collect", "daemon_pid", "render", "shown"]

# A daemon whose heartbeat is older than this is reported as not responding (stopped with
# SIGSTOP, hung, or unable to write its database). It writes one every loop tick: 2 s, or
# a sixth of WatchdogSec when that is shorter, so 30 s is 15 missed beats or more.
HEARTBEAT_STALE = 30.0


def images_go_to(model: ModelConfig) -> dict[str, str] | None:
    """Where images are sent to be described, as the config says (a model server's
    address, for backend openai); None when the model runs in watcher's own process."""
    from watcher.backends.registry import get_backend

    to = get_backend(model.backend).destination(model)
    return {"backend": model.backend, "to": to} if to else None


def collect(db_path: Path, model: ModelConfig | None = None) -> dict:
    """The report, read-only: nothing is created or changed, whoever owns the file.
    `model`: the config's model, for the line that says where images are sent."""
    go = images_go_to(model) if model is not None else None
    where = {"images_go_to": go} if go else {}
    try:
        db = connect(db_path, readonly=True)
    except NoDatabase:
        return {
            **where,
            "database": str(db_path),
            "images": 0,
            "queue": {},
            "daemon": None,
            "failures": [],
            "sidecars_pending": 0,
            "images_per_second": 0.0,
        }
    try:
        jobs = JobQueue(db)
        now = time.time()
        row = lifecycle.read(db)
        daemon: dict[str, Any] | None = None
        if row:
            running = row.running
            age = max(0.0, now - row.heartbeat) if row.heartbeat else None
            daemon = {
                "running": running,
                "pid": row.pid,
                "started": row.started,
                "heartbeat": row.heartbeat,
                "heartbeat_age": round(age, 1) if age is not None else None,
                # A live pid is not enough: stopped (SIGSTOP) or hung, it is alive.
                "responding": running and age is not None and age < HEARTBEAT_STALE,
                "folders": row.folders,
            }
            for f in daemon["folders"]:
                if f.get("state") == "missing":  # rows kept, pointing at a missing folder
                    f["indexed_images"] = Index(db).count_under(f["path"])
        images = db.conn.execute("SELECT count(*) FROM images").fetchone()[0]
        n_skipped, skipped = jobs.skipped(10)
        # Failures of images deleted since are not failures any more: left out of the
        # report (the connection is read-only; the next `caption` or scan forgets them).
        from watcher.captioning import vanished_failures

        gone = set(vanished_failures(db))
        failures = [f for f in jobs.failures(10 + len(gone)) if f.path not in gone][:10]
        return {
            **where,
            "database": str(db_path),
            "images": images,
            "queue": jobs.counts(),
            "images_per_second": round(jobs.done_since(now - 60) / 60.0, 3),
            "daemon": daemon,
            "failures": [
                {"path": f.path, "reason": f.error, "attempts": f.attempts, "when": f.updated}
                for f in failures
            ],
            **_sidecars(db),
            "skipped": n_skipped,
            "skipped_list": [{"path": p, "reason": r} for p, r in skipped],
            "missing": missing_rows_estimate(db),
            **_other_outputs(db),
            "semantic": semantic_progress(db, images),
        }
    finally:
        db.conn.close()


def _sidecars(db: sqlite_utils.Database) -> dict:
    """The `.txt` sidecars that wait for `watcher retry` (pending), or were left alone as
    someone else's (kept, with the sidecar's name): counts, and up to 10 of each with why."""
    out: dict[str, Any] = {}
    for state in ("pending", "kept"):
        n = db.conn.execute(
            "SELECT count(*) FROM images WHERE sidecar_state = ?", (state,)
        ).fetchone()[0]
        found = db.conn.execute(
            """SELECT path, sidecar, sidecar_error FROM images WHERE sidecar_state = ?
               ORDER BY updated DESC LIMIT 10""",
            (state,),
        ).fetchall()
        out[f"sidecars_{state}"] = n
        out[f"sidecars_{state}_list"] = [
            {"path": decode(p), "sidecar": decode(s) if s else s, "reason": r}
            if state == "kept"
            else {"path": decode(p), "reason": r}
            for p, s, r in found
        ]
    return out


def _other_outputs(db: sqlite_utils.Database) -> dict:
    """The xmp/embed outputs (image_outputs) that wait for `watcher retry`, or were left
    alone because someone else changed them: counts, and up to 10 of each with why."""
    out: dict[str, Any] = {}
    for state in ("pending", "kept"):
        n = db.conn.execute(
            "SELECT count(*) FROM image_outputs WHERE state = ?", (state,)
        ).fetchone()[0]
        found = db.conn.execute(
            """SELECT i.path, o.output, o.error FROM image_outputs o
               JOIN images i ON i.rowid = o.image WHERE o.state = ?
               ORDER BY o.updated DESC LIMIT 10""",
            (state,),
        ).fetchall()
        out[f"outputs_{state}"] = n
        out[f"outputs_{state}_list"] = [
            {"path": decode(p), "output": o, "reason": r} for p, o, r in found
        ]
    return out


def passed_over_lines(entries: list[dict], root: str | None = None) -> list[str]:
    """`passed over: 3 files (no extension): IMG_0001, scan, ...`, one line per reason, for
    `watcher caption` and `watcher status`. Names are shown relative to `root` if given."""
    lines = []
    for e in entries:
        names = []
        for p in e["examples"]:
            if root and p.startswith(root.rstrip("/") + "/"):
                p = p[len(root.rstrip("/")) + 1 :]
            names.append(shown(p))
        more = ", ..." if e["count"] > len(names) else ""
        n = e["count"]
        lines.append(
            f"passed over: {n} file{'s' if n != 1 else ''} ({e['reason']}): "
            + ", ".join(names)
            + more
        )
    return lines


def _folder_state(f: dict) -> str:
    if f.get("error"):
        return f"  [{f['error']}]"
    if f.get("state") != "missing":
        return ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f.get("since") or 0))
    text = (
        f"  [missing since {since} ({f.get('missing') or 'does not exist'}): "
        "waiting for it to appear"
    )
    n = f.get("indexed_images")
    if n:
        images = "1 indexed image points" if n == 1 else f"{n} indexed images point"
        text += f"; {images} into it, kept until it is back"
    return text + "]"


def missing_rows_estimate(db: sqlite_utils.Database) -> int:
    """Index rows whose folder no longer exists (moved, deleted, unmounted): one stat per
    distinct folder, not per row, so status stays quick on a large index. Single deleted
    files are found by the next scan; `watcher prune` finds them all."""
    n = 0
    for root, count in db.conn.execute("SELECT root, count(*) FROM images GROUP BY root"):
        if not os.path.isdir(decode(root)):
            n += count
    return n


def semantic_progress(db: sqlite_utils.Database, images: int) -> dict:
    """How many captions have a search vector, by which model, and the backfill's state."""
    from watcher.pipeline.backfill import read_progress

    index = Index(db)
    p = read_progress(index)
    return {
        "model": index.vector_model(),
        "embedded": index.vector_count(),
        "images": images,
        "backfill": p.state if p else None,
        "rate": p.rate if p else 0.0,
        "reason": p.reason if p else None,
    }


def semantic_lines(s: dict, daemon_running: bool) -> list[str]:
    line = f"semantic search: {s['embedded']} of {s['images']} captions embedded"
    if s.get("model"):
        line += f" ({s['model']})"
    state = s.get("backfill") if daemon_running else None
    left = s["images"] - s["embedded"]
    if state == "off":
        return [line, f"  not embedding: {s.get('reason') or 'semantic search is off'}"]
    if state in ("running", "loading") and left > 0:
        rate = s.get("rate") or 0.0
        eta = f", about {_duration(left / rate)} left" if rate > 0 else ""
        return [line, f"  embedding in the background: {rate:.0f} captions/s{eta}"]
    if state == "paused" and left > 0:
        return [line, "  embedding paused while images are captioned"]
    return [line]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render(report: dict) -> str:
    lines = [f"database: {report['database']}"]
    d = report.get("daemon")
    if d and d["running"]:
        if d.get("responding", True):
            lines.append(f"daemon: running (pid {d['pid']}), watching {len(d['folders'])} folders")
        else:
            age = d.get("heartbeat_age")
            lines.append(
                f"daemon: not responding (pid {d['pid']}, last heartbeat "
                + (f"{age:.0f} s ago)" if age is not None else "never)")
                + f", watching {len(d['folders'])} folders"
            )
        for f in d["folders"]:
            lines.append(f"  {shown(f['path'])}" + _folder_state(f))
            lines += [
                "    " + ln for ln in passed_over_lines(f.get("passed_over") or [], f["path"])
            ]
    else:
        lines.append("daemon: not running")
    go = report.get("images_go_to")
    if go:
        lines.append(f"images go to: {go['to']} (backend {go['backend']})")
    q = report.get("queue") or {}
    lines.append(f"images indexed: {report['images']}")
    lines.append(
        "queue: "
        + ", ".join(f"{q.get(s, 0)} {s}" for s in ("pending", "running", "done", "failed"))
    )
    lines.append(f"rate: {report['images_per_second']:.2f} images/s over the last minute")
    # Once semantic search has run (vectors, or the daemon's backfill has reported).
    s = report.get("semantic")
    if s and (s["embedded"] or s["backfill"]):
        lines += semantic_lines(report["semantic"], bool(d and d["running"]))
    # The reasons differ (a read-only folder, a name too long, a folder in the way): each
    # path says its own; the heading only says what to do. Kept sidecars (edited by the
    # user, their own; overwrite: never) have their text in the index, the model's beside.
    for key, heading, where in (
        (
            "sidecars_pending",
            "sidecars pending (caption kept in the index; `watcher retry --all` "
            "once the reason is fixed)",
            lambda s: shown(s["path"]),
        ),
        (
            "sidecars_kept",
            "sidecars kept (edited by you; not overwritten)",
            lambda s: shown(s["sidecar"] or s["path"]),
        ),
        (
            "outputs_pending",
            "outputs pending (xmp, embed; `watcher retry --all` once the reason is fixed)",
            lambda s: f"{s['output']}: {shown(s['path'])}",
        ),
        (
            "outputs_kept",
            "outputs kept (changed in a photo manager)",
            lambda s: f"{s['output']}: {shown(s['path'])}",
        ),
        ("skipped", "skipped, not captioned", lambda s: shown(s["path"])),
    ):
        if report.get(key):
            lines.append(f"{heading}: {report[key]}")
            lines += [f"  {where(s)}: {s['reason']}" for s in report.get(f"{key}_list", [])]
    if report.get("missing"):
        lines.append(
            f"index rows of missing files: {report['missing']} (their folders are "
            "gone; `watcher prune` removes them)"
        )
    if report["failures"]:
        lines.append("last failures:")
        for f in report["failures"]:
            lines.append(f"  {shown(f['path'])}: {f['reason']}")
    return "\n".join(lines) + "\n"
