"""Outputs through ExifTool: numeric captions read back exactly; XMP sidecars follow a move."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import require
from images import distinct_image
from test_outputs_embed import embed, photo_with_metadata
from test_outputs_xmp import write

from watcher.messages import SidecarState


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
