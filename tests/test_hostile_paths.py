"""File names that are not UTF-8 (issue 11.7) and files passed over by name (issue 11.13), end to
end through `watcher caption`, `watcher status`, `watcher search` and the daemon.

A name on Linux is bytes. Each test builds names from bytes (os.fsdecode gives the str Python
uses for them) and checks what a user sees: the sidecar next to the image under the image's
own bytes, the index row under the exact path, the name shown escaped (`caf\\xe9.jpg`) on
every line, and the other files captioned whatever one name does.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from daemon_harness import Daemon, run_cli, wait_for, write_config
from images import distinct_image, write_jpeg
from PIL import Image

from watcher.paths import decode, encode, shown

pytestmark = pytest.mark.timeout(240)

LATIN1 = b"caf\xe9.jpg"  # Latin-1 é: not UTF-8
INVALID = b"bad\xc3\x28\xed\xa0\x80.png"  # a broken 2-byte sequence and an encoded surrogate
NOISY = b"\xff\xfe\x80.jpg"  # bytes that begin no UTF-8 sequence at all


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


def _model(model: Path, *, isolate: bool = False) -> dict:
    """In-process `watcher caption` runs the model here (a model process would import torch
    afresh for each command); the daemon tests keep the model process, as in production."""
    return {
        "backend": "transformers",
        "path": str(model),
        "batch_size": 8,
        "max_tokens": 6,
        "isolate": isolate,
    }


def _config(
    tmp_path: Path, model: Path, folders: list[dict] | None = None, *, isolate: bool = False
) -> Path:
    return write_config(
        tmp_path, model, folders or [], retry_backoff=0.05, model=_model(model, isolate=isolate)
    )


def _rows(db: Path) -> dict[str, dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return {decode(r["path"]): dict(r) for r in con.execute("SELECT * FROM images")}
    finally:
        con.close()


def _sidecar_bytes(folder: Path) -> set[bytes]:
    return {n for n in os.listdir(os.fsencode(folder)) if n.endswith(b".txt")}


def _encodable(text: str) -> bool:
    """What a terminal (strict UTF-8) can print: no lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def test_path_encoding_round_trips_and_keeps_subtrees():
    names = [
        _name(LATIN1),
        _name(INVALID),
        _name(NOISY),
        "plain.jpg",
        "a\ufdd0e9.jpg",
        "a\ufdd0\ufdd0.jpg",
        "new\nline.jpg",
        "back\\xe9.jpg",
        "日本.png",
    ]
    stored = {n: encode("/r" + _name(b"\xe9") + "/" + n) for n in names}
    assert len(set(stored.values())) == len(names)  # no two names collide once stored
    for n, s in stored.items():
        s.encode("utf-8")  # SQLite accepts it
        assert decode(s) == "/r" + _name(b"\xe9") + "/" + n
        assert s.startswith(encode("/r" + _name(b"\xe9")) + "/")  # prefix_range stays exact
    assert encode("/plain/a.jpg") == "/plain/a.jpg"  # ordinary names are stored unchanged
    # Shown: the byte as \xe9, and a real backslash doubled so the two cannot be confused.
    assert shown(_name(LATIN1)) == "caf\\xe9.jpg"
    assert shown("back\\xe9.jpg") == "back\\\\xe9.jpg"
    assert shown("new\nline.jpg") == "new\\x0aline.jpg"


def test_caption_with_non_utf8_names_captions_everything(tmp_path, tiny_llava):
    # The root itself, a sub-folder and files all have names that are not UTF-8.
    root = tmp_path / _name(b"shoot-\xe9t\xe9")
    sub = root / _name(b"sub\xff")
    names = {
        root / _name(LATIN1): 0,
        root / _name(INVALID): 1,
        root / _name(NOISY): 2,
        sub / "inside.jpg": 3,
        sub / _name(b"x\xe9\nnewline.jpg"): 4,
        root / "good.jpg": 5,
        root / "back\\xe9.jpg": 6,
    }
    for path, i in names.items():
        distinct_image(i, path)
    cfg = _config(tmp_path, tiny_llava)

    code, out, err = run_cli("--config", str(cfg), "caption", str(root))

    assert code == 0, out + err
    assert "Traceback" not in out + err
    assert f"{len(names)} new, 0 up to date, 0 failed" in out
    assert _encodable(out) and _encodable(err)
    # Each name shown escaped on its own line: the byte as \xe9, the newline as \x0a.
    assert "caf\\xe9.jpg" in out and "bad\\xc3(\\xed\\xa0\\x80.png" in out
    assert "sub\\xff/x\\xe9\\x0anewline.jpg" in out
    assert len([ln for ln in out.splitlines() if ln.startswith("[")]) == len(names)
    # Sidecars next to the images, named from the images' own bytes.
    assert _sidecar_bytes(root) == {
        b"caf\xe9.txt",
        b"bad\xc3\x28\xed\xa0\x80.txt",
        b"\xff\xfe\x80.txt",
        b"good.txt",
        b"back\\xe9.txt",
    }
    assert _sidecar_bytes(sub) == {b"inside.txt", b"x\xe9\nnewline.txt"}
    # The index holds every exact path, and its sidecar's exact path.
    rows = _rows(tmp_path / "index.db")
    assert set(rows) == {str(p) for p in names}
    latin = rows[str(root / _name(LATIN1))]
    assert decode(latin["sidecar"]) == str(root / _name(b"caf\xe9.txt"))
    assert decode(latin["root"]) == str(root)
    assert (root / _name(b"caf\xe9.txt")).read_text() == latin["caption"] + "\n"

    # The paths round-trip: a second run finds every file up to date.
    code, again, _ = run_cli("--config", str(cfg), "caption", str(root))
    assert code == 0 and f"0 new, {len(names)} up to date" in again

    # Search shows the name escaped; --json keeps a value that decodes to the exact path.
    word = latin["caption"].split()[0]
    code, found, _ = run_cli("--config", str(cfg), "search", word, "--limit", "100")
    assert code == 0 and f"{shown(root)}/caf\\xe9.jpg" in found.splitlines()
    assert _encodable(found)
    code, as_json, _ = run_cli("--config", str(cfg), "search", word, "--json", "--limit", "100")
    assert str(root / _name(LATIN1)) in {h["path"] for h in json.loads(as_json)}


def test_a_failing_non_utf8_image_is_reported_escaped(tmp_path, tiny_llava):
    pics = tmp_path / "pics"
    distinct_image(0, pics / "good.jpg")
    (pics / _name(b"broken\xe9.jpg")).write_bytes(b"not an image at all")
    os.utime(pics / _name(b"broken\xe9.jpg"), (1_000_000_000, 1_000_000_000))
    cfg = _config(tmp_path, tiny_llava)

    code, out, err = run_cli("--config", str(cfg), "caption", str(pics))

    assert code == 1, out + err
    assert (pics / "good.txt").exists()
    assert f"failed: {pics}/broken\\xe9.jpg: not an image" in out
    code, status, _ = run_cli("--config", str(cfg), "status")
    assert code == 0 and f"{pics}/broken\\xe9.jpg: not an image" in status
    assert _encodable(status)
    code, report, _ = run_cli("--config", str(cfg), "status", "--json")
    assert json.loads(report)["failures"][0]["path"] == str(pics / _name(b"broken\xe9.jpg"))


def test_one_file_that_cannot_be_queued_does_not_hold_back_the_others(
    tmp_path, tiny_llava, monkeypatch
):
    """An unexpected error queuing one path is recorded against that path; the rest go on."""
    from watcher.jobs import JobQueue

    pics = tmp_path / "pics"
    for i in range(3):
        distinct_image(i, pics / f"{i}.jpg")
    cursed = pics / _name(b"cursed\xe9.jpg")
    distinct_image(9, cursed)
    real = JobQueue._enqueue_one

    def enqueue_one(self, path, root, *args):
        if Path(path) == cursed:
            raise ValueError("something nobody foresaw")
        return real(self, path, root, *args)

    monkeypatch.setattr(JobQueue, "_enqueue_one", enqueue_one)
    cfg = _config(tmp_path, tiny_llava)

    code, out, err = run_cli("--config", str(cfg), "caption", str(pics))

    assert code == 0, out + err
    assert all((pics / f"{i}.txt").exists() for i in range(3))
    assert not (pics / _name(b"cursed\xe9.txt")).exists()
    code, status, _ = run_cli("--config", str(cfg), "status")
    assert "cursed\\xe9.jpg: could not be queued: ValueError: something nobody foresaw" in status


def test_daemon_captions_non_utf8_names_at_start_and_while_running(tmp_path, tiny_llava):
    watched = tmp_path / _name(b"inbox\xe9")
    distinct_image(0, watched / _name(LATIN1))
    distinct_image(1, watched / "before.jpg")
    cfg = _config(
        tmp_path, tiny_llava, [{"path": str(watched), "settle_seconds": 0.2}], isolate=True
    )
    with Daemon(cfg, tmp_path) as d:
        # The start-up scan got past the bad name: both files present at start captioned.
        wait_for(lambda: d.captioned(watched / _name(LATIN1)), 60, "the Latin-1 name")
        wait_for(lambda: d.captioned(watched / "before.jpg"), 60, "the good one")
        # Files that settle together with bad names are all queued.
        arrivals = [
            watched / _name(NOISY),
            watched / "after.jpg",
            watched / _name(b"sub\xe9") / _name(INVALID),
        ]
        for i, p in enumerate(arrivals):
            distinct_image(10 + i, p)
        for p in arrivals:
            wait_for(lambda p=p: d.captioned(p), 60, f"{shown(p)} captioned")
        assert set(d.rows()) == {
            str(watched / _name(LATIN1)),
            str(watched / "before.jpg"),
            *map(str, arrivals),
        }
        code, status, _ = run_cli("--config", str(cfg), "status")
        assert code == 0 and _encodable(status)
        assert f"  {shown(watched)}" in status and "inbox\\xe9" in status
        # Moved: the row and our sidecar follow under the new bytes. Deleted: the row goes.
        moved = watched / _name(b"moved\xe8.jpg")
        (watched / _name(LATIN1)).rename(moved)
        wait_for(lambda: str(moved) in d.rows(), 30, "the row to follow the move")
        assert decode(d.rows()[str(moved)]["sidecar"]) == str(watched / _name(b"moved\xe8.txt"))
        assert _sidecar_bytes(watched) >= {b"moved\xe8.txt"}
        arrivals[0].unlink()
        wait_for(lambda: str(arrivals[0]) not in d.rows(), 30, "the deleted file's row")
        log = d.log_text()
    assert "Traceback" not in log and "UnicodeEncodeError" not in log
    # Log lines name the files escaped, as the terminal shows them.
    done = [e["path"] for e in d.events() if e.get("event") == "captioned"]
    assert f"{shown(watched)}/caf\\xe9.jpg" in done


# --- files passed over by name (issue 11.13) -----------------------------------------------


def _avif(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path, format="AVIF")
    return path


def test_caption_says_which_files_it_passed_over_and_captions_avif(tmp_path, tiny_llava):
    from PIL import features

    if not features.check_module("avif"):
        pytest.skip("this Pillow has no AVIF")
    pics = tmp_path / "pics"
    distinct_image(0, pics / "a.jpg")
    (pics / "notes.pdf").write_bytes(b"%PDF-1.4\n")
    (pics / "clip.mov").write_bytes(b"\x00" * 64)
    write_jpeg(pics / "IMG_0001")  # an image that lost its extension
    (pics / "README").write_text("hello\n")
    _avif(pics / "photo.avif")
    (pics / ".hidden.pdf").write_bytes(b"x")  # hidden: deliberately not mentioned
    cfg = _config(tmp_path, tiny_llava)

    code, out, err = run_cli("--config", str(cfg), "caption", str(pics))

    assert code == 0, out + err
    assert (pics / "photo.txt").exists()  # AVIF is captioned where Pillow reads it
    assert "2 new, 0 up to date" in out
    lines = out.splitlines()
    assert (
        "passed over: 2 files (not an image extension): clip.mov, notes.pdf" in lines
        or "passed over: 2 files (not an image extension): notes.pdf, clip.mov" in lines
    )
    assert (
        "passed over: 1 file (no extension, but image bytes: add an extension (e.g. .jpg) "
        "to caption it): IMG_0001"
    ) in lines
    assert "passed over: 1 file (no extension): README" in lines
    assert "hidden" not in out
    # The sidecars written are not "passed over" at the next run.
    code, again, _ = run_cli("--config", str(cfg), "caption", str(pics))
    assert "0 new, 2 up to date" in again
    assert "a.txt" not in again and "photo.txt" not in again
    assert "passed over: 2 files (not an image extension)" in again


def test_avif_where_pillow_cannot_read_it_is_passed_over_with_the_fix(
    tmp_path, tiny_llava, monkeypatch
):
    import watcher.intake.filter

    monkeypatch.setattr(watcher.intake.filter, "avif_readable", lambda: False)
    pics = tmp_path / "pics"
    distinct_image(0, pics / "a.jpg")
    (pics / "photo.avif").write_bytes(b"\x00\x00\x00\x1cftypavif")
    cfg = write_config(
        tmp_path,
        tiny_llava,
        [],
        defaults={"extensions": [".jpg", ".png"]},
        model=_model(tiny_llava),
    )

    code, out, err = run_cli("--config", str(cfg), "caption", str(pics))

    assert code == 0, out + err
    assert (
        "passed over: 1 file (AVIF, which this Pillow cannot read: install a Pillow "
        "built with AVIF (pip install -U 'pillow>=11.2')): photo.avif"
    ) in out.splitlines()


@pytest.mark.slow  # 30-50 s on 2 busy cores (daemon start-ups)
def test_daemon_status_lists_files_passed_over(tmp_path, tiny_llava):
    watched = tmp_path / "watched"
    distinct_image(0, watched / "a.jpg")
    (watched / "notes.pdf").write_bytes(b"%PDF-1.4\n")
    cfg = _config(
        tmp_path, tiny_llava, [{"path": str(watched), "settle_seconds": 0.2}], isolate=True
    )
    with Daemon(cfg, tmp_path) as d:
        wait_for(lambda: d.captioned(watched / "a.jpg"), 60, "a.jpg")

        def passed() -> list[dict]:
            _, report, _ = run_cli("--config", str(cfg), "status", "--json")
            return json.loads(report)["daemon"]["folders"][0]["passed_over"]

        wait_for(
            lambda: (
                passed()
                == [
                    {
                        "reason": "not an image extension",
                        "count": 1,
                        "examples": [str(watched / "notes.pdf")],
                    }
                ]
            ),
            30,
            "the scan's count in status",
        )
        write_jpeg(watched / "IMG_0002")  # arrives while the daemon runs
        wait_for(
            lambda: any(e["reason"] == "no extension" for e in passed()),
            30,
            "the new file in status",
        )
        code, status, _ = run_cli("--config", str(cfg), "status")
        assert "    passed over: 1 file (not an image extension): notes.pdf" in status
        assert "    passed over: 1 file (no extension): IMG_0002" in status


def test_avif_listed_where_pillow_cannot_read_it_fails_with_the_fix(
    tmp_path, tiny_llava, monkeypatch
):
    """`extensions: [.avif]` on a Pillow without AVIF: a failure that says what to install."""
    import watcher.pipeline.decode

    monkeypatch.setattr(watcher.pipeline.decode, "AVIF_AVAILABLE", False, raising=False)
    monkeypatch.setattr(
        watcher.pipeline.decode,
        "_FORMATS",
        tuple(f for f in watcher.pipeline.decode._FORMATS if f != "AVIF"),
    )
    pics = tmp_path / "pics"
    distinct_image(0, pics / "a.jpg")
    _avif(pics / "photo.avif")
    os.utime(pics / "photo.avif", (1_000_000_000, 1_000_000_000))
    cfg = write_config(
        tmp_path,
        tiny_llava,
        [],
        defaults={"extensions": [".jpg", ".avif"]},
        model=_model(tiny_llava),
    )

    code, out, err = run_cli("--config", str(cfg), "caption", str(pics))

    assert code == 1, out + err
    assert (pics / "a.txt").exists()
    assert (
        f"failed: {pics}/photo.avif: AVIF needs a Pillow built with AVIF support "
        "(Pillow >= 11.2 wheels are): pip install -U 'pillow>=11.2'"
    ) in out.splitlines()
