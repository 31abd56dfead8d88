"""The SQLite index: one `images` table with full-text search over captions, WAL, versioned."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

SCHEMA_VERSION = 2  # 2: model_caption


@dataclass(frozen=True)
class ImageRow:
    """What the index knows about one image."""

    path: str
    root: str
    sha256: str
    size: int
    mtime_ns: int
    width: int
    height: int
    caption: str  # what the sidecar holds: ours, or the user's text when theirs was kept
    task: str
    outputs: dict[str, str]  # task key -> text, every task run (the sidecar's one included)
    model: str
    revision: str | None
    sidecar: str | None  # the sidecar path this image owns
    sidecar_sha256: str | None  # hash of what we last wrote there; None if not ours
    sidecar_state: str  # written | kept (user's file left alone) | pending (could not write)
    sidecar_error: str | None  # pending: why it could not be written; kept: why left alone
    created: float
    updated: float
    model_caption: str | None = None  # the model's caption (with prefix/suffix), always set

    @property
    def ours(self) -> str:
        """The text we would write to the sidecar."""
        return self.model_caption if self.model_caption is not None else self.caption

    @classmethod
    def from_row(cls, row: dict) -> ImageRow:
        row = dict(row)
        row["outputs"] = json.loads(row.get("outputs") or "{}")
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})

    def to_row(self) -> dict:
        row = dict(self.__dict__)
        row["outputs"] = json.dumps(self.outputs, ensure_ascii=False, sort_keys=True)
        return row


def connect(path: Path) -> sqlite_utils.Database:
    """Open (and create or migrate) the database. One connection per thread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=60, isolation_level=None, check_same_thread=False)
    db = sqlite_utils.Database(conn)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed `done` survives power loss, not only a process crash.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=60000")
    _migrate(db)
    return db


@contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT; rolled back on any exception."""
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.conn.execute("ROLLBACK")
        raise
    db.conn.execute("COMMIT")


def _migrate(db: sqlite_utils.Database) -> None:
    with transaction(db):
        db.conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        row = db.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema {version} is newer than this watcher ({SCHEMA_VERSION}); upgrade"
            )
        if version < 1:
            _create_v1(db)
        if version < 2:
            # The index holds what the sidecar holds (`caption`, searchable), and the model's
            # own caption beside it. Until now they were the same.
            db.conn.execute("ALTER TABLE images ADD COLUMN model_caption TEXT")
            db.conn.execute("UPDATE images SET model_caption = caption")
        db.conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )


def _create_v1(db: sqlite_utils.Database) -> None:
    for sql in (
        """CREATE TABLE IF NOT EXISTS images (
            path TEXT PRIMARY KEY, root TEXT NOT NULL, sha256 TEXT NOT NULL,
            size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
            width INTEGER, height INTEGER, caption TEXT NOT NULL, task TEXT NOT NULL,
            outputs TEXT NOT NULL DEFAULT '{}', model TEXT NOT NULL, revision TEXT,
            sidecar TEXT, sidecar_sha256 TEXT, sidecar_state TEXT NOT NULL DEFAULT 'written',
            sidecar_error TEXT, created REAL NOT NULL, updated REAL NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS images_sha256 ON images (sha256)",
        "CREATE INDEX IF NOT EXISTS images_sidecar ON images (sidecar)",
        "CREATE INDEX IF NOT EXISTS images_root ON images (root)",
        """CREATE TABLE IF NOT EXISTS jobs (
            id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, root TEXT NOT NULL,
            state TEXT NOT NULL, gen INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0, error TEXT, next_try REAL NOT NULL DEFAULT 0,
            size INTEGER, mtime_ns INTEGER,
            enqueued REAL NOT NULL, updated REAL NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, next_try)",
        "CREATE INDEX IF NOT EXISTS jobs_updated ON jobs (state, updated)",
        """CREATE TABLE IF NOT EXISTS daemon (
            id INTEGER PRIMARY KEY CHECK (id = 1), pid INTEGER, started REAL,
            heartbeat REAL, folders TEXT, stopped REAL)""",
    ):
        db.conn.execute(sql)
    # External-content FTS5 kept in sync by triggers (sqlite-utils writes them).
    db["images"].enable_fts(
        ["caption", "outputs"], create_triggers=True, tokenize="porter", replace=True
    )


class Index:
    """Reads and writes of image rows. Writes expect the caller's transaction."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    def get(self, path: str) -> ImageRow | None:
        return self._one("SELECT * FROM images WHERE path = ?", (path,))

    def by_hash(self, sha256: str) -> ImageRow | None:
        return self._one(
            "SELECT * FROM images WHERE sha256 = ? ORDER BY updated DESC LIMIT 1", (sha256,)
        )

    def _one(self, sql: str, args: tuple) -> ImageRow | None:
        cur = self.db.conn.execute(sql, args)
        row = cur.fetchone()
        if row is None:
            return None
        return ImageRow.from_row(dict(zip([c[0] for c in cur.description], row, strict=True)))

    def sidecar_owner(self, sidecar: str) -> str | None:
        row = self.db.conn.execute(
            "SELECT path FROM images WHERE sidecar = ? LIMIT 1", (sidecar,)
        ).fetchone()
        return row[0] if row else None

    def upsert(self, row: ImageRow) -> None:
        # One prepared statement: sqlite-utils' upsert re-reads the table schema on every
        # call, which the benchmark showed as most of the writer's CPU per image.
        self.db.conn.execute(_UPSERT, row.to_row())

    def delete(self, path: str) -> None:
        self.db.conn.execute("DELETE FROM images WHERE path = ?", (path,))

    def move(self, src: str, dest: str, sidecar: str | None) -> None:
        self.db.conn.execute(
            "UPDATE images SET path = ?, sidecar = ?, updated = ? WHERE path = ?",
            (dest, sidecar, time.time(), src),
        )

    def stats_under(self, root: str) -> dict[str, tuple[int, int]]:
        """path -> (size, mtime_ns) for every indexed image under `root`: one query for a scan."""
        cur = self.db.conn.execute(
            "SELECT path, size, mtime_ns FROM images WHERE path >= ? AND path < ?",
            prefix_range(root),
        )
        return {p: (s, m) for p, s, m in cur}

    def count(self) -> int:
        return self.db.conn.execute("SELECT count(*) FROM images").fetchone()[0]

    def search(self, query: str, limit: int = 20) -> list[tuple[ImageRow, float]]:
        """Full-text search, best match first (bm25)."""
        cur = self.db.conn.execute(
            """SELECT images.*, bm25(images_fts) AS score FROM images_fts
               JOIN images ON images.rowid = images_fts.rowid
               WHERE images_fts MATCH ? ORDER BY score LIMIT ?""",
            (_fts_query(query), limit),
        )
        names = [c[0] for c in cur.description]
        out = []
        for values in cur:
            row = dict(zip(names, values, strict=True))
            score = row.pop("score")
            out.append((ImageRow.from_row(row), score))
        return out


_COLUMNS = [f.name for f in dataclasses.fields(ImageRow)]
# INSERT or UPDATE in one statement; the FTS triggers fire for either.
_UPSERT = (f"INSERT INTO images ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join(':' + c for c in _COLUMNS)}) ON CONFLICT(path) DO UPDATE SET "
           + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c != "path"))


def prefix_range(root: str | Path) -> tuple[str, str]:
    """Bounds selecting every path under `root` through the primary-key index: '0' is the
    character right after '/', so [root/, root0) is exactly the subtree."""
    prefix = str(root).rstrip("/") + "/"
    return prefix, prefix[:-1] + "0"


def _fts_query(query: str) -> str:
    """User words as quoted FTS5 terms, AND-ed: punctuation cannot break the syntax."""
    terms = ['"' + t.replace('"', '""') + '"' for t in query.split() if t]
    return " ".join(terms) if terms else '""'
