"""Changing one image's caption by hand, or with another task's text, as the writer would."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from watcher.config import Config, FolderConfig
from watcher.index import ImageRow, Index, transaction
from watcher.messages import SidecarState
from watcher.outputs.sidecar import (
    NOT_A_FILE,
    TOO_BIG,
    FolderMoved,
    SidecarRefused,
    check_name,
    choose_name,
    decide_hash,
    hash_at,
    kept_reason,
    open_folder,
    pattern_problem,
    read_text_at,
    text_hash,
    write_atomic,
)
from watcher.paths import encode, shown
from watcher.tasks import Task, clean_caption

# What the index says of a sidecar the user wrote through `edit_caption`: the same words
# the writer uses for an edited file it leaves alone (kept_reason).
EDITED = "edited by you; not overwritten"


class EditError(Exception):
    """The edit cannot be made; the message says why, for the user."""


class EditConflict(EditError):
    """The sidecar on disk is not the one the edit was based on: nothing was written."""

    def __init__(self, message: str, on_disk: str | None, text: str | None) -> None:
        super().__init__(message)
        self.on_disk = on_disk  # its hash now (None: no file)
        self.text = text  # what it holds now, if readable


@dataclass(frozen=True)
class Edited:
    """What an edit or a re-caption left: the sidecar and what the index now holds."""

    path: str
    sidecar: str | None
    sidecar_sha256: str | None  # hash of the file on disk now
    sidecar_state: str  # kept (the user's) | written (ours) | pending
    caption: str


def sidecar_hash(config: Config, row: ImageRow) -> str | None:
    """The hash of the image's sidecar as it is on disk now (None: no file): what an edit
    form carries so that a change made meanwhile is noticed (edit_caption's precondition)."""
    folder = _folder(config, row)
    sidecar = _sidecar_path(folder, row, None)
    try:
        fd = open_folder(Path(row.root), sidecar.parent)
    except (OSError, FolderMoved):
        return None
    try:
        return hash_at(fd, sidecar.name)
    finally:
        os.close(fd)


def edit_caption(
    config: Config,
    db: sqlite_utils.Database,
    image: str,
    text: str,
    *,
    expected_sha256: str | None,
) -> Edited:
    """Write `text` as the sidecar of the indexed `image` (atomically, with the writer's
    code, through its folder opened without following links) and make the index hold it
    (its search follows). From then on the sidecar is the user's: the daemon leaves it
    alone under the `ours` and `never` policies, and only the model's text beside it
    changes. `expected_sha256` is the sidecar's hash when the text was loaded (None: there
    was no file): if it differs now, EditConflict and nothing is written."""
    text = text.strip()
    if not text:
        raise EditError("the caption is empty; write something (or delete the file by hand)")
    index = Index(db)
    row = index.get(image)
    if row is None:
        raise EditError(f"{shown(image)} is not in the index")
    folder = _folder(config, row)
    sidecar = _sidecar_path(folder, row, index)
    fd = _open_folder(row, sidecar)
    try:
        on_disk = hash_at(fd, sidecar.name)
        if on_disk in (NOT_A_FILE, TOO_BIG):
            raise EditError(f"{shown(sidecar)}: {kept_reason('ours', on_disk, None)}")
        if on_disk != expected_sha256:
            now = read_text_at(fd, sidecar.name) if on_disk is not None else None
            raise EditConflict(
                f"{shown(sidecar)} changed on disk since the page was loaded; "
                "nothing was written. Reload to see it and edit again",
                on_disk,
                now,
            )
        try:
            written = write_atomic(sidecar, text + "\n", dir_fd=fd, extensions=folder.extensions)
        except SidecarRefused as e:
            raise EditError(e.reason) from None
        except OSError as e:
            raise EditError(f"cannot write {shown(sidecar)}: {e.strerror}") from None
    finally:
        os.close(fd)
    with transaction(db):
        db.conn.execute(
            """UPDATE images SET caption = ?, sidecar = ?, sidecar_sha256 = NULL,
               sidecar_state = ?, sidecar_error = ?, updated = ? WHERE path = ?""",
            (
                text,
                encode(str(sidecar)),
                SidecarState.KEPT.value,
                EDITED,
                time.time(),
                encode(image),
            ),
        )
    return Edited(image, str(sidecar), written, SidecarState.KEPT.value, text)


def _open_folder(row: ImageRow, sidecar: Path) -> int:
    """The sidecar's folder, opened from the watched root without following links (as the
    writer does); why not, as an EditError the page shows."""
    try:
        return open_folder(Path(row.root), sidecar.parent)
    except FolderMoved as e:
        raise EditError(e.reason) from None
    except OSError as e:
        raise EditError(f"cannot open the folder of {shown(sidecar)}: {e.strerror}") from None


def apply_caption(
    config: Config,
    db: sqlite_utils.Database,
    image: str,
    task: Task,
    output: str,
    *,
    model: str,
    revision: str | None,
) -> Edited:
    """Make the model's `output` for `task` the image's caption, as the writer does after a
    re-caption: the sidecar is replaced only under the folder's overwrite policy (a file the
    user wrote or edited stays theirs, and the index keeps its words), and the model's text
    is recorded beside it (model_caption, outputs)."""
    index = Index(db)
    row = index.get(image)
    if row is None:
        raise EditError(f"{shown(image)} is not in the index")
    folder = _folder(config, row)
    cleaned = clean_caption(output)
    if not cleaned:
        raise EditError("the model returned no text; nothing changed")
    caption = clean_caption(output, folder.prefix, folder.suffix)
    sidecar = _sidecar_path(folder, row, index)
    shown_caption, ours, error = caption, row.sidecar_sha256, None
    fd = _open_folder(row, sidecar)
    try:
        on_disk = hash_at(fd, sidecar.name)
        decision = decide_hash(folder.overwrite, on_disk, ours, caption + "\n")
        if decision == "write":
            try:
                ours = write_atomic(
                    sidecar, caption + "\n", dir_fd=fd, extensions=folder.extensions
                )
            except SidecarRefused as e:
                raise EditError(e.reason) from None
            except OSError as e:
                raise EditError(f"cannot write {shown(sidecar)}: {e.strerror}") from None
            state = SidecarState.WRITTEN
        elif decision == "same":
            ours, state = text_hash(caption + "\n"), SidecarState.WRITTEN
        else:
            state, error = SidecarState.KEPT, kept_reason(folder.overwrite, on_disk, ours)
            theirs = read_text_at(fd, sidecar.name)
            shown_caption = theirs.strip() if theirs is not None else row.caption
    finally:
        os.close(fd)
    outputs = dict(row.outputs)
    outputs[task.key] = cleaned
    with transaction(db):
        db.conn.execute(
            """UPDATE images SET caption = ?, model_caption = ?, task = ?, outputs = ?,
               model = ?, revision = ?, sidecar = ?, sidecar_sha256 = ?, sidecar_state = ?,
               sidecar_error = ?, updated = ? WHERE path = ?""",
            (
                shown_caption,
                caption,
                task.key,
                _json(outputs),
                model,
                revision,
                encode(str(sidecar)),
                ours,
                state.value,
                error,
                time.time(),
                encode(image),
            ),
        )
    on_disk_now = ours if state == SidecarState.WRITTEN else on_disk
    return Edited(image, str(sidecar), on_disk_now, state.value, shown_caption)


def save_output(db: sqlite_utils.Database, image: str, key: str, text: str) -> None:
    """Keep `text` in the index under the output `key` (an answer to a question, say):
    searchable, and nothing written next to the image."""
    index = Index(db)
    row = index.get(image)
    if row is None:
        raise EditError(f"{shown(image)} is not in the index")
    text = text.strip()
    if not text:
        raise EditError("nothing to save: the text is empty")
    outputs = dict(row.outputs)
    outputs[key] = text
    with transaction(db):
        db.conn.execute(
            "UPDATE images SET outputs = ?, updated = ? WHERE path = ?",
            (_json(outputs), time.time(), encode(image)),
        )


def _folder(config: Config, row: ImageRow) -> FolderConfig:
    folder = config.folder_for(Path(row.path))
    if folder is None or str(folder.path) != row.root:
        raise EditError(f"{shown(row.path)} is not under a watched folder now")
    return folder


def _sidecar_path(folder: FolderConfig, row: ImageRow, index: Index | None) -> Path:
    """The sidecar the image owns, or the name the writer would give it now."""
    if row.sidecar is not None:
        sidecar = Path(row.sidecar)
    else:
        problem = pattern_problem(folder.sidecar, folder.extensions)
        if problem:
            raise EditError(f"sidecar pattern {folder.sidecar!r}: {problem}")
        owner = index.sidecar_owner if index is not None else (lambda _s: None)
        sidecar = choose_name(Path(row.path), folder.sidecar, folder.extensions, owner, None).path
    if sidecar.parent != Path(row.path).parent:
        raise EditError(f"sidecar {shown(sidecar)} is not beside its image")
    try:
        check_name(sidecar.name, folder.extensions)
    except SidecarRefused as e:
        raise EditError(e.reason) from None
    return sidecar


def _json(outputs: dict[str, str]) -> str:
    return json.dumps(outputs, ensure_ascii=False, sort_keys=True)
