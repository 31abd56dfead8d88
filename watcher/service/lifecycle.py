"""The daemon's row in the database: written by `watcher run`, read by `watcher status`."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watcher.index import NoDatabase, connect, transaction

if TYPE_CHECKING:
    import sqlite_utils

# The row is the one with id 1 (the table allows no other): one daemon per database, which
# the database lock (service/lock.py) enforces.


@dataclass(frozen=True)
class DaemonRow:
    """What the last daemon on this database said about itself: its pid, when it started,
    its last heartbeat, its folders (Watch.describe() each), and when it stopped (None
    while it runs, or if it was killed without stopping)."""

    pid: int | None
    started: float | None
    heartbeat: float | None
    stopped: float | None
    folders: list[dict[str, Any]] = field(default_factory=list)
    url: str | None = None  # its web page and API, while it runs with them

    @property
    def running(self) -> bool:
        """Not stopped, and its process is there (it may still be hung: see heartbeat)."""
        return self.stopped is None and alive(self.pid)


def alive(pid: int | None) -> bool:
    """Whether a process with this pid exists (another user's counts: it is there)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- written by the daemon (the caller holds its connection's lock) --------------------------


def record_start(
    db: sqlite_utils.Database, folders: list[dict[str, Any]], url: str | None = None
) -> None:
    """A daemon started: this process, now, its folders, its web address (None: no web
    server); the last one's row is replaced."""
    now = time.time()
    with transaction(db):
        db.conn.execute(
            """INSERT OR REPLACE INTO daemon (id, pid, started, heartbeat, folders, stopped)
               VALUES (1, ?, ?, ?, ?, NULL)""",
            (os.getpid(), now, now, json.dumps(folders)),
        )
        # In `meta`, not a new column of `daemon`: older databases need no migration.
        if url:
            db.conn.execute(_SET_URL, (url,))
        else:
            db.conn.execute(_CLEAR_URL)


def record_folders(db: sqlite_utils.Database, folders: list[dict[str, Any]]) -> None:
    """The folders' states changed (missing, back, reloaded, files passed over)."""
    with transaction(db):
        db.conn.execute("UPDATE daemon SET folders = ? WHERE id = 1", (json.dumps(folders),))


def record_stop(db: sqlite_utils.Database, folders: list[dict[str, Any]]) -> None:
    """The daemon stopped cleanly: `watcher status` says "not running" from now on."""
    with transaction(db):
        db.conn.execute(
            "UPDATE daemon SET stopped = ?, folders = ? WHERE id = 1",
            (time.time(), json.dumps(folders)),
        )
        db.conn.execute(_CLEAR_URL)


_SET_URL = "INSERT OR REPLACE INTO meta (key, value) VALUES ('daemon_url', ?)"
_CLEAR_URL = "DELETE FROM meta WHERE key = 'daemon_url'"


def beat(db: sqlite_utils.Database) -> None:
    """The daemon's loop is turning: `watcher status` tells a hung daemon by an old beat."""
    with transaction(db):
        db.conn.execute("UPDATE daemon SET heartbeat = ? WHERE id = 1", (time.time(),))


# -- read by `watcher status` and the CLI -------------------------------------------------------


def read(db: sqlite_utils.Database) -> DaemonRow | None:
    """The daemon row, or None if no daemon ever ran on this database."""
    row = db.conn.execute(
        "SELECT pid, started, heartbeat, stopped, folders FROM daemon WHERE id = 1"
    ).fetchone()
    if row is None:
        return None
    pid, started, heartbeat, stopped, folders = row
    url = db.conn.execute("SELECT value FROM meta WHERE key = 'daemon_url'").fetchone()
    return DaemonRow(
        pid, started, heartbeat, stopped, json.loads(folders or "[]"), url[0] if url else None
    )


def daemon_pid(db_path: Path) -> int | None:
    """The pid of the daemon running on this database, if one is (read-only: creates
    nothing, so it can be asked before any daemon or caption run made the database)."""
    if not db_path.exists():
        return None
    try:
        db = connect(db_path, readonly=True)
    except NoDatabase:
        return None
    try:
        row = read(db)
    finally:
        db.conn.close()
    return row.pid if row is not None and row.running else None
