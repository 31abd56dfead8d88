"""Hostile sidecars (issue 11: 1, 2, 4, 6, 10): sidecar patterns that could replace an image,
a folder swapped for a symbolic link while the model works, files that look like our temp
files, a sparse 2 GB sidecar, and sidecars kept because they are the user's. End to end through
`watcher caption` (in-process), `watcher status`/`search`, or the real daemon.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from daemon_harness import Daemon, wait_for, write_config
from daemon_harness import run_cli as _run
from images import distinct_image

from watcher import faults
from watcher.config import Config, FolderConfig, LogConfig, ModelConfig
from watcher.index import SCHEMA_VERSION, connect
from watcher.outputs.sidecar import (
    FolderMoved,
    SidecarRefused,
    remove_if_ours,
    rename_if_ours,
    text_hash,
    write_atomic,
)

pytestmark = pytest.mark.timeout(300)


def _config(tmp_path: Path, model: Path, folders: list | None = None, **extra) -> Path:
    """The harness's config, the model in this process (these tests are not about it)."""
    return write_config(
        tmp_path,
        model,
        folders or [],
        **{
            "model": {
                "backend": "transformers",
                "path": str(model),
                "batch_size": 4,
                "max_tokens": 4,
                "isolate": False,
            },
            **extra,
        },
    )


def _rows(db: Path) -> dict[str, dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return {r["path"]: dict(r) for r in con.execute("SELECT * FROM images")}
    finally:
        con.close()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture
def inject():
    """watcher.faults in this process: `inject({...})` turns faults on, the test's end off."""
    yield faults.configure
    faults.configure(None)


# --- 1. sidecar patterns ------------------------------------------------------------------

BAD_PATTERNS = {
    # Can render to an image's name (the image itself or a sibling), any extension, any case.
    "{name}": "it can name an image (for photo.jpg it gives photo.jpg)",
    "{stem}": "it can name an image",
    "{stem}.png": "it can name an image (for photo.jpg it gives photo.png)",
    "{stem}.JPG": "it can name an image (for photo.jpg it gives photo.JPG)",
    "{stem}.jpg.JPEG": "it can name an image",
    "{stem}.Webp": "it can name an image",
    "{stem}.tiF": "it can name an image",
    "{name}.GIF": "it can name an image",
    "{stem}g": "it can name an image",  # photo.jp.png -> photo.jpg
    "{stem}peg": "it can name an image",
    "{name}.watcher-tmp": "it can name an image",  # would pass for our temp file
    # Does not depend on the image: every image would share one sidecar.
    "{{stem}}.txt": "it does not depend on the image",
    "caption.txt": "it does not depend on the image",
    # Would fail when rendered.
    "{stem}{0}.txt": "{0} is not allowed",
    "{}.txt": "{} is not allowed",
    "{stem.x}.txt": "{stem.x} is not allowed",
    "{stem[0]}.txt": "{stem[0]} is not allowed",
    "{stem!r}.txt": "{stem!r} is not allowed",
    "{stem:>5}.txt": "{stem:>5} is not allowed",
    "{ext}.txt": "{ext} is not allowed",
    "{stem": "expected '}' before end of string",
    "{stem}}.txt": "Single '}' encountered",
    # Out of the image's folder.
    "../{stem}.txt": "no '/' in the pattern",
    "captions/{stem}.txt": "no '/' in the pattern",
}


@pytest.mark.parametrize("where", ["defaults", "folders[0]"])
@pytest.mark.parametrize("pattern", list(BAD_PATTERNS))
def test_unsafe_sidecar_patterns_are_refused_at_load(tmp_path, tiny_llava, pattern, where):
    pics = tmp_path / "pics"
    distinct_image(0, pics / "a.jpg")
    distinct_image(1, pics / "a.png")
    settings = {"sidecar": pattern, "overwrite": "always"}
    if where == "defaults":
        cfg = _config(tmp_path, tiny_llava, defaults=settings)
    else:
        cfg = _config(tmp_path, tiny_llava, [{"path": str(pics), **settings}])
    before = _snapshot(pics)

    code, out, err = _run("--config", str(cfg), "caption", str(pics))

    assert code == 2, out + err
    assert err.startswith(
        f"watcher: config error: {cfg}: {where}.sidecar: expected a file name pattern such as "
        f"'{{stem}}.txt' (text with {{stem}} and/or {{name}}); got {pattern!r}: "
    ), err
    assert BAD_PATTERNS[pattern] in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _snapshot(pics) == before  # nothing written, nothing replaced


def test_a_pattern_that_names_a_configured_extension_is_refused(tmp_path, tiny_llava):
    # `extensions: [txt]` makes .txt an image extension: the default pattern would then
    # overwrite the images it captions.
    pics = tmp_path / "pics"
    cfg = _config(tmp_path, tiny_llava, [{"path": str(pics), "extensions": ["JPG", "Txt"]}])
    pics.mkdir()
    code, _, err = _run("--config", str(cfg), "caption", str(pics))
    assert code == 2
    assert f"{cfg}: folders[0].sidecar: " in err and "got '{stem}.txt': it can name an image" in err


def test_safe_patterns_are_written_as_rendered(tmp_path, tiny_llava):
    patterns = {
        "p1": "{name}.txt",
        "p2": "{stem}.caption",
        "p3": "{stem}_txt",
        "p4": "{{{stem}}}.txt",
        "p5": "{stem}.{name}.md",
    }
    folders = []
    for i, (sub, pattern) in enumerate(patterns.items()):
        distinct_image(i, tmp_path / sub / "photo.jpg")
        folders.append({"path": str(tmp_path / sub), "sidecar": pattern})
    cfg = _config(tmp_path, tiny_llava, folders)

    code, out, err = _run("--config", str(cfg), "caption", *(str(tmp_path / s) for s in patterns))

    assert code == 0, out + err
    expected = {
        "p1": "photo.jpg.txt",
        "p2": "photo.caption",
        "p3": "photo_txt",
        "p4": "{photo}.txt",
        "p5": "photo.photo.jpg.md",
    }
    rows = _rows(tmp_path / "index.db")
    for sub, name in expected.items():
        assert sorted(os.listdir(tmp_path / sub)) == sorted(["photo.jpg", name])
        row = rows[str(tmp_path / sub / "photo.jpg")]
        assert (row["sidecar"], row["sidecar_state"]) == (str(tmp_path / sub / name), "written")
        assert (tmp_path / sub / name).read_text() == row["caption"] + "\n"


def test_a_config_built_in_code_still_never_replaces_an_image(tmp_path, tiny_llava, monkeypatch):
    # load_config's check bypassed: the writer refuses by itself, the caption goes to the
    # index and the sidecar is pending with the reason; no image is touched.
    patterns = {"n1": "{name}", "n2": "{stem}.PNG", "n3": "{stem}{0}.txt", "n4": "{stem}"}
    for i, sub in enumerate(patterns):
        distinct_image(2 * i, tmp_path / sub / "a.jpg")
        distinct_image(2 * i + 1, tmp_path / sub / "a.png")
    distinct_image(9, tmp_path / "n4" / "b.jpg.png")  # {stem} -> b.jpg, a sibling's name
    distinct_image(10, tmp_path / "n4" / "b.jpg")
    before = {sub: _snapshot(tmp_path / sub) for sub in patterns}
    model = ModelConfig(
        backend="transformers",
        id=str(tiny_llava),
        path=str(tiny_llava),
        revision=None,
        batch_size=4,
        max_tokens=4,
        isolate=False,
    )
    cfg = Config(
        model=model,
        database=tmp_path / "index.db",
        log=LogConfig(format="json", level="warning"),
        folders=tuple(
            FolderConfig(path=tmp_path / sub, sidecar=pattern, overwrite="always")
            for sub, pattern in patterns.items()
        ),
    )
    monkeypatch.setattr("watcher.cli.load_config", lambda *a, **k: cfg)

    code, out, err = _run("caption", *(str(tmp_path / s) for s in patterns))

    assert code == 0, out + err
    assert "Traceback" not in err
    for sub in patterns:
        assert _snapshot(tmp_path / sub) == before[sub], sub
    rows = _rows(tmp_path / "index.db")
    assert len(rows) == 10
    for path, row in rows.items():
        assert row["sidecar_state"] == "pending" and row["caption"], path
        assert row["sidecar_error"].startswith("cannot write sidecar: sidecar pattern "), row
        assert f"sidecar pending: {path}: {row['sidecar_error']}" in out.splitlines()
    assert "{0} is not allowed" in rows[str(tmp_path / "n3" / "a.jpg")]["sidecar_error"]

    # Once the pattern is fixed, `watcher retry --all` writes them without the model.
    fixed = dataclasses.replace(
        cfg, folders=tuple(dataclasses.replace(f, sidecar="{stem}.txt") for f in cfg.folders)
    )
    monkeypatch.setattr("watcher.cli.load_config", lambda *a, **k: fixed)
    code, out, err = _run("retry", "--all")
    assert (code, out) == (0, "0 failed images queued again; 10 pending sidecars written\n"), err
    for path, row in _rows(tmp_path / "index.db").items():
        assert row["sidecar_state"] == "written"
        assert Path(row["sidecar"]).read_text() == row["caption"] + "\n", path
    assert (tmp_path / "n2" / "a.txt").exists() and (tmp_path / "n2" / "a.png.txt").exists()
    for sub in patterns:
        images = {k: v for k, v in _snapshot(tmp_path / sub).items() if not k.endswith(".txt")}
        assert images == before[sub], sub


@pytest.mark.parametrize(
    "name", ["a.jpg", "a.JPG", "a.Png", "x.jpeg", "b.tiff", ".png", "a.jpg.WEBP", "a.HEIC"]
)
def test_the_writer_refuses_any_image_name(tmp_path, name):
    (tmp_path / name).write_bytes(b"image bytes")
    with pytest.raises(SidecarRefused, match="is an image's name"):
        write_atomic(tmp_path / name, "caption\n")
    assert (tmp_path / name).read_bytes() == b"image bytes"
    assert os.listdir(tmp_path) == [name]


# --- 2. a folder swapped for a symbolic link while the model works ---------------------------


@pytest.mark.slow  # 30-50 s on 2 busy cores (daemon start-ups)
def test_folder_swapped_for_a_link_while_captioning_gets_no_sidecar_daemon(tmp_path, tiny_llava):
    watched, outside = tmp_path / "watched", tmp_path / "outside"
    watched.mkdir()
    outside.mkdir()
    gate = tmp_path / "gate"
    env = {
        "WATCHER_FAULTS": json.dumps({"model": [{"match": "a.jpg", "gate": str(gate), "times": 1}]})
    }
    cfg = _config(tmp_path, tiny_llava, [{"path": str(watched), "settle_seconds": 0.3}])
    image = watched / "sub" / "deep" / "a.jpg"
    with Daemon(cfg, tmp_path, env=env) as d:
        distinct_image(1, image)
        wait_for(lambda: gate.with_name("gate.reached").exists(), 60, "a.jpg at the model")
        # The attack: the sub-folder (not even the image's own) leaves the tree and a link
        # to where it went takes its place. The image's bytes and identity are the same.
        os.rename(watched / "sub", outside / "sub")
        os.symlink(outside / "sub", watched / "sub")
        gate.touch()
        wait_for(
            lambda: (
                d.logged(
                    "folder replaced while being captioned; no sidecar written", path=str(image)
                )
                or (outside / "sub" / "deep" / "a.txt").exists()
            ),
            60,
            "the writer's decision",
        )
        assert os.listdir(outside / "sub" / "deep") == ["a.jpg"]
        assert not d.logged("captioned", path=str(image))
        assert str(image) not in d.rows()
        # A real folder comes back in its place (a copy: moving the very same folder back
        # makes watchdog reuse the inotify watch it still holds on it, a case of its own):
        # the image is examined again and captioned there.
        os.unlink(watched / "sub")
        shutil.copytree(outside / "sub", watched / "sub")
        try:
            wait_for(lambda: d.captioned(image), 120, "the sidecar once the folder is back")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{d.log_text()[-4000:]}") from None
        row = d.rows()[str(image)]
        assert (watched / "sub" / "deep" / "a.txt").read_text() == row["caption"] + "\n"
        assert d.proc.poll() is None
    assert os.listdir(outside / "sub" / "deep") == ["a.jpg"]


def test_folder_swapped_for_a_link_inside_the_root_caption(tmp_path, tiny_llava, inject):
    # Even a link that stays inside the watched folder is not written through: `watcher
    # caption` reports the image skipped with the reason, and captions it once it is back.
    pics = tmp_path / "pics"
    image = distinct_image(1, pics / "sub" / "a.jpg")
    distinct_image(2, pics / "other" / "b.jpg")
    gate = tmp_path / "gate"
    inject({"model": [{"match": "a.jpg", "gate": str(gate), "times": 1}]})
    cfg = _config(tmp_path, tiny_llava)
    result: dict = {}
    t = threading.Thread(
        target=lambda: result.update(r=_run("--config", str(cfg), "caption", str(pics)))
    )
    t.start()
    try:
        wait_for(
            lambda: gate.with_name("gate.reached").exists() or "r" in result,
            120,
            "a.jpg at the model",
        )
        assert "r" not in result, result
        os.rename(pics / "sub", pics / "other" / "moved")
        os.symlink(pics / "other" / "moved", pics / "sub")
    finally:
        gate.touch()
        t.join(240)
    code, out, err = result["r"]
    assert code == 0, out + err
    reason = (
        f"folder {pics / 'sub'} is now a symbolic link; nothing is written through it; "
        "not captioned there (captioned once it is a folder again)"
    )
    assert f"skipped: {image}: {reason}" in out.splitlines(), out
    assert sorted(os.listdir(pics / "other" / "moved")) == ["a.jpg"]
    assert str(image) not in _rows(tmp_path / "index.db")
    _, status, _ = _run("--config", str(cfg), "status")
    assert f"  {image}: {reason}" in status

    os.unlink(pics / "sub")
    os.rename(pics / "other" / "moved", pics / "sub")
    code, out, _ = _run("--config", str(cfg), "caption", str(pics))
    assert code == 0 and "1 new, 1 up to date, 0 failed" in out.splitlines(), out
    row = _rows(tmp_path / "index.db")[str(image)]
    assert (pics / "sub" / "a.txt").read_text() == row["caption"] + "\n"
    _, status, _ = _run("--config", str(cfg), "status")
    assert "skipped" not in status


def test_unlink_and_rename_of_our_sidecar_do_not_follow_a_swapped_folder(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    sha = write_atomic(root / "sub" / "a.txt", "our caption\n")
    (outside / "a.txt").write_text("our caption\n")  # the same bytes, outside
    (root / "sub").rename(root / "real")
    os.symlink(outside, root / "sub")
    assert not remove_if_ours(root, root / "sub" / "a.txt", sha)
    with pytest.raises(FolderMoved, match="is now a symbolic link"):
        rename_if_ours(root, root / "sub" / "a.txt", root / "sub" / "b.txt", sha)
    with pytest.raises(FolderMoved):
        rename_if_ours(root, root / "real" / "a.txt", root / "sub" / "b.txt", sha)
    assert sorted(os.listdir(outside)) == ["a.txt"]
    assert (root / "real" / "a.txt").read_text() == "our caption\n"
    # Through the real folder both work.
    rename_if_ours(root, root / "real" / "a.txt", root / "real" / "b.txt", sha)
    assert remove_if_ours(root, root / "real" / "b.txt", sha)
    assert os.listdir(root / "real") == []


# --- 4. files that look like our temp files --------------------------------------------------

OLD = time.time() - 3600


def _temp_lookalikes(folder: Path) -> dict[str, bytes]:
    """Files a user may have, each named like our temp files but not one we left."""
    files = {
        "notes.watcher-tmp": b"my notes\n",
        "x.watcher-tmp": b"x\n",
        ".x.watcher-tmp": b"hidden\n",
        "a.jpg.watcher-tmp": b"not ours\n",
        ".0123456789AB.watcher-tmp": b"upper-case hex: not ours\n",
        ".0123456789abc.watcher-tmp": b"13 hex digits: not ours\n",
        "sub/.0123456789a.watcher-tmp": b"11 hex digits: not ours\n",
        "sub/.aaaaaaaaaaaa.watcher-tmp.txt": b"another suffix\n",
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        os.utime(folder / name, (OLD, OLD))
    return files


def _finished_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_only_our_own_old_temp_files_are_removed_by_caption(tmp_path, tiny_llava):
    pics = tmp_path / "pics"
    distinct_image(0, pics / "a.jpg")
    files = _temp_lookalikes(pics)
    # Exactly our pattern (the writer's pid, 8 random hex digits), written a moment ago by a
    # process that still runs (this one, or pid 1): a write may be under way, so kept.
    young = [
        pics / "sub" / f".{os.getpid():08x}abcdef01.watcher-tmp",
        pics / "sub" / f".{1:08x}abcdef02.watcher-tmp",
        pics / "sub" / ".abcdef012345.watcher-tmp",
    ]  # an earlier version's, young
    for p in young:
        p.write_text("caption being written\n")
    # Exactly our pattern and its writer is gone (killed mid-write), or old: leftovers.
    gone_pid = _finished_pid()
    leftovers = [
        pics / "sub" / f".{gone_pid:08x}0badf00d.watcher-tmp",
        pics / "sub" / ".fedcba987654.watcher-tmp",
    ]
    for p in leftovers:
        p.write_text("half a capt")
    os.utime(leftovers[1], (OLD, OLD))
    # Our pattern, old, but a link: never followed nor removed.
    os.symlink(pics / "notes.watcher-tmp", pics / ".bbbbbbbbbbbb.watcher-tmp")
    cfg = _config(tmp_path, tiny_llava, log={"level": "info", "format": "json"})

    code, out, err = _run("--config", str(cfg), "caption", str(pics))

    assert code == 0, out + err
    for name, data in files.items():
        assert (pics / name).read_bytes() == data, name
    assert all(p.read_text() == "caption being written\n" for p in young)
    assert (pics / ".bbbbbbbbbbbb.watcher-tmp").is_symlink()
    assert not any(p.exists() for p in leftovers)
    removed = [
        json.loads(x)
        for x in err.splitlines()
        if "removed a temp file left by an interrupted write" in x
    ]
    assert sorted(e["path"] for e in removed) == sorted(str(p) for p in leftovers)


@pytest.mark.slow  # 30-50 s on 2 busy cores (daemon start-ups)
def test_the_daemon_leaves_temp_lookalikes_alone(tmp_path, tiny_llava):
    watched = tmp_path / "watched"
    watched.mkdir()
    files = _temp_lookalikes(watched)
    cfg = _config(tmp_path, tiny_llava, [{"path": str(watched), "settle_seconds": 0.2}])
    with Daemon(cfg, tmp_path) as d:
        wait_for(lambda: d.logged("scan done"), 60, "the start-up scan")
        # Moved in while it runs, next to an image.
        (tmp_path / "notes2.watcher-tmp").write_text("more notes\n")
        os.rename(tmp_path / "notes2.watcher-tmp", watched / "sub" / "notes2.watcher-tmp")
        distinct_image(3, watched / "sub" / "b.jpg")
        wait_for(lambda: d.captioned(watched / "sub" / "b.jpg"), 60, "b.jpg captioned")
    for name, data in files.items():
        assert (watched / name).read_bytes() == data, name
    assert (watched / "sub" / "notes2.watcher-tmp").read_text() == "more notes\n"


# --- 6. a sparse, huge sidecar ---------------------------------------------------------------

_CAPTION_WITH_RSS = """
import resource, sys
from watcher.cli import main
code = main(sys.argv[1:])
print("maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(code)
"""


@pytest.mark.slow  # 30-50 s on 2 busy cores (daemon start-ups)
def test_a_sparse_2gb_sidecar_is_left_alone_without_being_read(tmp_path, tiny_llava):
    pics = tmp_path / "pics"
    distinct_image(0, pics / "big.jpg")
    distinct_image(1, pics / "over.jpg")
    distinct_image(2, pics / "small.jpg")
    with open(pics / "big.txt", "wb") as f:
        f.truncate(2 * 2**30)  # 2 GiB, no blocks on disk
    (pics / "over.txt").write_bytes(b"y" * (2**20 + 1))  # just over the cap
    cfg = _config(tmp_path, tiny_llava)

    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _CAPTION_WITH_RSS, "--config", str(cfg), "caption", str(pics)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    elapsed = time.monotonic() - t0

    assert proc.returncode == 0, proc.stdout + proc.stderr
    reason = "larger than 1 MiB, so not ours; left alone"
    assert f"sidecar kept: {pics / 'big.txt'}: {reason}" in proc.stdout.splitlines()
    assert f"sidecar kept: {pics / 'over.txt'}: {reason}" in proc.stdout.splitlines()
    assert "3 new, 0 up to date, 2 existing sidecars left alone, 0 failed" in proc.stdout
    st = os.stat(pics / "big.txt")
    assert st.st_size == 2 * 2**30 and st.st_blocks == 0  # untouched, still sparse
    rows = _rows(tmp_path / "index.db")
    big = rows[str(pics / "big.jpg")]
    assert big["sidecar_state"] == "kept" and big["sidecar_error"] == reason
    assert big["caption"] == big["model_caption"]  # nothing of it was read into the index
    # Reading it whole cost 2 GiB of memory (and seconds of hashing); now it costs nothing.
    maxrss_mib = int(proc.stdout.split("maxrss_kib")[1].split()[0]) / 1024
    assert maxrss_mib < 1024, (maxrss_mib, elapsed)


# --- 10. sidecars kept: listed, and their text is what the index holds ----------------------


def test_kept_sidecars_are_listed_and_their_text_is_searchable(tmp_path, tiny_llava):
    pics, never = tmp_path / "pics", tmp_path / "never"
    for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg", "f.jpg"]):
        distinct_image(i, pics / name)
    distinct_image(7, never / "e.jpg")
    (pics / "a.txt").write_text("hand written zzyzxzebra caption\n")  # the user's own
    (pics / "f.txt").write_bytes(b"caf\xe9 latin1 qqvvbanjo\n")  # not UTF-8
    (never / "e.txt").write_text("older xxwombat words\n")
    cfg = _config(
        tmp_path, tiny_llava, [{"path": str(pics)}, {"path": str(never), "overwrite": "never"}]
    )

    code, out, err = _run("--config", str(cfg), "caption", str(pics), str(never))

    assert code == 0, out + err
    lines = out.splitlines()
    assert (
        f"sidecar kept: {pics / 'a.txt'}: not written by watcher (your own); not "
        "overwritten" in lines
    )
    assert (
        f"sidecar kept: {pics / 'f.txt'}: not written by watcher (your own); not "
        "overwritten" in lines
    )
    assert f"sidecar kept: {never / 'e.txt'}: overwrite: never; not overwritten" in lines
    assert (pics / "a.txt").read_text() == "hand written zzyzxzebra caption\n"
    rows = _rows(tmp_path / "index.db")
    a = rows[str(pics / "a.jpg")]
    assert a["caption"] == "hand written zzyzxzebra caption"
    assert a["model_caption"] and a["model_caption"] != a["caption"]
    assert rows[str(pics / "f.jpg")]["caption"] == "caf\ufffd latin1 qqvvbanjo"
    model_c = rows[str(pics / "c.jpg")]["caption"]
    assert (pics / "c.txt").read_text() == model_c + "\n"

    # The user edits our sidecar; the image is examined again (here: it was touched).
    (pics / "c.txt").write_text("my own zzquokka words\n")
    os.utime(pics / "c.jpg", (OLD, OLD))
    code, out, err = _run("--config", str(cfg), "caption", str(pics))
    assert code == 0, out + err
    assert f"sidecar kept: {pics / 'c.txt'}: edited by you; not overwritten" in out.splitlines()
    assert (pics / "c.txt").read_text() == "my own zzquokka words\n"
    c = _rows(tmp_path / "index.db")[str(pics / "c.jpg")]
    assert (c["caption"], c["model_caption"]) == ("my own zzquokka words", model_c)

    for word, image in (
        ("zzyzxzebra", pics / "a.jpg"),
        ("zzquokka", pics / "c.jpg"),
        ("qqvvbanjo", pics / "f.jpg"),
        ("xxwombat", never / "e.jpg"),
    ):
        code, found, _ = _run("--config", str(cfg), "search", word)
        assert code == 0 and found.splitlines()[0] == str(image), (word, found)

    code, status, _ = _run("--config", str(cfg), "status")
    assert "sidecars kept (edited by you; not overwritten): 4" in status
    assert f"  {pics / 'c.txt'}: edited by you; not overwritten" in status
    assert f"  {never / 'e.txt'}: overwrite: never; not overwritten" in status
    _, js, _ = _run("--config", str(cfg), "status", "--json")
    report = json.loads(js)
    assert report["sidecars_kept"] == 4
    assert {k["sidecar"] for k in report["sidecars_kept_list"]} == {
        str(pics / "a.txt"),
        str(pics / "c.txt"),
        str(pics / "f.txt"),
        str(never / "e.txt"),
    }


def test_schema_1_database_is_migrated_with_the_model_caption_beside(tmp_path):
    db_path = tmp_path / "index.db"
    db = connect(db_path)
    con = db.conn
    con.execute("ALTER TABLE images DROP COLUMN model_caption")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.execute(
        "INSERT INTO images (path, root, sha256, size, mtime_ns, width, height, caption, "
        "task, outputs, model, revision, sidecar, sidecar_sha256, sidecar_state, "
        "sidecar_error, created, updated) VALUES ('/p/a.jpg', '/p', 'x', 1, 1, 1, 1, "
        "'a red kettle', 'short', '{}', 'm', NULL, '/p/a.txt', ?, 'written', NULL, 0, 0)",
        (text_hash("a red kettle\n"),),
    )
    con.close()

    code, out, _ = _run("--db", str(db_path), "search", "kettle")

    assert code == 0 and out.splitlines()[0] == "/p/a.jpg"
    row = _rows(db_path)["/p/a.jpg"]
    assert (row["caption"], row["model_caption"]) == ("a red kettle", "a red kettle")
    with contextlib.closing(sqlite3.connect(db_path)) as c:
        version = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert int(version[0]) == SCHEMA_VERSION
