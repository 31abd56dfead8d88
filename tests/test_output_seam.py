"""The output seam: per-folder `outputs:`, each output's own ownership, the retry path, schema 4."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from conftest import require
from daemon_harness import cli_config, run_cli
from images import distinct_image

from watcher.config import ConfigError, FolderConfig, parse_config
from watcher.index import SCHEMA_VERSION, Index, connect, transaction
from watcher.outputs.base import Record
from watcher.paths import encode


def test_outputs_default_to_txt_and_are_checked():
    assert FolderConfig(path=Path("/p")).outputs == ("txt",)
    cfg = parse_config({"folders": [{"path": "/p", "outputs": ["embed", "txt", "xmp"]}]})
    # Written in a fixed order whatever the listed one: embed (which changes the image) last.
    assert cfg.folders[0].outputs == ("txt", "xmp", "embed")
    with pytest.raises(ConfigError, match=r"folders\[0\]\.outputs\[1\]: expected one of txt, xmp"):
        parse_config({"folders": [{"path": "/p", "outputs": ["txt", "pdf"]}]})
    with pytest.raises(ConfigError, match=r"defaults\.xmp_sidecar: .*ends in \.xmp"):
        parse_config({"defaults": {"xmp_sidecar": "{stem}.xml"}})
    with pytest.raises(ConfigError, match=r"xmp_sidecar: .*no '/'"):
        parse_config({"defaults": {"xmp_sidecar": "../{stem}.xmp"}})
    lightroom = parse_config({"folders": [{"path": "/p", "xmp_sidecar": "{stem}.xmp"}]})
    assert lightroom.folders[0].xmp_sidecar == "{stem}.xmp"


def test_schema_4_migrates_a_version_2_database_and_follows_image_rows(tmp_path):
    db_path = tmp_path / "index.db"
    db = connect(db_path)
    db.conn.execute("DROP TABLE image_outputs")
    db.conn.execute("DROP TRIGGER images_outputs_ad")
    db.conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.conn.close()

    db = connect(db_path)  # migrated
    version = db.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version == (str(SCHEMA_VERSION),)
    index = Index(db)
    with transaction(db):
        db.conn.execute(
            "INSERT INTO images (path, root, sha256, size, mtime_ns, caption, task, model, "
            "created, updated) VALUES (?, '/p', 'x', 1, 1, 'a cat', 'short', 'm', 0, 0)",
            (encode("/p/a.jpg"),),
        )
        index.set_outputs("/p/a.jpg", [Record("xmp", "/p/a.jpg.xmp", "h", "written")])
    assert index.output("/p/a.jpg", "xmp") == Record("xmp", "/p/a.jpg.xmp", "h", "written")
    assert [r.output for r in index.outputs("/p/a.jpg")] == ["txt", "xmp"]
    with transaction(db):
        index.move("/p/a.jpg", "/p/b.jpg", None)
    assert index.output("/p/b.jpg", "xmp") is not None  # the record follows the row
    with transaction(db):
        index.delete("/p/b.jpg")
    assert db.conn.execute("SELECT count(*) FROM image_outputs").fetchone() == (0,)
    db.conn.close()
    connect(db_path).conn.close()  # a second open changes nothing (idempotent)


def _config(tmp_path: Path, model: Path, **folder) -> Path:
    return cli_config(tmp_path, model, folders=[{"path": str(tmp_path / "pics"), **folder}])


def _description(xmp: Path) -> str:
    out = subprocess.run(
        ["exiftool", "-j", "-XMP-dc:Description", str(xmp)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)[0]["Description"]


def _outputs(db: Path) -> dict[str, tuple]:
    with sqlite3.connect(db) as con:
        return {
            o: (s, e) for o, s, e in con.execute("SELECT output, state, error FROM image_outputs")
        }


def test_hand_edit_in_txt_is_kept_while_xmp_still_updates(tmp_path, tiny_llava):
    require("exiftool", shutil.which("exiftool") is not None, "apt install libimage-exiftool-perl")
    image = distinct_image(21, tmp_path / "pics" / "a.jpg")
    cfg = _config(tmp_path, tiny_llava, outputs=["txt", "xmp"])
    code, out, _ = run_cli("--config", str(cfg), "caption", str(tmp_path / "pics"))
    assert code == 0, out
    model_text = (tmp_path / "pics" / "a.txt").read_text(encoding="utf-8").strip()
    assert _description(tmp_path / "pics" / "a.jpg.xmp") == " ".join(model_text.split())
    (tmp_path / "pics" / "a.txt").write_text("my own words\n", encoding="utf-8")

    # A new prefix: every output's text changes (no model work needed).
    cfg = _config(tmp_path, tiny_llava, outputs=["txt", "xmp"], prefix="sks photo,")
    code, out, _ = run_cli("--config", str(cfg), "caption", str(image.parent))

    assert code == 0, out
    assert (tmp_path / "pics" / "a.txt").read_text(encoding="utf-8") == "my own words\n"
    assert _description(tmp_path / "pics" / "a.jpg.xmp").startswith("sks photo,")
    assert _outputs(tmp_path / "index.db") == {"xmp": ("written", None)}
    with sqlite3.connect(tmp_path / "index.db") as con:
        state = con.execute("SELECT sidecar_state FROM images").fetchone()
    assert state == ("kept",)


def test_xmp_that_could_not_be_written_is_written_by_retry(tmp_path, tiny_llava, monkeypatch):
    real_exiftool = shutil.which("exiftool")
    require("exiftool", real_exiftool is not None, "apt install libimage-exiftool-perl")
    distinct_image(22, tmp_path / "pics" / "a.jpg")
    cfg = _config(tmp_path, tiny_llava, outputs=["txt", "xmp"])
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # exiftool is not installed

    code, out, _ = run_cli("--config", str(cfg), "caption", str(tmp_path / "pics"))

    assert code == 0, out
    assert (tmp_path / "pics" / "a.txt").exists()  # the other outputs still go
    assert not (tmp_path / "pics" / "a.jpg.xmp").exists()
    state, error = _outputs(tmp_path / "index.db")["xmp"]
    assert state == "pending" and "exiftool is not installed" in error
    assert "apt install libimage-exiftool-perl" in error
    code, out, _ = run_cli("--config", str(cfg), "status")
    assert "outputs pending (xmp, embed; `watcher retry --all` once the reason is fixed): 1" in out
    assert f"  xmp: {tmp_path / 'pics' / 'a.jpg'}: cannot write XMP sidecar: exiftool is" in out

    monkeypatch.undo()  # exiftool is back on PATH
    code, out, _ = run_cli("--config", str(cfg), "retry", "--all")

    assert code == 0, out
    assert _outputs(tmp_path / "index.db")["xmp"] == ("written", None)
    text = (tmp_path / "pics" / "a.txt").read_text(encoding="utf-8").strip()
    assert _description(tmp_path / "pics" / "a.jpg.xmp") == " ".join(text.split())


def test_output_added_to_the_config_later_is_written_by_retry(tmp_path, tiny_llava):
    require("exiftool", shutil.which("exiftool") is not None, "apt install libimage-exiftool-perl")
    distinct_image(23, tmp_path / "pics" / "a.jpg")
    cfg = _config(tmp_path, tiny_llava)  # outputs: [txt], the default
    code, out, _ = run_cli("--config", str(cfg), "caption", str(tmp_path / "pics"))
    assert code == 0, out
    assert not (tmp_path / "pics" / "a.jpg.xmp").exists()

    cfg = _config(tmp_path, tiny_llava, outputs=["txt", "xmp"])
    code, out, _ = run_cli("--config", str(cfg), "retry", "--all")

    assert code == 0, out
    text = (tmp_path / "pics" / "a.txt").read_text(encoding="utf-8").strip()
    assert _description(tmp_path / "pics" / "a.jpg.xmp") == " ".join(text.split())
    assert _outputs(tmp_path / "index.db") == {"xmp": ("written", None)}
    code, out, _ = run_cli("--config", str(cfg), "status")
    assert "outputs pending" not in out
