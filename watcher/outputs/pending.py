"""Sidecars not written yet (state `pending`): the reason shown for them, and `watcher retry`."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import sqlite_utils

from watcher.config import Config
from watcher.index import Index, transaction
from watcher.messages import SidecarState
from watcher.outputs.base import Content, Place, Record, pending
from watcher.outputs.sidecar import FolderMoved, TxtOutput, open_folder
from watcher.paths import decode, encode


def error_reason(what: str, e: OSError) -> str:
    """`what` failed, as `watcher status` shows it: the error, its errno name, and under
    systemd what to do about a read-only folder."""
    name = errno.errorcode.get(e.errno or 0, "")
    detail = e.strerror or str(e)
    return f"{what}: {detail}" + (f" ({name})" if name else "") + _sandbox_hint(e)


def _sandbox_hint(e: OSError) -> str:
    """Under the systemd unit (ProtectSystem=strict), only the folders it was installed with
    are writable: one added later by `watcher reload` is a read-only file system to us."""
    if e.errno == errno.EROFS and os.environ.get("INVOCATION_ID"):  # set by systemd
        return (
            "; the service can write only the folders it was installed with: run "
            "`watcher service install --now` (it restarts the service), then "
            "`watcher retry --all`"
        )
    return ""


def write_pending_sidecars(
    db: sqlite_utils.Database, cfg: Config, paths: list[str] | None = None
) -> tuple[int, list[tuple[str, str]]]:
    """Write sidecars that could not be written before (read-only folder), from the index,
    without the model. Returns (written, [(path, reason still pending)])."""
    index = Index(db)
    sql = "SELECT path FROM images WHERE sidecar_state = ?"
    candidates = [decode(r[0]) for r in db.conn.execute(sql, (SidecarState.PENDING.value,))]
    if paths is not None:
        wanted = set(paths)
        candidates = [p for p in candidates if p in wanted]
    written, still = 0, []
    for path in candidates:
        row = index.get(path)
        if row is None:
            continue
        folder = cfg.folder_for(Path(path)) or cfg.with_folders([Path(row.root)]).folders[0]
        content = Content(row.ours, row.task, row.model, row.revision)
        previous = Record("txt", row.sidecar, row.sidecar_sha256, row.sidecar_state)
        # The folder the sidecar goes in: where the row names it, else beside the image.
        where = Path(row.sidecar).parent if row.sidecar else Path(path).parent
        try:
            dir_fd = open_folder(Path(row.root), where)
            try:
                place = Place(Path(path), Path(row.root), dir_fd, folder)
                result = TxtOutput(index.sidecar_owner).write(place, content, previous)
            finally:
                os.close(dir_fd)
        except (OSError, FolderMoved) as e:
            result = pending(
                "txt",
                row.sidecar,
                row.sidecar_sha256,
                error_reason("cannot write sidecar", e)
                if isinstance(e, OSError)
                else f"cannot write sidecar: {e.reason}",
            )
        rec = result.record
        if rec.state == SidecarState.PENDING:
            reason = rec.error or "cannot write sidecar"
            still.append((path, reason))
            with transaction(db):
                db.conn.execute(
                    "UPDATE images SET sidecar_error = ? WHERE path = ?", (reason, encode(path))
                )
            continue
        sidecar, sha, state, error = rec.target, rec.sha256, rec.state, rec.error
        shown_caption = result.theirs if result.theirs is not None else row.ours
        with transaction(db):
            db.conn.execute(
                """UPDATE images SET sidecar = ?, sidecar_sha256 = ?, sidecar_state = ?,
                   sidecar_error = ?, caption = ?, updated = ? WHERE path = ?""",
                (
                    encode(sidecar) if sidecar is not None else None,
                    sha,
                    state,
                    error,
                    shown_caption,
                    time.time(),
                    encode(path),
                ),
            )
        written += state == SidecarState.WRITTEN
    written += _write_pending_outputs(db, cfg, paths, still)
    return written, still


def _write_pending_outputs(
    db: sqlite_utils.Database,
    cfg: Config,
    paths: list[str] | None,
    still: list[tuple[str, str]],
) -> int:
    """The other outputs (xmp, embed) that could not be written, through the same Output
    code as the writer. Returns how many were written; the rest are added to `still`."""
    from watcher.outputs.base import output_for

    index = Index(db)
    wanted = set(paths) if paths is not None else None
    written = 0
    todo = index.pending_outputs()
    if paths is None:  # `watcher retry --all`: also outputs a folder lists but never got
        todo += _never_written(db, cfg)
    for path, previous in todo:
        if wanted is not None and path not in wanted:
            continue
        row = index.get(path)
        if row is None:
            continue
        folder = cfg.folder_for(Path(path)) or cfg.with_folders([Path(row.root)]).folders[0]
        from watcher.outputs.base import keywords_for

        content = Content(
            row.ours,
            row.task,
            row.model,
            row.revision,
            keywords_for(row.task, row.ours, folder.xmp_keywords),
        )
        try:
            dir_fd = open_folder(Path(row.root), Path(path).parent)
            try:
                place = Place(Path(path), Path(row.root), dir_fd, folder)
                result = output_for(previous.output).write(place, content, previous)
            finally:
                os.close(dir_fd)
        except (OSError, FolderMoved) as e:
            what = f"cannot write {previous.output}"
            result = pending(
                previous.output,
                previous.target,
                previous.sha256,
                error_reason(what, e) if isinstance(e, OSError) else f"{what}: {e.reason}",
            )
        rec = result.record
        with transaction(db):
            index.set_outputs(path, [rec])
            if result.image_identity is not None:
                sha, size, mtime_ns = result.image_identity
                db.conn.execute(
                    "UPDATE images SET sha256 = ?, size = ?, mtime_ns = ? WHERE path = ?",
                    (sha, size, mtime_ns, encode(path)),
                )
        if rec.state == SidecarState.PENDING:
            still.append((path, rec.error or f"cannot write {rec.output}"))
        else:
            written += 1
    return written


def _never_written(db: sqlite_utils.Database, cfg: Config) -> list[tuple[str, Record]]:
    """Indexed images whose folder lists an output (xmp, embed) they have no record of: an
    output added to the config after they were captioned. Written from the index."""
    from watcher.index import prefix_range

    found = []
    for folder in cfg.folders:
        for name in folder.outputs:
            if name == "txt":
                continue
            cur = db.conn.execute(
                """SELECT i.path FROM images i LEFT JOIN image_outputs o
                   ON o.image = i.rowid AND o.output = ?
                   WHERE o.image IS NULL AND i.path >= ? AND i.path < ?""",
                (name, *prefix_range(folder.path)),
            )
            for (stored,) in cur:
                path = decode(stored)
                if cfg.folder_for(Path(path)) == folder:  # not a deeper folder's image
                    found.append((path, Record(name, None, None, SidecarState.PENDING.value)))
    return found
