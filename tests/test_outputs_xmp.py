"""The `xmp` output: XMP sidecars read back with ExifTool, merged into darktable/digiKam ones."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml
from conftest import require
from daemon_harness import run_cli
from images import distinct_image

from watcher.config import FolderConfig
from watcher.messages import SidecarState
from watcher.outputs.base import Content, Place, Record, keywords_for
from watcher.outputs.sidecar import open_folder
from watcher.outputs.xmp import XmpOutput


@pytest.fixture(autouse=True)
def _exiftool() -> None:
    require("exiftool", shutil.which("exiftool") is not None, "apt install libimage-exiftool-perl")


def exif_json(path: Path, *tags: str) -> dict:
    """What ExifTool (not our code) reads from `path`: structures kept, groups named."""
    out = subprocess.run(
        ["exiftool", "-j", "-struct", "-G1", *tags, str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)[0]


def properties(path: Path) -> dict:
    """Every XMP property of a sidecar as ExifTool reads it (file-system facts and the
    writer's toolkit name left out)."""
    return {
        k: v
        for k, v in exif_json(path, "-XMP:all").items()
        if k != "SourceFile" and k != "XMP-x:XMPToolkit"
    }


def write(
    image: Path, caption: str, *, task: str = "short", previous: Record | None = None, **folder
) -> Record:
    cfg = FolderConfig(path=image.parent, outputs=("txt", "xmp"), task=task, **folder)
    fd = open_folder(image.parent, image.parent)
    try:
        content = Content(
            caption, task, "moondream", "2025-06-21", keywords_for(task, caption, cfg.xmp_keywords)
        )
        return XmpOutput().write(Place(image, image.parent, fd, cfg), content, previous).record
    finally:
        os.close(fd)


DARKTABLE = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:exif="http://ns.adobe.com/exif/1.0/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/"
    xmlns:darktable="http://darktable.sf.net/"
   exif:DateTimeOriginal="2024:06:01 10:00:00"
   xmp:Rating="4"
   xmp:Label="Red"
   xmpMM:DerivedFrom="photo.jpg"
   darktable:import_timestamp="63811123200000000"
   darktable:change_timestamp="63811123300000000"
   darktable:xmp_version="5"
   darktable:raw_params="0"
   darktable:auto_presets_applied="1"
   darktable:history_end="2"
   darktable:iop_order_version="4">
   <dc:subject>
    <rdf:Bag>
     <rdf:li>holiday</rdf:li>
     <rdf:li>beach</rdf:li>
    </rdf:Bag>
   </dc:subject>
   <lr:hierarchicalSubject>
    <rdf:Bag>
     <rdf:li>places|beach</rdf:li>
     <rdf:li>darktable|format|jpg</rdf:li>
    </rdf:Bag>
   </lr:hierarchicalSubject>
   <darktable:history>
    <rdf:Seq>
     <rdf:li
      darktable:num="0"
      darktable:operation="exposure"
      darktable:enabled="1"
      darktable:modversion="6"
      darktable:params="0000000000000000cdcc4c3d"
      darktable:multi_name=""
      darktable:multi_priority="0"
      darktable:blendop_version="11"
      darktable:blendop_params="gz11eJxjYGBgkGAAgRNODGiAEV0AJ"/>
     <rdf:li
      darktable:num="1"
      darktable:operation="colorin"
      darktable:enabled="1"
      darktable:modversion="7"
      darktable:params="gz48eJzjZhgFowABWAbaAaNgwAEAEDgABg=="
      darktable:multi_name="1"
      darktable:multi_priority="1"
      darktable:blendop_version="11"
      darktable:blendop_params="gz11eJxjYGBgkGAAgRNODGiAEV0AJ"/>
    </rdf:Seq>
   </darktable:history>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""

DIGIKAM = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:digiKam="http://www.digikam.org/ns/1.0/"
    xmlns:MicrosoftPhoto="http://ns.microsoft.com/photo/1.0/"
    xmlns:acdsee="http://ns.acdsee.com/iptc/1.0/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/"
    xmlns:mediapro="http://ns.iview-multimedia.com/mediapro/1.0/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/"
   xmp:Rating="3"
   MicrosoftPhoto:Rating="50"
   digiKam:ColorLabel="2"
   digiKam:PickLabel="3"
   photoshop:Urgency="0"
   acdsee:caption="Tram 28 at the top of the hill">
   <digiKam:TagsList>
    <rdf:Seq>
     <rdf:li>Family/Anna</rdf:li>
     <rdf:li>Places/Lisbon</rdf:li>
    </rdf:Seq>
   </digiKam:TagsList>
   <MicrosoftPhoto:LastKeywordXMP>
    <rdf:Bag>
     <rdf:li>Family/Anna</rdf:li>
    </rdf:Bag>
   </MicrosoftPhoto:LastKeywordXMP>
   <lr:hierarchicalSubject>
    <rdf:Bag>
     <rdf:li>Family|Anna</rdf:li>
     <rdf:li>Places|Lisbon</rdf:li>
    </rdf:Bag>
   </lr:hierarchicalSubject>
   <mediapro:CatalogSets>
    <rdf:Bag>
     <rdf:li>Family|Anna</rdf:li>
    </rdf:Bag>
   </mediapro:CatalogSets>
   <dc:subject>
    <rdf:Bag>
     <rdf:li>Anna</rdf:li>
     <rdf:li>Lisbon</rdf:li>
    </rdf:Bag>
   </dc:subject>
   <dc:title>
    <rdf:Alt>
     <rdf:li xml:lang="x-default">Tram 28</rdf:li>
    </rdf:Alt>
   </dc:title>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>
"""

OURS = {"XMP-dc:Description", "XMP-iptcCore:AltTextAccessibility", "XMP-dc:Subject"}


def test_new_sidecar_read_back_by_exiftool(tmp_path):
    image = distinct_image(1, tmp_path / "photo.jpg")
    rec = write(image, "a red bicycle, brick wall, golden hour", task="prompt")

    xmp = tmp_path / "photo.jpg.xmp"
    assert (rec.state, rec.target) == ("written", str(xmp))
    got = exif_json(xmp)
    assert got["XMP-dc:Description"] == "a red bicycle, brick wall, golden hour"
    assert got["XMP-iptcCore:AltTextAccessibility"] == "a red bicycle, brick wall, golden hour"
    assert got["XMP-dc:Subject"] == ["a red bicycle", "brick wall", "golden hour"]
    assert got["XMP-mdwatcher:Model"] == "moondream"
    assert got["XMP-mdwatcher:Task"] == "prompt"
    # dc:description is a language alternative (rdf:Alt) whose entry is x-default.
    rdf = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
    li = ElementTree.parse(xmp).find(
        f".//{{http://purl.org/dc/elements/1.1/}}description/{rdf}Alt/{rdf}li"
    )
    assert li is not None and li.text == "a red bicycle, brick wall, golden hour"
    assert li.get("{http://www.w3.org/XML/1998/namespace}lang") == "x-default"
    assert not list(tmp_path.glob("*.watcher-tmp"))


def test_lightroom_name_and_no_keywords_outside_prompt(tmp_path):
    image = distinct_image(2, tmp_path / "photo.jpg")
    write(image, "A dog, on a sofa.", xmp_sidecar="{stem}.xmp")

    got = exif_json(tmp_path / "photo.xmp")
    assert got["XMP-dc:Description"] == "A dog, on a sofa."
    assert "XMP-dc:Subject" not in got
    assert not (tmp_path / "photo.jpg.xmp").exists()


@pytest.mark.parametrize("style", ["darktable", "digikam"])
def test_merge_keeps_every_property_of_a_photo_manager_sidecar(tmp_path, style):
    image = distinct_image(3, tmp_path / "photo.jpg")
    xmp = tmp_path / "photo.jpg.xmp"
    xmp.write_text(DARKTABLE if style == "darktable" else DIGIKAM, encoding="utf-8")
    before = properties(xmp)

    rec = write(image, "tram, yellow, hill", task="prompt")

    assert rec.state == SidecarState.WRITTEN
    after = properties(xmp)
    for key, value in before.items():
        if key == "XMP-dc:Subject":
            continue
        assert after.get(key) == value, key
    # The user's keywords stay, ours are added.
    assert after["XMP-dc:Subject"] == before["XMP-dc:Subject"] + ["tram", "yellow", "hill"]
    assert after["XMP-dc:Description"] == "tram, yellow, hill"
    new = set(after) - set(before)
    assert {k for k in new if not k.startswith("XMP-mdwatcher:")} == OURS - {"XMP-dc:Subject"}


def test_description_changed_in_a_photo_manager_is_left_alone(tmp_path):
    image = distinct_image(4, tmp_path / "photo.jpg")
    xmp = tmp_path / "photo.jpg.xmp"
    first = write(image, "old, terms", task="prompt")
    # The "photo manager": ExifTool rewrites the description in place.
    subprocess.run(
        ["exiftool", "-overwrite_original", "-XMP-dc:Description=Grandma's bike", str(xmp)],
        check=True,
        capture_output=True,
    )

    again = write(image, "new, words", task="prompt", previous=first)

    got = exif_json(xmp)
    assert got["XMP-dc:Description"] == "Grandma's bike"
    assert again.state == SidecarState.KEPT and "description" in (again.error or "")
    # The other fields are still ours and follow the new caption.
    assert got["XMP-iptcCore:AltTextAccessibility"] == "new, words"
    assert got["XMP-dc:Subject"] == ["new", "words"]


def test_recaption_replaces_only_our_keywords(tmp_path):
    image = distinct_image(5, tmp_path / "photo.jpg")
    xmp = tmp_path / "photo.jpg.xmp"
    first = write(image, "cat, sofa", task="prompt")
    subprocess.run(
        ["exiftool", "-overwrite_original", "-XMP-dc:Subject+=Mittens", str(xmp)],
        check=True,
        capture_output=True,
    )
    mtime = xmp.stat().st_mtime_ns
    # Same caption again: nothing to change, the file is not rewritten.
    same = write(image, "cat, sofa", task="prompt", previous=first)
    assert same.state == "written" and xmp.stat().st_mtime_ns == mtime

    write(image, "cat, blanket", task="prompt", previous=same)

    assert sorted(exif_json(xmp)["XMP-dc:Subject"]) == ["Mittens", "blanket", "cat"]


def test_symlink_at_the_sidecar_name_is_not_followed(tmp_path):
    image = distinct_image(6, tmp_path / "photo.jpg")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.xmp"
    outside.write_text(DIGIKAM, encoding="utf-8")
    (tmp_path / "photo.jpg.xmp").symlink_to(outside)

    rec = write(image, "a cat")

    assert rec.state == SidecarState.KEPT
    assert outside.read_text(encoding="utf-8") == DIGIKAM


def test_caption_command_writes_txt_and_xmp_and_records_both(tmp_path, tiny_llava):
    pics = tmp_path / "pics" / "nested"
    distinct_image(7, pics / "a.jpg")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "backend": "transformers",
                    "path": str(tiny_llava),
                    "max_tokens": 8,
                    "isolate": False,
                },
                "database": str(tmp_path / "index.db"),
                "log": {"level": "warning"},
                "defaults": {"outputs": ["xmp", "txt"]},
            }
        )
    )

    code, out, _ = run_cli("--config", str(cfg), "caption", str(tmp_path / "pics"))

    assert code == 0, out
    text = (pics / "a.txt").read_text(encoding="utf-8").strip()
    assert exif_json(pics / "a.jpg.xmp")["XMP-dc:Description"] == " ".join(text.split())
    with sqlite3.connect(tmp_path / "index.db") as con:
        rows = con.execute("SELECT output, state FROM image_outputs").fetchall()
    assert rows == [("xmp", "written")]
    # A second run: up to date, nothing rewritten.
    code, out, _ = run_cli("--config", str(cfg), "caption", str(tmp_path / "pics"))
    assert code == 0 and "0 new, 1 up to date" in out, out
