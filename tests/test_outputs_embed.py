"""The `embed` output: the description inside the image, every other metadata field kept."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require
from daemon_harness import Daemon, cli_config, run_cli, wait_for, write_config
from images import distinct_image, distinct_pil
from PIL import Image, ImageCms

from watcher.config import FolderConfig
from watcher.messages import SidecarState
from watcher.outputs.base import Content, Place, Record
from watcher.outputs.embed import EmbedOutput
from watcher.outputs.sidecar import is_temp, open_folder
from watcher.paths import encode


@pytest.fixture(autouse=True)
def _exiftool() -> None:
    require("exiftool", shutil.which("exiftool") is not None, "apt install libimage-exiftool-perl")


def exif_json(path: Path, *args: str) -> dict:
    """Every tag ExifTool (not our code) reads from `path`, duplicates included, by group."""
    out = subprocess.run(
        ["exiftool", "-j", "-a", "-G1", "-struct", *args, str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)[0]


def photo_with_metadata(path: Path) -> Path:
    """A JPEG as a camera and an editor leave it: EXIF (camera, date, exposure), GPS and
    an ICC profile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = distinct_pil(11, (160, 120))
    exif = Image.Exif()
    exif[0x010F] = "Fujifilm"  # Make
    exif[0x0110] = "X-T30"  # Model
    exif[0x0131] = "darktable 4.6"  # Software
    exif[0x0132] = "2024:06:01 10:00:00"  # DateTime
    sub = exif.get_ifd(0x8769)
    sub[0x9003] = "2024:06:01 10:00:00"  # DateTimeOriginal
    sub[0x829A] = (1, 250)  # ExposureTime
    sub[0x8827] = 400  # ISO
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (38.0, 42.0, 36.0)
    gps[3], gps[4] = "W", (9.0, 8.0, 24.0)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    im.save(path, "JPEG", exif=exif, icc_profile=icc, quality=90)
    return path


def embed(image: Path, caption: str, previous: Record | None = None, **folder) -> Record:
    cfg = FolderConfig(path=image.parent, outputs=("txt", "embed"), **folder)
    fd = open_folder(image.parent, image.parent)
    try:
        content = Content(caption, "short", "moondream", "2025-06-21")
        return EmbedOutput().write(Place(image, image.parent, fd, cfg), content, previous).record
    finally:
        os.close(fd)


# Tags that describe the file, not its metadata (they change with any rewrite).
FILE_FACTS = {"SourceFile", "System:FileSize", "System:FileModifyDate", "System:FileAccessDate"}
FILE_FACTS |= {"System:FileInodeChangeDate", "System:FilePermissions"}


def test_jpeg_keeps_exif_gps_and_icc_field_by_field(tmp_path):
    image = photo_with_metadata(tmp_path / "photo.jpg")
    before = exif_json(image)
    icc_before = subprocess.run(
        ["exiftool", "-b", "-ICC_Profile", str(image)], check=True, capture_output=True
    ).stdout
    pixels = Image.open(image).tobytes()
    assert before["IFD0:Make"] == "Fujifilm" and "GPS:GPSLatitude" in before
    assert any(k.startswith("ICC") for k in before)

    rec = embed(image, 'A yellow tram, "28", climbing a hill')

    after = exif_json(image)
    assert after["IFD0:ImageDescription"] == 'A yellow tram, "28", climbing a hill'
    assert after["XMP-dc:Description"] == 'A yellow tram, "28", climbing a hill'
    assert after["XMP-iptcCore:AltTextAccessibility"] == 'A yellow tram, "28", climbing a hill'
    changed = {k for k in before if k not in FILE_FACTS and after.get(k) != before[k]}
    assert changed == set(), {k: (before[k], after.get(k)) for k in changed}
    icc_after = subprocess.run(
        ["exiftool", "-b", "-ICC_Profile", str(image)], check=True, capture_output=True
    ).stdout
    assert icc_after == icc_before and len(icc_after) > 100
    assert Image.open(image).tobytes() == pixels  # the image data is not re-encoded
    data = image.read_bytes()
    assert rec.state == SidecarState.WRITTEN and rec.sha256 == hashlib.sha256(data).hexdigest()
    assert not [p for p in tmp_path.iterdir() if is_temp(p.name)]


@pytest.mark.parametrize("suffix", [".png", ".webp", ".tif"])
def test_other_formats_hold_the_description(tmp_path, suffix):
    image = distinct_image(12, tmp_path / f"photo{suffix}")

    rec = embed(image, "A dog on a sofa")

    assert rec.state == SidecarState.WRITTEN
    assert exif_json(image)["XMP-dc:Description"] == "A dog on a sofa"
    Image.open(image).load()  # still a valid image


def test_gif_is_skipped_with_a_reason(tmp_path):
    image = distinct_image(13, tmp_path / "anim.gif")
    data = image.read_bytes()

    rec = embed(image, "A cat")

    assert rec.state == "skipped" and "JPEG, PNG, WebP and TIFF" in (rec.error or "")
    assert image.read_bytes() == data


def test_description_edited_in_a_photo_manager_is_kept(tmp_path):
    image = photo_with_metadata(tmp_path / "photo.jpg")
    first = embed(image, "A tram")
    subprocess.run(
        [
            "exiftool",
            "-overwrite_original",
            "-XMP-dc:Description=Tram 28 to Graça",
            "-EXIF:ImageDescription=Tram 28 to Graça",
            str(image),
        ],
        check=True,
        capture_output=True,
    )

    again = embed(image, "A yellow tram", previous=first)

    got = exif_json(image)
    assert got["XMP-dc:Description"] == "Tram 28 to Graça"
    assert got["IFD0:ImageDescription"] == "Tram 28 to Graça"
    assert got["XMP-iptcCore:AltTextAccessibility"] == "A yellow tram"  # still ours
    assert again.state == SidecarState.KEPT


@pytest.mark.slow
def test_kill_9_during_embed_leaves_the_old_file_then_a_rerun_embeds(tmp_path, tiny_llava):
    pics = tmp_path / "pics"
    image = photo_with_metadata(pics / "photo.jpg")
    old = image.read_bytes()
    cfg = cli_config(
        tmp_path, tiny_llava, folders=[{"path": str(pics), "outputs": ["txt", "embed"]}]
    )
    gate = tmp_path / "gate"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WATCHER_FAULTS": json.dumps({"embed_rename": {"gate": str(gate)}}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "watcher", "--config", str(cfg), "caption", str(pics)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Stopped between the temp file's fsync and the rename: the worst moment.
        wait_for(lambda: gate.with_name("gate.reached").exists(), 120, "the embed's rename")
        temps = [p for p in pics.iterdir() if is_temp(p.name)]
        assert len(temps) == 1 and temps[0].stat().st_size > 0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    assert image.read_bytes() == old  # the old file, whole
    Image.open(image).load()

    code, out, _ = run_cli("--config", str(cfg), "caption", str(pics))

    assert code == 0, out
    caption = (pics / "photo.txt").read_text(encoding="utf-8").strip()
    assert exif_json(image)["XMP-dc:Description"] == " ".join(caption.split())
    Image.open(image).load()  # the new file, whole


@pytest.mark.slow
def test_daemon_does_not_caption_its_own_embed_again(tmp_path, tiny_llava):
    pics = tmp_path / "pics"
    pics.mkdir()
    cfg = write_config(
        tmp_path,
        tiny_llava,
        [{"path": str(pics), "outputs": ["txt", "embed"], "settle_seconds": 0.2}],
    )
    with Daemon(cfg, tmp_path) as d:
        d.wait_scanned()
        a = photo_with_metadata(pics / "a.jpg")
        wait_for(lambda: d.captioned(a), 120, "a.jpg captioned")
        embedded = a.read_bytes()
        # A second image, written after a.jpg's embed: once it is captioned, the event of
        # the embed's rename (earlier, settled as long) has been handled.
        b = distinct_image(14, pics / "b.jpg")
        wait_for(lambda: d.captioned(b), 120, "b.jpg captioned")

        assert len(d.logged("captioned", path=str(a))) == 1
        con = sqlite3.connect(d.db)
        try:
            gen = con.execute("SELECT gen FROM jobs WHERE path = ?", (encode(a),)).fetchone()
            row = con.execute(
                "SELECT sha256, size FROM images WHERE path = ?", (encode(a),)
            ).fetchone()
        finally:
            con.close()
        assert gen == (0,)  # never queued again
        assert row == (hashlib.sha256(embedded).hexdigest(), len(embedded))
        assert a.read_bytes() == embedded
        assert exif_json(a)["XMP-dc:Description"]


def test_the_embeds_rename_is_its_own_write_before_the_row_is_committed(tmp_path):
    """The window a loaded CI machine hit: the embed renamed the image and the rename's
    event settled before the writer committed the row that records the new file. The
    event must not queue the image (it would run again); a change after it must."""
    from watcher.config import Config
    from watcher.intake.events import FileEvents
    from watcher.intake.settle import Ready, Settler

    pics = tmp_path / "pics"
    image = photo_with_metadata(pics / "a.jpg")
    embed(image, "a tram on a hill")  # renamed over the image; no index row at all
    events = FileEvents(
        Config(folders=(FolderConfig(path=pics),), database=tmp_path / "index.db"), Settler
    )
    try:
        events.enqueue_ready([Ready(image, pics)])
        assert events.jobs.state_of(str(image)) is None, "its own write was queued"

        with open(image, "ab") as f:  # someone else changes it afterwards
            f.write(b"\0")
        events.enqueue_ready([Ready(image, pics)])
        assert events.jobs.state_of(str(image)) == ("pending", None)
    finally:
        events.close()
