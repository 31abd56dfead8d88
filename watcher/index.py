"""The SQLite index: one `images` table with full-text search over captions, WAL, versioned."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlite_utils

from watcher.outputs.base import Record
from watcher.paths import decode, encode

if TYPE_CHECKING:
    import numpy as np

    from watcher.embedding import VectorBatch

# 2: model_caption, 3: library order indexes (web pages), 4: image_outputs,
# 5: caption vectors (semantic search), 6: the vectors' change log (watcher.bitmatrix)
SCHEMA_VERSION = 6


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
        """From a database row: paths decoded back to the exact file names (watcher.paths)."""
        row = dict(row)
        row["outputs"] = json.loads(row.get("outputs") or "{}")
        for k in _PATH_COLUMNS:
            if row.get(k) is not None:
                row[k] = decode(row[k])
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})

    def to_row(self) -> dict:
        """For the database: paths encoded so that any file name can be stored."""
        row = dict(self.__dict__)
        row["outputs"] = json.dumps(self.outputs, ensure_ascii=False, sort_keys=True)
        for k in _PATH_COLUMNS:
            if row[k] is not None:
                row[k] = encode(row[k])
        return row


_PATH_COLUMNS = ("path", "root", "sidecar")


class DatabaseError(RuntimeError):
    """The database cannot be used as asked: the message says why and what to do."""


class NoDatabase(DatabaseError):
    """A read-only open found nothing to read yet (no file, an empty one, no tables)."""


# Stamped into the SQLite header (PRAGMA application_id) when we create a database: the mark
# that a file is ours. A file without it that has tables is another program's: never changed.
APPLICATION_ID = int.from_bytes(b"MdWt", "big")
# Databases made before the mark existed are recognised by these tables plus meta's version.
_LEGACY_TABLES = frozenset({"meta", "images", "jobs", "daemon"})
# Files SQLite creates beside the database: they must be plain files, not links or folders.
_NEIGHBOURS = ("-wal", "-shm", "-journal")


def connect(path: Path, *, readonly: bool = False) -> sqlite_utils.Database:
    """Open (and create or migrate) the database. One connection per thread.

    `readonly` (watcher status, search): never creates or changes anything, works in a
    read-only folder, and raises NoDatabase when there is nothing to read yet. Whatever
    the mode, a path that is not our database raises DatabaseError before anything is
    written: a folder, another program's SQLite file, a file that is not SQLite at all."""
    path = Path(path).absolute()
    fresh = check_path(path)
    if readonly:
        if fresh:
            raise NoDatabase(f"no index yet at {path}")
        conn = _open_readonly(path)
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatabaseError(
                f"cannot create the database folder {path.parent}: {os_reason(e)}"
            ) from None
        conn = _open(str(path), uri=False)
    try:
        state = _ours(conn, path)
        if readonly:
            if state == "fresh":
                raise NoDatabase(f"no index yet at {path}")
            version = _version(conn)
            if version != SCHEMA_VERSION:
                conn.close()
                return _upgrade_for_reading(path, version)
            return sqlite_utils.Database(conn)
        db = sqlite_utils.Database(conn)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed `done` survives power loss, not only a process crash.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=60000")
        _migrate(db)
        if state != "ours-marked":
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        return db
    except sqlite3.Error as e:
        conn.close()
        raise DatabaseError(_sqlite_reason(path, e, readonly)) from None
    except BaseException:
        conn.close()
        raise


def check_path(path: Path) -> bool:
    """Refuse, before anything is created, a database path we must not open; True when
    there is no database there yet (nothing, or an empty file: fine to initialise)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise DatabaseError(
                f"{path} is a symbolic link to {os.readlink(path)}, which does "
                "not exist; refusing to create a database through it"
            ) from None
        _check_neighbours(path)
        return True
    except OSError as e:
        raise DatabaseError(f"cannot use {path} as the database: {os_reason(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise DatabaseError(
            f"{path} is a folder, not a database file; give a file path "
            f"(e.g. --db {path / 'index.db'})"
        )
    if not stat.S_ISREG(st.st_mode):
        raise DatabaseError(
            f"{path} is not a regular file (a pipe, socket or device); "
            "refusing to open it as the database"
        )
    _check_neighbours(path)
    # Not a SQLite file at all: SQLite says so (SQLITE_NOTADB) at its first read, before
    # anything is written. Never read it ourselves: closing any other descriptor of the file
    # drops every POSIX lock this process's SQLite connections hold on it (fcntl semantics),
    # and another process would then delete the live -wal and -shm under them.
    return st.st_size == 0


def _check_neighbours(path: Path) -> None:
    real = os.path.realpath(path)
    for suffix in _NEIGHBOURS:
        try:
            nst = os.lstat(real + suffix)
        except OSError:
            continue
        if not stat.S_ISREG(nst.st_mode):
            raise DatabaseError(
                f"{real + suffix} is not a regular file (a symbolic link or "
                "a folder?); refusing to open the database beside it. Remove "
                "it if no watcher is running"
            )


def verify(path: Path) -> None:
    """DatabaseError unless `path` is our database (of a schema we can use) or nothing yet.
    Changes nothing: for checks before anything is created beside it (the lock file)."""
    path = Path(path).absolute()
    if check_path(path):
        return
    conn = _open_readonly(path)
    try:
        if _ours(conn, path) != "fresh":
            _version(conn)
    except sqlite3.Error as e:
        raise DatabaseError(_sqlite_reason(path, e, True)) from None
    finally:
        conn.close()


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the database file the path names now; None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def os_reason(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0)
    return f"{e.strerror or e}" + (f" ({name})" if name else "")


def _open(target: str, *, uri: bool) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(
            target, uri=uri, timeout=60, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as e:
        raise DatabaseError(f"cannot open the database {target}: {e}") from None
    # Every connection: the vector table's triggers fire on any delete of an image row.
    load_vec(conn)
    return conn


VEC_PROBLEM: list[str] = []  # why sqlite-vec could not be loaded here (once)


def load_vec(conn: sqlite3.Connection) -> bool:
    """Load the sqlite-vec extension into `conn`; False (and VEC_PROBLEM says why) when
    this Python cannot. Python builds without --enable-loadable-sqlite-extensions (pyenv's
    default, python.org's macOS build) lack enable_load_extension: there the switch is
    thrown through the C API on the connection's handle (CPython only)."""
    try:
        import sqlite_vec
    except ImportError:
        _vec_problem("the sqlite-vec package is not installed (pip install sqlite-vec)")
        return False
    try:
        if hasattr(conn, "enable_load_extension"):
            conn.enable_load_extension(True)
            try:
                sqlite_vec.load(conn)
            finally:
                conn.enable_load_extension(False)
        else:
            _c_enable_load_extension(conn, True)
            try:
                conn.execute("SELECT load_extension(?)", (sqlite_vec.loadable_path(),))
            finally:
                _c_enable_load_extension(conn, False)
    except (sqlite3.Error, OSError, AttributeError, ValueError) as e:
        _vec_problem(f"this Python's SQLite cannot load the sqlite-vec extension ({e})")
        return False
    return True


def _vec_problem(reason: str) -> None:
    if not VEC_PROBLEM:
        VEC_PROBLEM.append(reason)


def _c_enable_load_extension(conn: sqlite3.Connection, on: bool) -> None:
    import _sqlite3
    import ctypes
    import platform

    if platform.python_implementation() != "CPython":
        raise ValueError("enable_load_extension is missing and this is not CPython")
    lib = ctypes.CDLL(_sqlite3.__file__)
    fn = lib.sqlite3_enable_load_extension
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    # CPython's connection object: PyObject_HEAD (refcount, type), then `sqlite3 *db`.
    handle = ctypes.c_void_p.from_address(id(conn) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
    if not handle or fn(handle, 1 if on else 0) != 0:
        raise ValueError("sqlite3_enable_load_extension failed")


def vec_loaded(conn: sqlite3.Connection) -> bool:
    """Whether sqlite-vec's functions are there in this connection."""
    try:
        conn.execute("SELECT vec_version()").fetchone()
    except sqlite3.Error:
        return False
    return True


def _open_readonly(path: Path) -> sqlite3.Connection:
    uri = "file:" + urllib.parse.quote(str(path)) + "?mode=ro"
    conn = _open(uri, uri=True)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.Error as e:
        conn.close()
        real = os.path.realpath(path)
        if not isinstance(e, sqlite3.OperationalError) or any(
            os.path.lexists(real + s) for s in ("-wal", "-shm")
        ):
            raise DatabaseError(_sqlite_reason(path, e, True)) from None
    # A WAL database in a folder we cannot write: SQLite cannot create its -shm to read.
    # No -wal and no -shm means no writer has it open, so the file as it stands is all.
    return _open(uri + "&immutable=1", uri=True)


def _ours(conn: sqlite3.Connection, path: Path) -> str:
    """'ours-marked', 'ours' (made before the mark), or 'fresh' (no tables): else refused."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if app_id == APPLICATION_ID:
        return "ours-marked"
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    if app_id == 0 and not names:
        return "fresh"
    if (
        app_id == 0
        and _LEGACY_TABLES <= names
        and conn.execute("SELECT 1 FROM meta WHERE key = 'schema_version'").fetchone()
    ):
        return "ours"
    raise DatabaseError(
        f"{path} is not a moondream-watcher database (another program's "
        "SQLite file); refusing to change it. Give another file with --db or "
        "`database:`"
    )


def _version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise DatabaseError(_newer(version))
    return version


def _newer(version: int) -> str:
    return (
        f"database schema {version} is newer than this watcher ({SCHEMA_VERSION}); "
        "upgrade moondream-watcher, or give another file with --db"
    )


def _upgrade_for_reading(path: Path, version: int) -> sqlite_utils.Database:
    """An older schema: readers expect the current one, so migrate first if we can write."""
    try:
        connect(path).conn.close()
    except DatabaseError as e:
        raise DatabaseError(
            f"database schema {version} is older than this watcher "
            f"({SCHEMA_VERSION}) and cannot be upgraded here: {e}"
        ) from None
    return connect(path, readonly=True)


def _sqlite_reason(path: Path, e: sqlite3.Error, readonly: bool) -> str:
    name = getattr(e, "sqlite_errorname", "")
    text = str(e)
    if name == "SQLITE_NOTADB" or "file is not a database" in text:
        return (
            f"{path} is not a SQLite database (it holds something else); refusing to "
            "touch it. Give another file with --db or `database:`"
        )
    if name.startswith("SQLITE_CORRUPT") or "malformed" in text:
        return f"the database {path} is damaged ({text})"
    if readonly:
        return f"cannot read the database {path}: {text}"
    if (
        name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM"))
        or "readonly" in text
        or "unable to open" in text
    ):
        return (
            f"cannot write to the database {path} ({text}): this command needs write "
            f"access to the file and its folder {path.parent}; `watcher status` and "
            "`watcher search` still work read-only"
        )
    return f"database {path}: {text}"


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
            raise DatabaseError(_newer(version))
        if version < 1:
            _create_v1(db)
        if version < 2:
            # The index holds what the sidecar holds (`caption`, searchable), and the model's
            # own caption beside it. Until now they were the same.
            db.conn.execute("ALTER TABLE images ADD COLUMN model_caption TEXT")
            db.conn.execute("UPDATE images SET model_caption = caption")
        if version < 3:
            # The web library lists images newest first (file mtime, then rowid) a page at a
            # time from a cursor: these make page 500 a range scan, like page 1, with or
            # without a folder filter.
            for sql in (
                "CREATE INDEX IF NOT EXISTS images_mtime ON images (mtime_ns)",
                "CREATE INDEX IF NOT EXISTS images_root_mtime ON images (root, mtime_ns)",
                "CREATE INDEX IF NOT EXISTS images_state_mtime ON images (sidecar_state, mtime_ns)",
            ):
                db.conn.execute(sql)
        if version < 4:
            # One row per image and output other than the `.txt` sidecar (whose row is the
            # images table's sidecar columns): its target file, the hash of what we wrote,
            # its state and why. Keyed by the image row's rowid, which an upsert or a move
            # keeps; the trigger drops an image's outputs with its row.
            db.conn.execute(
                """CREATE TABLE IF NOT EXISTS image_outputs (
                    image INTEGER NOT NULL, output TEXT NOT NULL, target TEXT,
                    sha256 TEXT, state TEXT NOT NULL, error TEXT, updated REAL NOT NULL,
                    PRIMARY KEY (image, output))"""
            )
            db.conn.execute(
                "CREATE INDEX IF NOT EXISTS image_outputs_state ON image_outputs (state)"
            )
            db.conn.execute(
                """CREATE TRIGGER IF NOT EXISTS images_outputs_ad AFTER DELETE ON images
                   BEGIN DELETE FROM image_outputs WHERE image = old.rowid; END"""
            )
        if version < 5:
            # Caption vectors for semantic search (watcher.search): `image_vectors` holds each
            # image's vector (int8, keyed by images.rowid), `image_vec` (sqlite-vec) its sign
            # bits for the nearest-neighbour scan; meta names the model that made them.
            _create_v5(db)
        if version < 6:
            # A log of the images whose vector was added, replaced or removed, fed by
            # triggers: a searching process holds every vector's sign bits in memory
            # (watcher.bitmatrix) and catches up on this before each search.
            _create_v6(db)
        # A database migrated where sqlite-vec could not be loaded gets its vector table at
        # the first start that can (a no-op when it is there, or still cannot be).
        _create_vec_table(db, DEFAULT_DIM)
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
    db.table("images").enable_fts(
        ["caption", "outputs"], create_triggers=True, tokenize="porter", replace=True
    )


# The vector tables (schema step 5). A row's vector goes when the row goes, or when its
# caption changes (the writer or the backfill embeds the new text): by triggers, so every
# way a row is deleted (events, prune, scans) is covered.
DEFAULT_DIM = 384


def _create_v5(db: sqlite_utils.Database) -> None:
    db.conn.execute(
        """CREATE TABLE IF NOT EXISTS image_vectors (
            image_id INTEGER PRIMARY KEY, q BLOB NOT NULL)"""
    )
    _create_vec_table(db, DEFAULT_DIM)


def _create_vec_table(db: sqlite_utils.Database, dim: int) -> None:
    """The sqlite-vec table and the triggers that keep both vector tables in step. Without
    sqlite-vec here, none (a later start with it creates them; the backfill fills them)."""
    if not vec_loaded(db.conn):
        return
    db.conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS image_vec USING vec0(bits bit[{dim}])")
    for name, when in (
        ("images_vec_delete", "AFTER DELETE ON images"),
        (
            "images_vec_caption",
            "AFTER UPDATE OF caption ON images WHEN old.caption IS NOT new.caption",
        ),
    ):
        db.conn.execute(
            f"""CREATE TRIGGER IF NOT EXISTS {name} {when} BEGIN
                DELETE FROM image_vectors WHERE image_id = old.rowid;
                DELETE FROM image_vec WHERE rowid = old.rowid;
            END"""
        )


# The change log keeps at least this many of the newest changes; a reader further behind
# than what was pruned loads every vector again (about a second at a million rows).
CHANGES_KEPT = 100_000


def _create_v6(db: sqlite_utils.Database) -> None:
    # AUTOINCREMENT: a seq is never reused, even after the log is emptied, so a reader's
    # position stays meaningful.
    db.conn.execute(
        """CREATE TABLE IF NOT EXISTS vector_changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, image_id INTEGER NOT NULL)"""
    )
    for name, when, which in (
        ("image_vectors_logged_insert", "AFTER INSERT", "new"),
        ("image_vectors_logged_update", "AFTER UPDATE", "new"),
        ("image_vectors_logged_delete", "AFTER DELETE", "old"),
    ):
        db.conn.execute(
            f"""CREATE TRIGGER IF NOT EXISTS {name} {when} ON image_vectors BEGIN
                INSERT INTO vector_changes (image_id) VALUES ({which}.image_id);
            END"""
        )


def _prune_changes(db: sqlite_utils.Database, keep: int | None = None) -> None:
    """Drop all but the newest `keep` log rows (in the caller's transaction), and record
    the highest seq dropped: a reader behind it must reload."""
    keep = CHANGES_KEPT if keep is None else keep
    low, high = db.conn.execute("SELECT min(seq), max(seq) FROM vector_changes").fetchone()
    # Pruned in steps of `keep`: not a delete of a few rows at every write.
    if high is None or high - low < 2 * keep:
        return
    upto = high - keep
    db.conn.execute("DELETE FROM vector_changes WHERE seq <= ?", (upto,))
    db.conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('vector_changes_pruned', ?)",
        (str(upto),),
    )


class Index:
    """Reads and writes of image rows. Writes expect the caller's transaction."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    def get(self, path: str) -> ImageRow | None:
        return self._one("SELECT * FROM images WHERE path = ?", (encode(path),))

    def count_under(self, root: str | Path) -> int:
        """How many images are indexed under the folder `root` (at any depth)."""
        return self.db.conn.execute(
            "SELECT count(*) FROM images WHERE path >= ? AND path < ?", prefix_range(root)
        ).fetchone()[0]

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
            "SELECT path FROM images WHERE sidecar = ? LIMIT 1", (encode(sidecar),)
        ).fetchone()
        return decode(row[0]) if row else None

    def upsert(self, row: ImageRow) -> None:
        # One prepared statement: sqlite-utils' upsert re-reads the table schema on every
        # call, which the benchmark showed as most of the writer's CPU per image.
        self.db.conn.execute(_UPSERT, row.to_row())

    def delete(self, path: str) -> None:
        self.db.conn.execute("DELETE FROM images WHERE path = ?", (encode(path),))

    def move(self, src: str, dest: str, sidecar: str | None) -> None:
        self.db.conn.execute(
            "UPDATE images SET path = ?, sidecar = ?, updated = ? WHERE path = ?",
            (encode(dest), None if sidecar is None else encode(sidecar), time.time(), encode(src)),
        )

    # -- outputs other than txt (image_outputs, schema 4) ----------------------------------

    def output(self, image: str | Path, output: str) -> Record | None:
        """The record of `output` for `image`; None if it never ran."""
        row = self.db.conn.execute(
            """SELECT o.target, o.sha256, o.state, o.error FROM image_outputs o
               JOIN images i ON i.rowid = o.image WHERE i.path = ? AND o.output = ?""",
            (encode(image), output),
        ).fetchone()
        if row is None:
            return None
        target = decode(row[0]) if row[0] is not None else None
        return Record(output, target, row[1], row[2], row[3])

    def outputs(self, image: str | Path) -> list[Record]:
        """Every output's record for `image`: txt (the images row's sidecar columns) first."""
        row = self.get(str(image))
        if row is None:
            return []
        out = [Record("txt", row.sidecar, row.sidecar_sha256, row.sidecar_state, row.sidecar_error)]
        cur = self.db.conn.execute(
            """SELECT o.output, o.target, o.sha256, o.state, o.error FROM image_outputs o
               JOIN images i ON i.rowid = o.image WHERE i.path = ? ORDER BY o.output""",
            (encode(image),),
        )
        for name, target, sha, state, error in cur:
            out.append(Record(name, decode(target) if target else None, sha, state, error))
        return out

    def set_outputs(self, image: str | Path, records: list[Record]) -> None:
        """Store the records of `image`'s outputs (its row must exist; caller's transaction)."""
        if not records:
            return
        found = self.db.conn.execute(
            "SELECT rowid FROM images WHERE path = ?", (encode(image),)
        ).fetchone()
        if found is None:
            return
        now = time.time()
        self.db.conn.executemany(
            """INSERT INTO image_outputs (image, output, target, sha256, state, error, updated)
               VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(image, output) DO UPDATE SET
               target = excluded.target, sha256 = excluded.sha256, state = excluded.state,
               error = excluded.error, updated = excluded.updated""",
            [
                (
                    found[0],
                    r.output,
                    encode(r.target) if r.target is not None else None,
                    r.sha256,
                    r.state,
                    r.error,
                    now,
                )
                for r in records
            ],
        )

    def is_own_write(self, path: str | Path, size: int, mtime_ns: int) -> bool:
        """Whether the image at `path` is exactly as our embed output left it: the row
        recorded the file's identity after that write. Its file events are our own."""
        return (
            self.db.conn.execute(
                """SELECT 1 FROM images i JOIN image_outputs o
                   ON o.image = i.rowid AND o.output = 'embed' AND o.sha256 = i.sha256
                   WHERE i.path = ? AND i.size = ? AND i.mtime_ns = ?""",
                (encode(path), size, mtime_ns),
            ).fetchone()
            is not None
        )

    def pending_outputs(self) -> list[tuple[str, Record]]:
        """(image path, record) of every output other than txt still to be written."""
        cur = self.db.conn.execute(
            """SELECT i.path, o.output, o.target, o.sha256, o.state, o.error
               FROM image_outputs o JOIN images i ON i.rowid = o.image
               WHERE o.state = 'pending'"""
        )
        return [
            (decode(p), Record(n, decode(t) if t else None, sha, st, err))
            for p, n, t, sha, st, err in cur
        ]

    def stats_under(self, root: str) -> dict[str, tuple[int, int]]:
        """path -> (size, mtime_ns) for every indexed image under `root`: one query for a scan."""
        cur = self.db.conn.execute(
            "SELECT path, size, mtime_ns FROM images WHERE path >= ? AND path < ?",
            prefix_range(root),
        )
        return {decode(p): (s, m) for p, s, m in cur}

    def count(self) -> int:
        return self.db.conn.execute("SELECT count(*) FROM images").fetchone()[0]

    def search(
        self, query: str, limit: int = 20, *, folder: str | None = None, task: str | None = None
    ) -> list[tuple[ImageRow, float]]:
        """Full-text search, best match first (bm25, lower is better), optionally only under
        `folder` or for `task`. Semantic and hybrid search: watcher.search.search."""
        from watcher.search import Filters, text_hits

        return text_hits(self, query, limit, Filters(folder, task))

    # -- caption vectors (semantic search: watcher.search, watcher.embedding) ------------
    def vectors_usable(self) -> bool:
        """Whether this connection can read and write the vector index (sqlite-vec)."""
        return vec_loaded(self.db.conn) and self._has_table("image_vec")

    def _has_table(self, name: str) -> bool:
        return (
            self.db.conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone()
            is not None
        )

    def vector_model(self) -> str | None:
        """The model tag of the vectors in the index (None: none made yet)."""
        row = self.db.conn.execute(
            "SELECT value FROM meta WHERE key = 'embedding_model'"
        ).fetchone()
        return row[0] if row else None

    def use_vector_model(self, tag: str, dim: int) -> bool:
        """Make `tag` the model of the index's vectors (in the caller's transaction). Another
        model's vectors are dropped (they live in another space): True when that happened,
        and every caption is then embedded again by the backfill."""
        if not self._has_table("image_vec"):
            _create_v5(self.db)
        current = self.vector_model()
        if current == tag and self.vector_dim() == dim:
            return False
        self.db.conn.execute("DELETE FROM image_vectors")
        # Every reader reloads for the new model: the log of this delete is of no use.
        _prune_changes(self.db, keep=0)
        self.db.conn.execute("DROP TABLE IF EXISTS image_vec")
        _create_vec_table(self.db, dim)
        self.db.conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('embedding_model', ?)", (tag,)
        )
        return current is not None

    def vector_dim(self) -> int | None:
        """The length of the index's vectors (None: no vector table)."""
        row = self.db.conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'image_vec'"
        ).fetchone()
        if not row:
            return None
        text = row[0]
        return int(text[text.index("bit[") + 4 : text.index("]", text.index("bit["))])

    def rowid_of(self, path: str) -> int | None:
        row = self.db.conn.execute(
            "SELECT rowid FROM images WHERE path = ?", (encode(path),)
        ).fetchone()
        return row[0] if row else None

    def put_vectors(self, items: list[tuple[int, np.ndarray]]) -> None:
        """Store (image rowid, unit float32 vector) pairs, replacing what was there. In the
        caller's transaction, with the rows they describe."""
        import numpy as np

        if not items:
            return
        vecs = np.stack([np.asarray(v, dtype=np.float32) for _, v in items])
        q, bits = quantize(vecs)
        ids = [int(i) for i, _ in items]
        self.db.conn.executemany(
            "INSERT OR REPLACE INTO image_vectors (image_id, q) VALUES (?, ?)",
            [(i, q[n].tobytes()) for n, i in enumerate(ids)],
        )
        self.db.conn.executemany("DELETE FROM image_vec WHERE rowid = ?", [(i,) for i in ids])
        self.db.conn.executemany(
            "INSERT INTO image_vec (rowid, bits) VALUES (?, vec_bit(?))",
            [(i, bits[n].tobytes()) for n, i in enumerate(ids)],
        )
        _prune_changes(self.db)

    def put_caption_vectors(self, batch: VectorBatch, rows: list[ImageRow]) -> None:
        """The writer's hook: vectors of the captions just written (in its transaction)."""
        if not rows or not self.vectors_usable():
            return
        self.use_vector_model(batch.model, int(batch.vectors.shape[1]))
        by_text = batch.by_text()
        items = []
        for row in rows:
            rowid = self.rowid_of(row.path)
            if rowid is not None and row.caption in by_text:
                items.append((rowid, by_text[row.caption]))
        self.put_vectors(items)

    def missing_vectors(self, after: int, limit: int) -> list[tuple[int, str]]:
        """(rowid, caption) of images without a vector, rowid > `after`, in rowid order."""
        return self._without_vector(
            "images.rowid > ? ORDER BY images.rowid LIMIT ?", [after, limit]
        )

    def missing_vectors_at(self, paths: Sequence[str]) -> list[tuple[int, str]]:
        """(rowid, caption) of the images at `paths` (at most a few hundred) that have no
        vector, in rowid order."""
        if not paths:
            return []
        marks = ",".join("?" * len(paths))
        return self._without_vector(
            f"images.path IN ({marks}) ORDER BY images.rowid", [encode(p) for p in paths]
        )

    def _without_vector(self, where: str, params: list) -> list[tuple[int, str]]:
        return self.db.conn.execute(
            "SELECT images.rowid, images.caption FROM images "
            "LEFT JOIN image_vectors v ON v.image_id = images.rowid "
            f"WHERE v.image_id IS NULL AND {where}",
            params,
        ).fetchall()

    def caption_of(self, rowid: int) -> str | None:
        row = self.db.conn.execute(
            "SELECT caption FROM images WHERE rowid = ?", (rowid,)
        ).fetchone()
        return row[0] if row else None

    def vector_count(self) -> int:
        if not self._has_table("image_vectors"):
            return 0
        return self.db.conn.execute("SELECT count(*) FROM image_vectors").fetchone()[0]

    def vectors_of(self, rowids: list[int]) -> dict[int, np.ndarray]:
        """rowid -> its stored vector (int8 as float32, unit length)."""
        import numpy as np

        found: list[tuple[int, bytes]] = []
        for start in range(0, len(rowids), 500):
            part = rowids[start : start + 500]
            found += self.db.conn.execute(
                f"SELECT image_id, q FROM image_vectors WHERE image_id IN "
                f"({','.join('?' * len(part))})",
                part,
            ).fetchall()
        if not found:
            return {}
        # One array for them all: per-row numpy calls cost more than the read (200 rows).
        v = np.frombuffer(b"".join(q for _, q in found), dtype=np.int8).reshape(len(found), -1)
        m = v.astype(np.float32)
        m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-9)
        return {i: m[n] for n, (i, _) in enumerate(found)}

    # -- the web library: images by a stable id (the rowid), newest first, a page at a time --

    def by_id(self, image_id: int) -> ImageRow | None:
        """The row whose rowid is `image_id` (the id the web pages address images by)."""
        return self._one("SELECT * FROM images WHERE rowid = ?", (image_id,))

    def id_of(self, path: str) -> int | None:
        row = self.db.conn.execute(
            "SELECT rowid FROM images WHERE path = ?", (encode(path),)
        ).fetchone()
        return row[0] if row else None

    def newest(
        self,
        limit: int,
        *,
        after: tuple[int, int] | None = None,
        root: str | None = None,
        sidecar_state: str | None = None,
    ) -> list[tuple[int, ImageRow]]:
        """(id, row) newest first (file mtime, then id), `limit` of them, from just after the
        key `after` (mtime_ns, id) of the last row of the previous page: keyset pagination,
        so a deep page costs what the first does. Optionally only under the watched folder
        `root` (exactly the row's root) or with this sidecar_state."""
        where: list[str] = []
        args: list[str | int] = []
        if root is not None:
            where.append("root = ?")
            args.append(encode(root))
        if sidecar_state is not None:
            where.append("sidecar_state = ?")
            args.append(sidecar_state)
        if after is not None:
            where.append("(mtime_ns, rowid) < (?, ?)")
            args += [after[0], after[1]]
        sql = "SELECT rowid AS _id, * FROM images"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY mtime_ns DESC, rowid DESC LIMIT ?"
        cur = self.db.conn.execute(sql, (*args, limit))
        names = [c[0] for c in cur.description]
        out = []
        for values in cur:
            row = dict(zip(names, values, strict=True))
            out.append((row.pop("_id"), ImageRow.from_row(row)))
        return out

    def ids_of(self, paths: list[str]) -> dict[str, int]:
        """path -> id for those of `paths` that are indexed (one query per 500)."""
        out: dict[str, int] = {}
        for i in range(0, len(paths), 500):
            chunk = [encode(p) for p in paths[i : i + 500]]
            cur = self.db.conn.execute(
                f"SELECT path, rowid FROM images WHERE path IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            out.update({decode(p): r for p, r in cur})
        return out


def quantize(vectors: object) -> tuple:
    """Unit float vectors -> (int8 codes scaled per vector, packed sign bits)."""
    import numpy as np

    v = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    scale = 127.0 / np.maximum(np.abs(v).max(axis=1, keepdims=True), 1e-9)
    q = np.clip(np.rint(v * scale), -127, 127).astype(np.int8)
    bits = np.packbits(v > 0, axis=1, bitorder="little")
    return q, bits


_COLUMNS = [f.name for f in dataclasses.fields(ImageRow)]
# INSERT or UPDATE in one statement; the FTS triggers fire for either.
_UPSERT = (
    f"INSERT INTO images ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in _COLUMNS)}) ON CONFLICT(path) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c != "path")
)


def prefix_range(root: str | Path) -> tuple[str, str]:
    """Bounds selecting every stored path under `root` through the primary-key index: '0' is
    the character right after '/', so [root/, root0) is exactly the subtree. (The stored form
    of a path under root starts with the stored form of root: watcher.paths.)"""
    prefix = encode(root).rstrip("/") + "/"
    return prefix, prefix[:-1] + "0"


def open_index(path: Path | str, *, readonly: bool = True) -> Index:
    """The index at `path`, to search (`.search(text)`: rows and bm25 scores, best first)
    and read (`.get(image_path)`). Read-only by default, as `watcher search` opens it:
    nothing is created or changed, and NoDatabase is raised when there is nothing to read
    yet; DatabaseError when the file is not a watcher database."""
    return Index(connect(Path(path).expanduser(), readonly=readonly))
