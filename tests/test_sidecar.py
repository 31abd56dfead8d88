"""Sidecar naming, overwrite policy and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from watcher.config import IMAGE_EXTENSIONS
from watcher.outputs.sidecar import choose_name, decide, text_hash, write_atomic


def _no_owner(_: str) -> None:
    return None


def test_kohya_name_is_stem_txt(tmp_path: Path) -> None:
    img = tmp_path / "photo.jpg"
    img.write_bytes(b"x")
    n = choose_name(img, "{stem}.txt", IMAGE_EXTENSIONS, _no_owner)
    assert n.path == tmp_path / "photo.txt" and n.collision is None


def test_same_stem_second_image_gets_full_name(tmp_path: Path) -> None:
    (tmp_path / "photo.jpg").write_bytes(b"x")
    (tmp_path / "photo.png").write_bytes(b"y")
    first = choose_name(tmp_path / "photo.jpg", "{stem}.txt", IMAGE_EXTENSIONS, _no_owner)
    second = choose_name(tmp_path / "photo.png", "{stem}.txt", IMAGE_EXTENSIONS, _no_owner)
    assert first.path == tmp_path / "photo.txt"
    assert second.path == tmp_path / "photo.png.txt"
    assert second.collision == str(tmp_path / "photo.jpg")


def test_recorded_owner_keeps_its_sidecar_whatever_the_order(tmp_path: Path) -> None:
    (tmp_path / "photo.jpg").write_bytes(b"x")
    (tmp_path / "photo.png").write_bytes(b"y")
    owners = {str(tmp_path / "photo.txt"): str(tmp_path / "photo.png")}
    jpg = choose_name(tmp_path / "photo.jpg", "{stem}.txt", IMAGE_EXTENSIONS, owners.get)
    png = choose_name(tmp_path / "photo.png", "{stem}.txt", IMAGE_EXTENSIONS, owners.get)
    assert png.path == tmp_path / "photo.txt"
    assert jpg.path == tmp_path / "photo.jpg.txt"


def test_custom_pattern(tmp_path: Path) -> None:
    img = tmp_path / "a.webp"
    assert (
        choose_name(img, "{name}.caption", IMAGE_EXTENSIONS, _no_owner).path
        == tmp_path / "a.webp.caption"
    )


@pytest.mark.parametrize(
    ("policy", "on_disk", "ours", "expected"),
    [
        ("ours", None, None, "write"),
        ("ours", "user text\n", None, "keep"),
        ("ours", "old caption\n", "OLD", "write"),  # ours and unchanged since
        ("ours", "old caption, edited\n", "OLD", "keep"),  # ours but edited by the user
        ("never", "old caption\n", "OLD", "keep"),
        ("always", "user text\n", None, "write"),
        ("never", "new caption\n", None, "same"),
    ],
)
def test_overwrite_policy(tmp_path: Path, policy, on_disk, ours, expected) -> None:
    sidecar = tmp_path / "a.txt"
    if on_disk is not None:
        sidecar.write_text(on_disk)
    recorded = text_hash("old caption\n") if ours == "OLD" else None
    assert decide(policy, sidecar, recorded, "new caption\n") == expected


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("before\n")
    sha = write_atomic(target, "after\n")
    assert target.read_text() == "after\n"
    assert sha == text_hash("after\n")
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_atomic_write_failure_keeps_old_file_and_removes_temp(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "a.txt"
    target.write_text("before\n")

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, "after\n")
    monkeypatch.undo()
    assert target.read_text() == "before\n"
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_atomic_write_respects_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.txt", "x\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
