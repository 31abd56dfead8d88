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
from watcher.outputs.sidecar import (
    FolderMoved,
    SidecarRefused,
    check_name,
    choose_name,
    decide_hash,
    hash_at,
    kept_reason,
    open_folder,
    read_text_at,
    text_hash,
    write_atomic,
)
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
        text = row.ours + "\n"
        shown_caption, error = row.ours, None
        sha: str | None
        try:
            # A row refused for its name (an image's) gets the name the config gives now.
            sidecar = (
                Path(row.sidecar)
                if row.sidecar
                else choose_name(
                    Path(path), folder.sidecar, folder.extensions, index.sidecar_owner
                ).path
            )
            check_name(sidecar.name, folder.extensions)
            dir_fd = open_folder(Path(row.root), sidecar.parent)
            try:
                on_disk = hash_at(dir_fd, sidecar.name)
                decision = decide_hash(folder.overwrite, on_disk, row.sidecar_sha256, text)
                if decision == "write":
                    sha, state = (
                        write_atomic(sidecar, text, dir_fd=dir_fd, extensions=folder.extensions),
                        SidecarState.WRITTEN,
                    )
                elif decision == "same":
                    sha, state = text_hash(text), SidecarState.WRITTEN
                else:
                    sha, state = row.sidecar_sha256, SidecarState.KEPT
                    error = kept_reason(folder.overwrite, on_disk, row.sidecar_sha256)
                    theirs = read_text_at(dir_fd, sidecar.name)
                    if theirs is not None:
                        shown_caption = theirs.strip()
            finally:
                os.close(dir_fd)
        except (OSError, FolderMoved, SidecarRefused) as e:
            reason = (
                error_reason("cannot write sidecar", e)
                if isinstance(e, OSError)
                else f"cannot write sidecar: {e.reason}"
            )
            still.append((path, reason))
            with transaction(db):
                db.conn.execute(
                    "UPDATE images SET sidecar_error = ? WHERE path = ?", (reason, encode(path))
                )
            continue
        with transaction(db):
            db.conn.execute(
                """UPDATE images SET sidecar = ?, sidecar_sha256 = ?, sidecar_state = ?,
                   sidecar_error = ?, caption = ?, updated = ? WHERE path = ?""",
                (encode(sidecar), sha, state, error, shown_caption, time.time(), encode(path)),
            )
        written += state == SidecarState.WRITTEN
    return written, still
