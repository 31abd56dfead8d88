"""Editing a caption from the library API: the sidecar, the index and ownership follow."""

from __future__ import annotations

from pathlib import Path

import pytest
from web_library import library

from watcher.editing import EditConflict, EditError, apply_caption, edit_caption, sidecar_hash
from watcher.index import Index, connect
from watcher.outputs.sidecar import decide_hash, text_hash
from watcher.tasks import Task


def test_edit_makes_the_sidecar_the_users_and_a_recaption_keeps_it(tmp_path: Path) -> None:
    lib = library(tmp_path)
    img = lib.add("a.jpg", "model words")
    sidecar = img.with_suffix(".txt")
    db = connect(lib.db)
    row = lib.row("a.jpg")
    assert sidecar_hash(lib.config, row) == text_hash("model words\n")
    done = edit_caption(lib.config, db, str(img), "my words", expected_sha256=row.sidecar_sha256)
    assert sidecar.read_text() == "my words\n"
    assert done.sidecar_sha256 == text_hash("my words\n") and done.sidecar_state == "kept"
    row = lib.row("a.jpg")
    assert (row.caption, row.sidecar_sha256, row.sidecar_error) == (
        "my words",
        None,
        "edited by you; not overwritten",
    )
    assert [r.path for r, _ in Index(db).search("my words")] == [str(img)]
    # What the daemon's writer decides for this file under the default policy: keep it.
    assert decide_hash("ours", text_hash("my words\n"), row.sidecar_sha256, "new\n") == "keep"
    after = apply_caption(
        lib.config,
        db,
        str(img),
        Task("long"),
        "The image shows more words",
        model="m",
        revision=None,
    )
    assert sidecar.read_text() == "my words\n"
    assert after.sidecar_state == "kept" and after.caption == "my words"
    row = lib.row("a.jpg")
    assert row.model_caption == "More words" and row.outputs["long"] == "More words"
    assert row.caption == "my words"


def test_edit_refuses_when_the_file_changed_since_it_was_loaded(tmp_path: Path) -> None:
    lib = library(tmp_path)
    img = lib.add("a.jpg", "model words")
    loaded = lib.row("a.jpg").sidecar_sha256
    img.with_suffix(".txt").write_text("someone else's words\n")
    db = connect(lib.db)
    with pytest.raises(EditConflict, match="changed on disk since the page was loaded") as e:
        edit_caption(lib.config, db, str(img), "mine", expected_sha256=loaded)
    assert e.value.text == "someone else's words\n"
    assert img.with_suffix(".txt").read_text() == "someone else's words\n"
    img.with_suffix(".txt").unlink()
    with pytest.raises(EditConflict):  # deleted since: not silently re-created either
        edit_caption(lib.config, db, str(img), "mine", expected_sha256=loaded)
    edit_caption(lib.config, db, str(img), "mine", expected_sha256=None)
    assert img.with_suffix(".txt").read_text() == "mine\n"


def test_edit_refuses_what_it_must_not_write(tmp_path: Path) -> None:
    lib = library(tmp_path)
    img = lib.add("a.jpg", "words")
    db = connect(lib.db)
    sha = lib.row("a.jpg").sidecar_sha256
    with pytest.raises(EditError, match="empty"):
        edit_caption(lib.config, db, str(img), " \n ", expected_sha256=sha)
    with pytest.raises(EditError, match="not in the index"):
        edit_caption(lib.config, db, str(tmp_path / "x.jpg"), "w", expected_sha256=None)
    # The sidecar swapped for a link to a file elsewhere: not written through.
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me\n")
    img.with_suffix(".txt").unlink()
    img.with_suffix(".txt").symlink_to(outside)
    with pytest.raises(EditError, match="not a regular file"):
        edit_caption(lib.config, db, str(img), "w", expected_sha256=sha)
    assert outside.read_text() == "keep me\n"


def test_recaption_replaces_our_own_sidecar(tmp_path: Path) -> None:
    lib = library(tmp_path, prefix="tok")
    img = lib.add("a.jpg", "words")
    db = connect(lib.db)
    done = apply_caption(
        lib.config, db, str(img), Task("prompt"), "red, blue", model="m", revision="r"
    )
    assert img.with_suffix(".txt").read_text() == "tok, red, blue\n"
    assert done.sidecar_state == "written"
    row = lib.row("a.jpg")
    assert row.sidecar_sha256 == text_hash("tok, red, blue\n") and row.task == "prompt"
    with pytest.raises(EditError, match="no text"):
        apply_caption(lib.config, db, str(img), Task("short"), "  ", model="m", revision=None)
