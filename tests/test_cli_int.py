"""The cli branch merged with int: kept sidecars (schema 2), non-UTF-8 names, a read-only
status, and sidecars restored through the confined writer, through the real CLI."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from daemon_harness import run_cli
from images import distinct_image, write_empty
from test_cli import config, row

import watcher.backends as backends
from watcher.paths import encode, shown


def _row(db: Path, path: Path) -> dict:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        r = con.execute("SELECT * FROM images WHERE path = ?", (encode(path),)).fetchone()
        return dict(r) if r else {}
    finally:
        con.close()


def test_a_kept_sidecar_is_up_to_date_next_time_and_show_gives_both_texts(
    tmp_path, tiny_llava, monkeypatch
):
    pics = tmp_path / "pics"
    distinct_image(1, pics / "a.jpg")
    distinct_image(2, pics / "b.jpg")
    (pics / "b.txt").write_text("my own words\n")
    cfg = config(tmp_path, tiny_llava)
    code, out, _ = run_cli("--config", str(cfg), "caption", str(pics))
    assert code == 0 and "1 existing sidecar left alone" in out, out
    b = row(tmp_path / "index.db", pics / "b.jpg")
    assert b["caption"] == "my own words" and b["model_caption"] not in (None, "my own words")

    # The index holds the user's text as `caption`: that is not "other settings".
    monkeypatch.setattr(backends, "open_backend", lambda *a, **k: pytest.fail("model loaded"))
    for _ in range(2):
        code, out, _ = run_cli("--config", str(cfg), "caption", str(pics))
        assert (code, out.strip()) == (0, "0 new, 2 up to date")
    code, out, _ = run_cli("--config", str(cfg), "caption", "--dry-run", str(pics))
    assert code == 0 and out.startswith("would caption 0 images"), out
    assert (pics / "b.txt").read_text() == "my own words\n"

    code, out, _ = run_cli("--config", str(cfg), "show", str(pics / "b.jpg"))
    lines = out.splitlines()
    assert code == 0
    assert "  sidecar text: my own words" in lines
    assert "  caption (index): my own words" in lines
    assert f"  model's caption: {b['model_caption']}" in lines, out
    code, out, _ = run_cli("--config", str(cfg), "show", str(pics / "b.jpg"), "--json")
    info = json.loads(out)
    assert (info["caption"], info["model_caption"]) == ("my own words", b["model_caption"])


def test_non_utf8_names_restore_show_status_and_prune(tmp_path, tiny_llava):
    pics = tmp_path / "pics"
    image = pics / os.fsdecode(b"caf\xe9.jpg")
    sidecar = pics / os.fsdecode(b"caf\xe9.txt")
    bad = pics / os.fsdecode(b"bad\xff.jpg")
    distinct_image(1, image)
    write_empty(bad)
    os.utime(bad, (1, 1))  # old: not a file still arriving
    cfg = config(tmp_path, tiny_llava)
    code, out, _ = run_cli("--config", str(cfg), "caption", str(pics))
    assert code == 1 and "1 failed" in out, out
    caption = _row(tmp_path / "index.db", image)["caption"]

    sidecar.unlink()
    code, out, _ = run_cli("--config", str(cfg), "caption", str(pics))
    assert "1 missing sidecar written again from the index" in out, out
    assert sidecar.read_text() == caption + "\n"

    code, out, _ = run_cli("--config", str(cfg), "show", str(image))
    assert code == 0 and out.splitlines()[0] == shown(image) == str(pics / "caf\\xe9.jpg")
    assert f"  sidecar: {shown(sidecar)}" in out.splitlines()

    bad.unlink()  # a failure of a file deleted since: not listed by the read-only status
    code, out, _ = run_cli("--config", str(cfg), "status")
    assert code == 0 and "bad" not in out and "last failures" not in out, out
    code, out, _ = run_cli("--config", str(cfg), "status", "--json")
    assert json.loads(out)["failures"] == []

    image.unlink()
    code, out, _ = run_cli("--config", str(cfg), "prune", "--dry-run")
    assert code == 0 and f"  {shown(image)}" in out.splitlines(), out
    code, out, _ = run_cli("--config", str(cfg), "prune")
    assert code == 0 and out.startswith("removed 1 index row"), out
    code, _, err = run_cli("--config", str(cfg), "show", str(image))
    assert code == 1 and "is not in the index" in err


def test_a_missing_sidecar_is_not_restored_through_a_folder_swapped_for_a_link(
    tmp_path, tiny_llava
):
    pics, outside = tmp_path / "pics", tmp_path / "outside"
    distinct_image(1, pics / "sub" / "x.jpg")
    cfg = config(tmp_path, tiny_llava, folders=[{"path": str(pics)}])
    assert run_cli("--config", str(cfg), "caption", str(pics))[0] == 0
    (pics / "sub" / "x.txt").unlink()
    (pics / "sub").rename(outside)
    (pics / "sub").symlink_to(outside)  # the same names, now through a link out of the root

    code, out, _ = run_cli("--config", str(cfg), "retry", str(pics / "sub" / "x.jpg"))
    assert code == 1, out
    assert f"sidecar still pending: {pics / 'sub' / 'x.jpg'}: " in out, out
    assert not (outside / "x.txt").exists()
    assert row(tmp_path / "index.db", pics / "sub" / "x.jpg")["sidecar_state"] == "pending"
