"""Outputs through ExifTool: numeric captions read back exactly; XMP sidecars follow a move."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from conftest import require
from daemon_harness import Daemon, wait_for, write_config
from images import distinct_image
from test_outputs_embed import embed, photo_with_metadata
from test_outputs_xmp import write

from watcher.messages import SidecarState
from watcher.paths import decode


@pytest.fixture
def exiftool() -> None:
    require("exiftool", shutil.which("exiftool") is not None, "apt install libimage-exiftool-perl")


def _raw(path: Path, tag: str) -> str:
    """The tag's value as ExifTool prints it (-s3: the value alone, no JSON number guess)."""
    out = subprocess.run(
        ["exiftool", "-s3", f"-{tag}", str(path)], check=True, capture_output=True, text=True
    )
    return out.stdout.rstrip("\n")


def _state(path: Path) -> tuple[str, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns


@pytest.mark.parametrize("caption", ["1.50", "42", "1e3", "0.10"])
def test_a_numeric_caption_in_xmp_is_ours_and_left_as_it_is(tmp_path, exiftool, caption):
    image = distinct_image(41, tmp_path / "photo.jpg")
    xmp = tmp_path / "photo.jpg.xmp"
    first = write(image, caption)
    assert first.state == SidecarState.WRITTEN
    assert _raw(xmp, "XMP-dc:Description") == caption
    before = _state(xmp)

    again = write(image, caption, previous=first)

    # Recognised as the text we wrote: nothing to merge, the file is not rewritten.
    assert (again.state, again.error) == (SidecarState.WRITTEN, None)
    assert again.sha256 == first.sha256
    assert _state(xmp) == before


def test_a_numeric_caption_edited_to_another_number_is_kept(tmp_path, exiftool):
    image = distinct_image(42, tmp_path / "photo.jpg")
    xmp = tmp_path / "photo.jpg.xmp"
    first = write(image, "1.50")
    subprocess.run(
        ["exiftool", "-q", "-overwrite_original", "-XMP-dc:Description=1.5", str(xmp)], check=True
    )

    rec = write(image, "2.50", previous=first)

    # "1.5" is not the "1.50" we wrote: the user's, left alone.
    assert rec.state == SidecarState.KEPT and "description" in (rec.error or "")
    assert _raw(xmp, "XMP-dc:Description") == "1.5"


def test_a_numeric_caption_embedded_is_not_embedded_again(tmp_path, exiftool):
    image = photo_with_metadata(tmp_path / "photo.jpg")
    first = embed(image, "1.50")
    assert first.state == SidecarState.WRITTEN
    assert _raw(image, "IFD0:ImageDescription") == "1.50"
    assert _raw(image, "XMP-dc:Description") == "1.50"
    before = _state(image)

    again = embed(image, "1.50", previous=first)

    # The image is not rewritten for a caption it already holds.
    assert (again.state, again.sha256) == (SidecarState.WRITTEN, first.sha256)
    assert _state(image) == before


def _xmp_records(db: Path) -> dict[str, str | None]:
    """image -> the target its xmp record names, as the index holds it."""
    con = sqlite3.connect(db, timeout=30)
    try:
        return {
            decode(image): decode(target) if target is not None else None
            for image, target in con.execute(
                """SELECT i.path, o.target FROM image_outputs o JOIN images i
                   ON i.rowid = o.image WHERE o.output = 'xmp'"""
            )
        }
    finally:
        con.close()


@pytest.mark.slow
def test_the_xmp_sidecar_follows_its_image_only_where_it_is_safe(tmp_path, tiny_llava, exiftool):
    watched = tmp_path / "watched"
    (watched / "sub").mkdir(parents=True)
    outside = tmp_path / "outside.xmp"
    cfg = write_config(
        tmp_path,
        tiny_llava,
        [{"path": str(watched), "settle_seconds": 0.3, "outputs": ["txt", "xmp"]}],
    )
    names = ("a", "b", "c", "d")
    with Daemon(cfg, tmp_path) as d:
        for i, name in enumerate(names):
            distinct_image(50 + i, watched / f"{name}.jpg")
        wait_for(
            lambda: (
                all(d.captioned(watched / f"{n}.jpg") for n in names)
                and len(_xmp_records(d.db)) == len(names)
            ),
            60,
            "captions and XMP sidecars",
        )
        xmp = {n: (watched / f"{n}.jpg.xmp").read_bytes() for n in names}

        # Ours, unchanged: follows into another folder, under the image's new name.
        os.rename(watched / "a.jpg", watched / "sub" / "renamed.jpg")
        # A file already at the new name: never overwritten; ours stays where it was.
        (watched / "taken.jpg.xmp").write_text("someone else's\n")
        os.rename(watched / "b.jpg", watched / "taken.jpg")
        # Changed since we wrote it (a photo manager saved it): not ours to move.
        (watched / "c.jpg.xmp").write_bytes(xmp["c"] + b"\n")
        os.rename(watched / "c.jpg", watched / "c2.jpg")
        # Swapped for a link: never followed, nor moved.
        outside.write_bytes(xmp["d"])
        (watched / "d.jpg.xmp").unlink()
        (watched / "d.jpg.xmp").symlink_to(outside)
        os.rename(watched / "d.jpg", watched / "d2.jpg")
        moved = ("sub/renamed.jpg", "taken.jpg", "c2.jpg", "d2.jpg")
        wait_for(
            lambda: all(str(watched / m) in d.rows() for m in moved),
            30,
            "the rows to follow their images",
        )

        records = _xmp_records(d.db)
        assert (watched / "sub" / "renamed.jpg.xmp").read_bytes() == xmp["a"]
        assert not (watched / "a.jpg.xmp").exists()
        assert records[str(watched / "sub" / "renamed.jpg")] == str(
            watched / "sub" / "renamed.jpg.xmp"
        )
        assert (watched / "taken.jpg.xmp").read_text() == "someone else's\n"
        assert (watched / "b.jpg.xmp").read_bytes() == xmp["b"]
        assert records[str(watched / "taken.jpg")] == str(watched / "b.jpg.xmp")
        assert (watched / "c.jpg.xmp").exists() and not (watched / "c2.jpg.xmp").exists()
        assert (watched / "d.jpg.xmp").is_symlink() and not (watched / "d2.jpg.xmp").exists()
        assert outside.read_bytes() == xmp["d"]
        # The .txt sidecars followed as before.
        assert (watched / "sub" / "renamed.txt").exists() and (watched / "c2.txt").exists()
    assert d.proc.returncode == 0
