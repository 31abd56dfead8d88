"""Hostile inputs and faults, end to end (issue 6): every case leaves the daemon running, the
file's fate recorded with a clear reason, and no data lost or half-written.

Most cases run the real pipeline in-process through `watcher caption` (fast); the ones about
the daemon itself (it keeps running; files deleted or replaced mid-caption; a read-only folder
and `watcher retry`; a full disk) run the real daemon as a subprocess. Faults that cannot be
produced for real on a CI machine go through `watcher.faults`, at the one call where the real
error would arise, raising the real exception type. Each test asserts what a user sees: the
sidecar, the index row, `watcher status`, the log.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import images
import pytest
from daemon_harness import Daemon, memory_mib, sidecar_ready, wait_for, write_config
from daemon_harness import run_cli as _run
from images import distinct_image
from PIL import Image

from watcher import faults
from watcher.config import ConfigError, parse_config
from watcher.outputs.sidecar import TEMP_SUFFIX
from watcher.pipeline.decode import HEIF_AVAILABLE, HEIF_MISSING

MAX_PIXELS = 50_000_000  # configured in these tests: the bomb (900 Mpx) is refused by it
OLD = (1_000_000_000, 1_000_000_000)  # an mtime long past: a broken file is not still arriving

# In-process `watcher caption` runs have no deadline of their own: a pipeline that loses a job
# would wait forever. Fail instead.
pytestmark = pytest.mark.timeout(240)


# --- helpers ----------------------------------------------------------------------------------


def _config(tmp_path: Path, model: Path, *, batch_size: int = 4, **extra) -> Path:
    """The harness's config with this file's defaults: a smaller max_pixels, quick retries."""
    return write_config(
        tmp_path,
        model,
        [],
        **{
            "model": {
                "backend": "transformers",
                "path": str(model),
                "batch_size": batch_size,
                "max_tokens": 4,
                "isolate": False,
            },
            "max_pixels": MAX_PIXELS,
            "retry_backoff": 0.05,
            **extra,
        },
    )


def _events(log_text: str, event: str) -> list[dict]:
    found = []
    for line in log_text.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == event:
            found.append(e)
    return found


def _rows(db: Path) -> dict[str, dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return {r["path"]: dict(r) for r in con.execute("SELECT * FROM images")}
    finally:
        con.close()


def _jobs(db: Path) -> dict[str, tuple[str, str | None]]:
    con = sqlite3.connect(db)
    try:
        return {p: (s, e) for p, s, e in con.execute("SELECT path, state, error FROM jobs")}
    finally:
        con.close()


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


def _sidecar_matches_row(row: dict) -> bool:
    side = Path(row["sidecar"])
    return side.is_file() and side.read_text(encoding="utf-8") == row["caption"] + "\n"


class Recorder:
    """The real loaded backend, with a record of what the model was given."""

    def __init__(self, backend, before_first_call=None) -> None:
        self.backend = backend
        self.name, self.revision = backend.name, backend.revision
        self.max_batch = backend.max_batch
        self.calls: list[list[Image.Image]] = []
        self.before_first_call = before_first_call

    def describe(self, images_, tasks):
        self.calls.append([im.copy() for im in images_])
        if len(self.calls) == 1 and self.before_first_call is not None:
            self.before_first_call()
        return self.backend.describe(images_, tasks)

    def close(self) -> None:
        self.backend.close()

    @property
    def seen(self) -> list[Image.Image]:
        return [im for call in self.calls for im in call]

    def by_size(self, size: tuple[int, int]) -> Image.Image:
        [im] = [im for im in self.seen if im.size == size]
        return im


class Recording:
    """What the `recorder` fixture gives a test."""

    def __init__(self) -> None:
        self.backend: Recorder | None = None
        self.pipeline = None
        self.queued_before_first_call = 0

    def fill_queue_first(self, at_least: int) -> None:
        """Hold the model's first call until `at_least` decoded images wait behind it, so the
        next batch is a real batch whatever the thread timing. (If a fault fired on an
        earlier call, that call already was a batch: no hold.)"""
        self.queued_before_first_call = at_least

    def _hold(self) -> None:
        if self.pipeline.worker.model_calls == 1:
            n = self.queued_before_first_call
            wait_for(lambda: self.pipeline.work_q.qsize() >= n, 30, f"{n} decoded images waiting")


@pytest.fixture
def recorder(monkeypatch):
    """Every `watcher caption` in the test loads the real model wrapped in a Recorder, and
    the Pipeline it builds is kept (to see its queues)."""
    import watcher.backends as backends
    from watcher.pipeline.stages import Pipeline

    real_load = backends.load_backend
    rec = Recording()

    def load(cfg, _log_cfg=None):  # in this process, to see what the model was given
        hold = rec._hold if rec.queued_before_first_call else None
        rec.backend = Recorder(real_load(cfg), hold)
        return rec.backend

    real_start = Pipeline.start

    def start(self):
        rec.pipeline = self
        real_start(self)

    monkeypatch.setattr(backends, "open_backend", load)
    monkeypatch.setattr(Pipeline, "start", start)
    return rec


@pytest.fixture
def inject():
    """watcher.faults in this process: `inject({...})` turns faults on, the test's end off."""
    yield faults.configure
    faults.configure(None)


def _close(a, b, tol=40) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=False))


def _mean(im: Image.Image, box=None) -> tuple[float, ...]:
    from PIL import ImageStat

    return tuple(ImageStat.Stat(im.crop(box) if box else im).mean)


# --- images: cases 1-4 and 11 (without pillow-heif) -------------------------------------------


def test_broken_files_fail_with_a_clear_reason_and_the_rest_is_captioned(
    tmp_path, tiny_llava, recorder
):
    pics = tmp_path / "pics"
    distinct_image(1, pics / "good.jpg")
    expected = {  # name -> the reason `watcher caption` and `watcher status` give
        "empty.jpg": (images.write_empty, "empty file (0 bytes)"),
        "truncated.jpg": (images.write_truncated_jpeg, "truncated or corrupt image: "),
        "notes.png": (images.write_text_as_png, "not an image (cannot identify image file)"),
        "bomb.png": (
            images.write_bomb_png,
            "image too large: 30000x30000 = 900.0 Mpx exceeds max_pixels (50.0 Mpx)",
        ),
    }
    if not HEIF_AVAILABLE:
        expected["iphone.heic"] = (images.write_fake_heic, HEIF_MISSING)
    for name, (write, _) in expected.items():
        write(pics / name)
        os.utime(pics / name, OLD)
    cfg = _config(tmp_path, tiny_llava)

    code, out, _ = _run("--config", str(cfg), "caption", str(pics))

    assert code == 1, out
    assert f"1 new, 0 up to date, {len(expected)} failed" in out
    for name, (_, reason) in expected.items():
        assert f"failed: {pics / name}: {reason}" in out, out
        assert not (pics / name).with_suffix(".txt").exists()
    assert _sidecar_matches_row(_rows(tmp_path / "index.db")[str(pics / "good.jpg")])
    assert list(_rows(tmp_path / "index.db")) == [str(pics / "good.jpg")]
    # The model saw the one good image, nothing else (the bomb was never decoded).
    assert [im.size for im in recorder.backend.seen] == [(96, 72)]
    code, status, _ = _run("--config", str(cfg), "status")
    assert f"queue: 0 pending, 0 running, 1 done, {len(expected)} failed" in status
    for name, (_, reason) in expected.items():
        assert f"  {pics / name}: {reason}" in status, status
    assert not _temp_files(pics)


# --- images: cases 5-10 (and 11 with pillow-heif) ---------------------------------------------


def test_awkward_images_reach_the_model_upright_rgb_and_downscaled(tmp_path, tiny_llava, recorder):
    pics = tmp_path / "pics"
    # Every image has its own size, so what the model saw can be told apart.
    images.write_big_jpeg(pics / "big photo.jpg", (8000, 6000))
    images.write_cmyk_jpeg(pics / "cmyk.jpg", (66, 50))  # pure red ink
    images.write_png16(pics / "deep.png", (256, 32))  # 16-bit gradient, black to white
    images.write_palette_png_transparent(pics / "palette.png", (70, 52))
    images.write_animated_gif(pics / "anim.gif", (72, 54))  # frames red, green, blue
    images.write_animated_webp(pics / "anim.webp", (74, 56))
    images.write_jpeg(pics / "rotated.jpg", (80, 60), images.RED, exif_orientation=6, marker=True)
    names = [
        "big photo.jpg",
        "cmyk.jpg",
        "deep.png",
        "palette.png",
        "anim.gif",
        "anim.webp",
        "rotated.jpg",
    ]
    if HEIF_AVAILABLE:
        Image.new("RGB", (78, 58), images.RED).save(pics / "iphone.heic", "HEIF", quality=95)
        names.append("iphone.heic")
    cfg = _config(tmp_path, tiny_llava, max_side=1024)

    code, out, _ = _run("--config", str(cfg), "caption", str(pics))

    assert code == 0, out
    assert f"{len(names)} new, 0 up to date, 0 failed" in out
    rows = _rows(tmp_path / "index.db")
    for name in names:
        assert _sidecar_matches_row(rows[str(pics / name)]), name
    seen = recorder.backend
    assert all(im.mode == "RGB" for im in seen.seen)
    # 5. 48 Mpx photo: the model got it downscaled to max_side; the index keeps its real size.
    big = seen.by_size((1024, 768))
    assert (
        rows[str(pics / "big photo.jpg")]["width"],
        rows[str(pics / "big photo.jpg")]["height"],
    ) == (8000, 6000)
    assert _mean(big, (0, 0, 1024, 40))[0] < _mean(big, (0, 728, 1024, 768))[0]  # red rises
    # 6. CMYK: red ink is red, not inverted or cyan.
    assert _close(_mean(seen.by_size((66, 50))), (237, 28, 36), 45)
    # 7. 16-bit: scaled to 8 bits, a gradient from black to white (not clipped to white).
    deep = seen.by_size((256, 32))
    assert _mean(deep, (0, 0, 16, 32))[0] < 30 and _mean(deep, (240, 0, 256, 32))[0] > 225
    # 8. palette + transparency: the transparent background is white, the square red.
    pal = seen.by_size((70, 52))
    assert _close(pal.getpixel((2, 2)), (255, 255, 255), 10)
    assert _close(pal.getpixel((35, 26)), (255, 0, 0), 10)
    # 9. animations: the first frame.
    assert _close(_mean(seen.by_size((72, 54))), images.RED)
    assert _close(_mean(seen.by_size((74, 56))), images.RED)
    # 10. EXIF orientation 6: upright (portrait), the stored top-left corner at the top right.
    rot = seen.by_size((60, 80))
    assert (
        rows[str(pics / "rotated.jpg")]["width"],
        rows[str(pics / "rotated.jpg")]["height"],
    ) == (60, 80)
    assert _close(rot.getpixel((56, 3)), (0, 0, 0)) and _close(rot.getpixel((3, 3)), images.RED)
    if HEIF_AVAILABLE:  # 11. with pillow-heif, HEIC is just another image
        assert _close(_mean(seen.by_size((78, 58))), images.RED)


# --- files and folders: case 12 ---------------------------------------------------------------


def test_awkward_file_names(tmp_path, tiny_llava, recorder):
    pics = tmp_path / "pics"
    names = [
        "with  spaces .jpg",
        "unicodé 日本語 🌸.png",
        "new\nline.jpg",
        "a" * 246 + ".jpg",  # 250 bytes
        "é" * 123 + ".jpg",  # 250 bytes in UTF-8, 127 characters
        "$(touch pwned) ; touch pwned2 `touch pwned3`.jpg",  # nothing may reach a shell
        "-rf.jpg",
    ]
    for i, name in enumerate(names):
        distinct_image(i, pics / name)
    # Two images with one 251-byte stem: the second gets `{name}.txt`, which at 259 bytes is
    # longer than a file name may be. Its caption is kept in the index, the sidecar pending.
    long_jpg, long_png = pics / ("b" * 251 + ".jpg"), pics / ("b" * 251 + ".png")
    distinct_image(20, long_jpg)
    distinct_image(21, long_png)
    cfg = _config(tmp_path, tiny_llava)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code, out, err = _run("--config", str(cfg), "caption", str(pics))
    finally:
        os.chdir(cwd)

    assert code == 0, out
    assert f"{len(names) + 2} new, 0 up to date, 0 failed" in out
    rows = _rows(tmp_path / "index.db")
    assert len(rows) == len(names) + 2
    for name in names:
        row = rows[str(pics / name)]
        assert row["sidecar"] == str(pics / (name.rsplit(".", 1)[0] + ".txt"))
        assert _sidecar_matches_row(row), name
    assert _sidecar_matches_row(rows[str(long_jpg)])
    blocked = rows[str(long_png)]
    reason = "cannot write sidecar: File name too long (ENAMETOOLONG)"
    assert (blocked["sidecar_state"], blocked["sidecar_error"]) == ("pending", reason)
    assert blocked["caption"]  # the work is in the index
    assert f"sidecar pending: {long_png}: {reason}" in out
    _, status, _ = _run("--config", str(cfg), "status")
    assert "sidecars pending" in status and f"{long_png}: {reason}" in status
    assert not [p for p in tmp_path.rglob("pwned*")], "a file name reached a shell"
    assert not _temp_files(pics)
    # A newline in a name is escaped on screen, so each image stays on one line.
    code, found, _ = _run(
        "--config", str(cfg), "search", rows[str(pics / "new\nline.jpg")]["caption"]
    )
    assert code == 0 and f"{pics}/new\\x0aline.jpg" in found.splitlines()


# --- files and folders: case 13 ---------------------------------------------------------------


class OpenWatch:
    """inotify on a folder: records every open of a file in it, by anyone."""

    def __init__(self, folder: Path) -> None:
        from watchdog.observers import Observer

        self.opened: list[str] = []
        self._observer = Observer()
        watch = self

        class Handler:
            def dispatch(self, event) -> None:
                if event.event_type == "opened":
                    watch.opened.append(os.fsdecode(event.src_path))

        self._observer.schedule(Handler(), str(folder), recursive=True)
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(5)


def _outside_tree(tmp_path: Path) -> tuple[Path, Path, dict]:
    outside = tmp_path / "outside"
    secret = distinct_image(40, outside / "secret.jpg")
    distinct_image(41, outside / "sub" / "other.jpg")
    (outside / "notes.txt").write_text("the user's own notes, outside the watched folder\n")
    listing = {p: p.stat().st_mtime_ns for p in outside.rglob("*")}
    return outside, secret, listing


def _assert_outside_untouched(outside: Path, listing: dict, watch: OpenWatch) -> None:
    assert {p: p.stat().st_mtime_ns for p in outside.rglob("*")} == listing, (
        "something was written outside the watched folder"
    )
    assert watch.opened == [], f"files outside the watched folder were opened: {watch.opened}"
    # The watch works: opening the file ourselves is seen.
    (outside / "secret.jpg").read_bytes()
    wait_for(lambda: watch.opened, 10, "inotify to see our own open")


def test_symlink_loops_and_links_out_of_the_root(tmp_path, tiny_llava, recorder):
    pics = tmp_path / "pics"
    outside, secret, listing = _outside_tree(tmp_path)
    distinct_image(1, pics / "real.jpg")
    (pics / "inner link.jpg").symlink_to("real.jpg")  # stays inside: followed
    (pics / "loop.jpg").symlink_to("loop.jpg")
    (pics / "ping.jpg").symlink_to("pong.jpg")
    (pics / "pong.jpg").symlink_to("ping.jpg")
    (pics / "escape.jpg").symlink_to(secret)
    (pics / "escape-dir").symlink_to(outside)  # a folder link out of the root
    (pics / "sub").mkdir()
    (pics / "sub" / "up").symlink_to("..")  # folder loops
    (pics / "sub" / "self").symlink_to(".")
    # Sidecar names that are not plain files: a link out of the root and a named pipe (whose
    # open would block). Neither is opened; both are left alone, as a user's own files.
    distinct_image(2, pics / "linked.jpg")
    (pics / "linked.txt").symlink_to(outside / "notes.txt")
    distinct_image(3, pics / "piped.jpg")
    os.mkfifo(pics / "piped.txt")
    cfg = _config(tmp_path, tiny_llava)
    watch = OpenWatch(outside)
    try:
        code, out, err = _run("--config", str(cfg), "caption", str(pics))
        _assert_outside_untouched(outside, listing, watch)
    finally:
        watch.stop()

    assert code == 0, out
    assert (
        "4 new, 0 up to date (1 copy of an identical image, no model work), "
        "2 existing sidecars left alone, 0 failed"
    ) in out
    rows = _rows(tmp_path / "index.db")
    assert sorted(rows) == [
        str(pics / n) for n in ("inner link.jpg", "linked.jpg", "piped.jpg", "real.jpg")
    ]
    assert _sidecar_matches_row(rows[str(pics / "real.jpg")])
    assert _sidecar_matches_row(rows[str(pics / "inner link.jpg")])
    for name in ("linked.jpg", "piped.jpg"):
        assert rows[str(pics / name)]["sidecar_state"] == "kept"
    assert (pics / "linked.txt").is_symlink() and stat.S_ISFIFO(
        os.lstat(pics / "piped.txt").st_mode
    )
    skipped = {e["path"]: e["reason"] for e in _events(err, "skipped")}
    loop = "symbolic link loop (too many levels of symbolic links)"
    assert skipped == {
        str(pics / "loop.jpg"): loop,
        str(pics / "ping.jpg"): loop,
        str(pics / "pong.jpg"): loop,
        str(pics / "escape.jpg"): "symbolic link points outside the watched folder; not followed",
    }
    assert sorted(im.size for im in recorder.backend.seen) == [(96, 72)] * 3
    # What the user sees: each skipped name and why, on stdout and in `watcher status`
    # (skipped is not failed: the exit code stays 0).
    assert "0 failed, 4 skipped" in out
    expected = [
        f"{pics / name}: {reason}"
        for name, reason in sorted((Path(p).name, r) for p, r in skipped.items())
    ]
    assert [
        ln.removeprefix("skipped: ") for ln in out.splitlines() if ln.startswith("skipped: ")
    ] == expected
    _, status, _ = _run("--config", str(cfg), "status")
    assert "skipped, not captioned: 4" in status
    assert (
        sorted(
            ln.strip()
            for ln in status.splitlines()
            if ln.startswith("  ") and "symbolic link" in ln
        )
        == expected
    )

    # Fixed: the loop becomes a real image. The next run captions it and forgets the skip.
    (pics / "loop.jpg").unlink()
    distinct_image(4, pics / "loop.jpg")
    code, out, _ = _run("--config", str(cfg), "caption", str(pics))
    assert code == 0 and "1 new, 4 up to date" in out and "3 skipped" in out, out
    _, status, _ = _run("--config", str(cfg), "status")
    assert "skipped, not captioned: 3" in status and f"{pics / 'loop.jpg'}:" not in status


def test_decode_refuses_a_link_out_of_the_root_without_opening_it(tmp_path):
    """The last check before the open, for a link that appears after the scan or event."""
    from watcher.messages import Job
    from watcher.pipeline.decode import DecodeError, prepare

    outside, secret, listing = _outside_tree(tmp_path)
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "late.jpg").symlink_to(secret)
    watch = OpenWatch(outside)
    try:
        with pytest.raises(DecodeError) as e:
            prepare(Job(1, pics / "late.jpg", pics, 0, 1), max_pixels=MAX_PIXELS, max_side=512)
        assert e.value.reason == ("symbolic link points outside the watched folder; not followed")
        _assert_outside_untouched(outside, listing, watch)
    finally:
        watch.stop()


# --- model: cases 18 and 19 -------------------------------------------------------------------


def _leader_then_rest(pics: Path, rest: dict[str, int]) -> int:
    """`pics/leader.jpg`, then the rest one folder down: a scan queues the leader first (files
    before subfolders), so with one decode thread it is the model's first image."""
    distinct_image(0, pics / "leader.jpg")
    for name, i in rest.items():
        distinct_image(i, pics / name)
    return 1 + len(rest)


def test_out_of_memory_splits_the_batch_and_shrinks_it_for_good(
    tmp_path, tiny_llava, recorder, inject
):
    pics = tmp_path / "pics"
    n = _leader_then_rest(pics, {f"more/{i:02d}.jpg": i for i in range(1, 12)})
    cfg = _config(tmp_path, tiny_llava, batch_size=8, decode_threads=1)
    # Seam at the model call: a batch of 3 or more runs out of GPU memory.
    inject({"model": {"error": "oom", "min_batch": 3}})
    recorder.fill_queue_first(4)

    code, out, err = _run("--config", str(cfg), "caption", str(pics))

    assert code == 0, out
    assert f"{n} new, 0 up to date, 0 failed" in out
    shrinks = _events(err, "out of memory: batch size reduced")
    assert shrinks and shrinks[0]["old"] == 8, err
    assert all(a["new"] == b["old"] for a, b in zip(shrinks, shrinks[1:], strict=False))
    assert shrinks[-1]["new"] <= 2
    sizes = [len(call) for call in recorder.backend.calls]
    assert max(sizes) <= 2 and sum(sizes) == n  # every image ran once, in batches that fit
    rows = _rows(tmp_path / "index.db")
    assert len(rows) == n and all(_sidecar_matches_row(r) for r in rows.values())


def test_out_of_memory_on_a_single_image_is_retried_then_reported(
    tmp_path, tiny_llava, recorder, inject
):
    pics = tmp_path / "pics"
    distinct_image(1, pics / "fine.jpg")
    distinct_image(2, pics / "huge.jpg")
    cfg = _config(tmp_path, tiny_llava, batch_size=1, max_attempts=2)
    inject({"model": {"error": "oom", "match": "huge.jpg"}})

    code, out, err = _run("--config", str(cfg), "caption", str(pics))

    assert code == 1
    reason = "out of memory running the model (gave up after 2 attempts)"
    assert f"failed: {pics / 'huge.jpg'}: {reason}" in out
    assert [e["path"] for e in _events(err, "will retry")] == [str(pics / "huge.jpg")]
    assert sidecar_ready(pics / "fine.jpg") and not (pics / "huge.txt").exists()


def test_model_error_on_one_image_fails_only_that_image(tmp_path, tiny_llava, recorder, inject):
    pics = tmp_path / "pics"
    rest = {"a/poison.jpg": 50, **{f"a/b/{i:02d}.jpg": i for i in range(1, 8)}}
    n = _leader_then_rest(pics, rest)
    shutil.copy(pics / "a" / "poison.jpg", pics / "a" / "poison-copy.jpg")  # same bytes
    n += 1
    cfg = _config(tmp_path, tiny_llava, batch_size=16, decode_threads=1)
    message = "CUDA error: device-side assert triggered"
    inject({"model": {"error": "exception", "match": "poison", "message": message}})
    recorder.fill_queue_first(3)

    code, out, err = _run("--config", str(cfg), "caption", str(pics))

    assert code == 1
    assert f"{n - 2} new, 0 up to date, 2 failed" in out
    reason = f"model error: RuntimeError: {message}"
    for name in ("poison.jpg", "poison-copy.jpg"):
        assert f"failed: {pics / 'a' / name}: {reason}" in out
        assert not (pics / "a" / name).with_suffix(".txt").exists()
    [retry] = _events(err, "model error on a batch; retrying one image at a time")
    assert retry["batch"] > 1
    rows = _rows(tmp_path / "index.db")
    assert len(rows) == n - 2 and all(_sidecar_matches_row(r) for r in rows.values())
    _, status, _ = _run("--config", str(cfg), "status")
    assert f"{pics / 'a' / 'poison.jpg'}: {reason}" in status


# --- disk full: case 15 (in-process parts; the daemon with a full tmpfs is further down) ----


def test_sidecar_write_hits_a_full_disk_then_succeeds_on_retry(
    tmp_path, tiny_llava, recorder, inject
):
    pics = tmp_path / "pics"
    for i in range(3):
        distinct_image(i, pics / f"{i}.jpg")
    cfg = _config(tmp_path, tiny_llava, batch_size=4)
    inject({"sidecar_write": {"errno": "ENOSPC", "match": "1.txt", "times": 1}})

    code, out, err = _run("--config", str(cfg), "caption", str(pics))

    assert code == 0, out
    [retry] = _events(err, "will retry")
    assert retry["path"] == str(pics / "1.jpg")
    assert retry["reason"] == "writing sidecar: No space left on device (ENOSPC)"
    rows = _rows(tmp_path / "index.db")
    assert len(rows) == 3 and all(_sidecar_matches_row(r) for r in rows.values())
    assert not _temp_files(pics)


@pytest.mark.parametrize("under_systemd", [False, True])
def test_read_only_file_system_keeps_the_caption_and_says_how_to_fix_it(
    tmp_path, tiny_llava, inject, monkeypatch, under_systemd
):
    # A folder added to the running service by `watcher reload` is outside the unit's
    # ReadWritePaths: writing there fails with EROFS. (Seam: mounting needs privileges.)
    pics = tmp_path / "pics"
    distinct_image(0, pics / "new.jpg")
    cfg = _config(tmp_path, tiny_llava)
    if under_systemd:
        monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    else:
        monkeypatch.delenv("INVOCATION_ID", raising=False)
    inject({"sidecar_write": {"errno": "EROFS"}})

    code, out, _ = _run("--config", str(cfg), "caption", str(pics))

    assert code == 0, out
    reason = "cannot write sidecar: Read-only file system (EROFS)"
    if under_systemd:
        reason += (
            "; the service can write only the folders it was installed with: run "
            "`watcher service install --now` (it restarts the service), then "
            "`watcher retry --all`"
        )
    assert f"sidecar pending: {pics / 'new.jpg'}: {reason}" in out.splitlines()
    row = _rows(tmp_path / "index.db")[str(pics / "new.jpg")]
    assert (row["sidecar_state"], row["sidecar_error"]) == ("pending", reason)
    assert row["caption"] and not (pics / "new.txt").exists()


def test_database_full_at_commit_keeps_the_captions_and_writes_them_later(
    tmp_path, tiny_llava, recorder, inject
):
    pics = tmp_path / "pics"
    for i in range(6):
        distinct_image(i, pics / f"{i}.jpg")
    cfg = _config(tmp_path, tiny_llava, batch_size=8, max_attempts=5)
    inject({"db_commit": {"times": 2}})

    code, out, err = _run("--config", str(cfg), "caption", str(pics))

    assert code == 0, out
    assert "6 new, 0 up to date, 0 failed" in out
    assert len(_events(err, "database write failed; will write again")) == 2
    # The captions waited in memory: the model ran once per image, not again.
    assert sum(len(c) for c in recorder.backend.calls) == 6
    assert len(_events(err, "captioned")) == 6
    rows = _rows(tmp_path / "index.db")
    assert len(rows) == 6 and all(_sidecar_matches_row(r) for r in rows.values())
    assert set(_jobs(tmp_path / "index.db").values()) == {("done", None)}
    assert not _temp_files(pics)


def test_database_full_for_longer_hands_the_jobs_back_to_the_queue(
    tmp_path, tiny_llava, recorder, inject
):
    pics = tmp_path / "pics"
    for i in range(2):
        distinct_image(i, pics / f"{i}.jpg")
    cfg = _config(tmp_path, tiny_llava, batch_size=8, max_attempts=2)
    inject({"db_commit": {"times": 3}})  # more failures in a row than max_attempts

    code, out, err = _run("--config", str(cfg), "caption", str(pics))

    assert code == 0, out
    assert _events(err, "database write failed; jobs will be retried")
    rows = _rows(tmp_path / "index.db")
    assert len(rows) == 2 and all(_sidecar_matches_row(r) for r in rows.values())
    assert set(_jobs(tmp_path / "index.db").values()) == {("done", None)}


# --- security ---------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o027, 0o077])
def test_database_and_sidecars_get_the_users_umask(tmp_path, tiny_llava, umask):
    pics = tmp_path / "pics"
    distinct_image(1, pics / "a.jpg")
    cfg = _config(tmp_path, tiny_llava)
    old = os.umask(umask)
    try:
        code, out, _ = _run("--config", str(cfg), "caption", str(pics))
    finally:
        os.umask(old)
    assert code == 0, out
    # SQLite creates files 0644 and sidecars are opened 0666, both less the umask.
    for path, mode in ((tmp_path / "index.db", 0o644), (pics / "a.txt", 0o666)):
        assert path.stat().st_mode & 0o777 == mode & ~umask, path


def test_no_subprocess_takes_a_shell_or_a_string_command():
    """No path (or anything else) can reach a shell: no os.system/os.popen, and every
    subprocess call gets an argument list without shell=True."""
    root = Path(__file__).parent.parent / "watcher"
    problems = []
    for src in sorted(root.rglob("*.py")):
        tree = ast.parse(src.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            if (
                func in ("os.system", "os.popen")
                or func.startswith("os.exec")
                or func.startswith("os.spawn")
            ):
                problems.append(f"{src.name}:{node.lineno}: {func}")
            for kw in node.keywords:
                if kw.arg == "shell" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    problems.append(f"{src.name}:{node.lineno}: shell=")
            if (
                func.startswith("subprocess.")
                and node.args
                and isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp))
            ):
                problems.append(f"{src.name}:{node.lineno}: {func} with a string command")
    assert problems == []


@pytest.mark.parametrize(
    "revision, message",
    [
        (None, "model.revision: remote code is only trusted on a pinned revision"),
        ("main", "model.revision: expected a tag or commit sha, not a branch; got 'main'"),
    ],
)
def test_trust_remote_code_is_refused_for_an_unpinned_revision(revision, message):
    model = {"backend": "transformers", "id": "someone/some-vlm", "trust_remote_code": True}
    if revision is not None:
        model["revision"] = revision
    with pytest.raises(ConfigError, match=message):
        parse_config({"model": model})
    pinned = parse_config({"model": {**model, "revision": "0123456789abcdef" * 2 + "01234567"}})
    assert pinned.model.trust_remote_code


# --- the daemon -------------------------------------------------------------------------------


def _status(cfg: Path) -> str:
    code, out, _ = _run("--config", str(cfg), "status")
    assert code == 0
    return out


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_daemon_keeps_running_through_hostile_files(tmp_path, tiny_llava):
    watched = tmp_path / "watched"
    watched.mkdir()
    outside, secret, listing = _outside_tree(tmp_path)
    cfg = write_config(
        tmp_path,
        tiny_llava,
        [{"path": str(watched), "settle_seconds": 0.3}],
        max_pixels=MAX_PIXELS,
        max_attempts=2,
    )
    watch = OpenWatch(outside)
    try:
        with Daemon(cfg, tmp_path) as d:
            distinct_image(1, watched / "before.jpg")
            wait_for(lambda: d.captioned(watched / "before.jpg"), 60, "first sidecar")
            base_peak = memory_mib(d.proc.pid, "VmHWM")
            bad = {
                "empty.jpg": (images.write_empty, "empty file (0 bytes)"),
                "truncated.jpg": (images.write_truncated_jpeg, "truncated or corrupt image: "),
                "notes.png": (
                    images.write_text_as_png,
                    "not an image (cannot identify image file)",
                ),
                "bomb.png": (
                    images.write_bomb_png,
                    "image too large: 30000x30000 = 900.0 Mpx exceeds max_pixels (50.0 Mpx)",
                ),
            }
            if not HEIF_AVAILABLE:
                bad["iphone.heic"] = (images.write_fake_heic, HEIF_MISSING)
            for name, (write, _) in bad.items():
                write(watched / name)
                os.utime(watched / name, OLD)  # not a copy still arriving: fail for good
            os.mkfifo(watched / "pipe.jpg")  # opening it would block: never opened
            (watched / "loop.jpg").symlink_to("loop.jpg")
            (watched / "escape.jpg").symlink_to(secret)

            for name, (_, reason) in bad.items():
                state = wait_for(
                    lambda n=name: (s := d.job_state(watched / n)) and s[0] == "failed" and s,
                    60,
                    f"{name} to fail",
                )
                assert state[1].startswith(reason), (name, state)
            distinct_image(2, watched / "after.jpg")
            wait_for(lambda: d.captioned(watched / "after.jpg"), 60, "a sidecar after them")

            assert d.proc.poll() is None, "the daemon died"
            status = _status(cfg)
            assert f"daemon: running (pid {d.proc.pid})" in status
            for name, (_, reason) in bad.items():
                assert f"  {watched / name}: {reason}" in status, status
                assert not (watched / name).with_suffix(".txt").exists()
            assert "skipped, not captioned: 3" in status, status
            for line in (
                f"  {watched / 'pipe.jpg'}: not a regular file",
                f"  {watched / 'loop.jpg'}: symbolic link loop (too many levels of symbolic links)",
                f"  {watched / 'escape.jpg'}: symbolic link points outside the "
                "watched folder; not followed",
            ):
                assert line in status.splitlines(), status
            assert sorted(d.rows()) == [str(watched / "after.jpg"), str(watched / "before.jpg")]
            skipped = {e["path"]: e["reason"] for e in d.logged("skipped")}
            assert skipped == {
                str(watched / "pipe.jpg"): "not a regular file",
                str(watched / "loop.jpg"): "symbolic link loop (too many levels of symbolic links)",
                str(watched / "escape.jpg"): "symbolic link points outside the watched "
                "folder; not followed",
            }
            # The bomb was refused by max_pixels, not by running out of memory: decoding it
            # would take 900 MB.
            grown = memory_mib(d.proc.pid, "VmHWM") - base_peak
            assert grown < 200, f"peak RSS grew by {grown:.0f} MiB"
        assert d.proc.returncode == 0
        _assert_outside_untouched(outside, listing, watch)
    finally:
        watch.stop()


def _unprivileged_wrapper() -> tuple[str, ...] | None:
    """How to run a process for which a chmod-ed folder is really read-only: as is when not
    root; as root without capabilities (setpriv) when root; None when neither works."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    cmd = (setpriv, "--inh-caps=-all", "--bounding-set=-all", "--")
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"ro-probe-{os.getpid()}"
    probe.mkdir(mode=0o555, exist_ok=True)
    try:
        r = subprocess.run(
            [*cmd, sys.executable, "-c", f"open({str(probe / 'x')!r}, 'w')"],
            capture_output=True,
            timeout=30,
        )
        return cmd if r.returncode != 0 and b"PermissionError" in r.stderr else None
    except OSError:
        return None
    finally:
        (probe / "x").unlink(missing_ok=True)
        probe.rmdir()


def _watcher(wrapper, cfg: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*wrapper, sys.executable, "-m", "watcher", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_read_only_folder_keeps_the_caption_and_retry_writes_the_sidecar(tmp_path, tiny_llava):
    watched = tmp_path / "readonly"
    image = distinct_image(1, watched / "a.jpg")
    wrapper = _unprivileged_wrapper()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    writable_again = tmp_path / "writable-again"
    if wrapper is None:  # root that cannot drop its capabilities: the seam at the write
        how = "seam: EACCES injected at the sidecar write"
        env["WATCHER_FAULTS"] = json.dumps(
            {"sidecar_write": {"errno": "EACCES", "until": str(writable_again)}}
        )
        wrapper = ()
    else:
        how = "real chmod 555" + (
            " (daemon run as root without capabilities, via setpriv)" if wrapper else ""
        )
    print(f"read-only folder: {how}")
    cfg = write_config(tmp_path, tiny_llava, [{"path": str(watched), "settle_seconds": 0.3}])
    reason = "cannot write sidecar: Permission denied (EACCES)"
    watched.chmod(0o555)
    try:
        with Daemon(cfg, tmp_path, env=env, wrapper=wrapper) as d:
            row = wait_for(lambda: d.rows().get(str(image)), 60, f"the index row ({how})")
            assert (row["sidecar_state"], row["sidecar_error"]) == ("pending", reason), how
            assert row["caption"] and d.job_state(image) == ("done", None)
            assert not (watched / "a.txt").exists() and not _temp_files(watched)
            assert d.logged(
                "sidecar not written; caption kept in the index", path=str(image), reason=reason
            )
            status = _status(cfg)
            assert (
                "sidecars pending (caption kept in the index; `watcher retry --all` once "
                "the reason is fixed): 1"
            ) in status
            assert f"  {image}: {reason}" in status

            still = _watcher(wrapper, cfg, "retry", "--all", env=env)
            assert still.returncode == 1, still.stderr
            assert f"sidecar still pending: {image}: {reason}" in still.stdout

            watched.chmod(0o755)
            writable_again.touch()
            done = _watcher(wrapper, cfg, "retry", "--all", env=env)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "1 pending sidecar written" in done.stdout
            assert (watched / "a.txt").read_text() == row["caption"] + "\n"
            after = d.rows()[str(image)]
            assert (after["sidecar_state"], after["sidecar_error"]) == ("written", None)
            assert "sidecars pending" not in _status(cfg)
            assert len(d.logged("captioned")) == 1, "the model ran again"
    finally:
        watched.chmod(0o755)


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str = "2m"):
    """A tiny tmpfs at `path`, if this machine lets us mount one; yields whether it did."""
    path.mkdir()
    mount = shutil.which("mount")
    ok = False
    if mount and os.geteuid() == 0:
        ok = (
            subprocess.run(
                [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                capture_output=True,
                timeout=30,
            ).returncode
            == 0
        )
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", str(path)], check=True, timeout=30)


def _fill(path: Path) -> None:
    """Write to `path` until the file system says ENOSPC."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 16, 1 << 10, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(chunk))
    finally:
        os.close(fd)
    with pytest.raises(OSError) as e:
        (path.parent / "probe").write_bytes(b"x")
    assert e.value.errno == errno.ENOSPC


def test_disk_full_while_writing_a_sidecar_is_retried_once_there_is_space(tmp_path, tiny_llava):
    small = tmp_path / "small"
    freed = tmp_path / "space-freed"
    with _small_tmpfs(small) as real:
        watched = small / "photos"
        image = distinct_image(1, watched / "a.jpg")
        env = {}
        if real:
            how = "real: a 2 MiB tmpfs, filled up"
            _fill(small / "filler")
        else:
            how = "seam: ENOSPC injected at the sidecar write (mounting is not allowed here)"
            env["WATCHER_FAULTS"] = json.dumps(
                {"sidecar_write": {"errno": "ENOSPC", "until": str(freed)}}
            )
        print(f"disk full: {how}")
        cfg = write_config(
            tmp_path, tiny_llava, [{"path": str(watched), "settle_seconds": 0.3}], max_attempts=30
        )
        reason = "writing sidecar: No space left on device (ENOSPC)"
        with Daemon(cfg, tmp_path, env=env) as d:
            wait_for(
                lambda: d.logged("will retry", path=str(image), reason=reason),
                60,
                f"a failed sidecar write ({how})",
            )
            # Nothing partial: no sidecar, no temp file, no index row; the job waits.
            assert not (watched / "a.txt").exists() and not _temp_files(small)
            assert str(image) not in d.rows()
            # The writer logs an outcome after its commit: the job already says why.
            assert d.job_state(image) in (("pending", reason), ("running", reason))
            if real:
                (small / "filler").unlink()
            freed.touch()
            wait_for(lambda: d.captioned(image), 60, "the sidecar once there is space")
            row = wait_for(lambda: d.rows().get(str(image)), 30, "the index row")
            assert _sidecar_matches_row(row)
            assert d.job_state(image) == ("done", None)
            assert d.proc.poll() is None
        assert not _temp_files(small)


def test_image_deleted_or_replaced_while_the_model_works(tmp_path, tiny_llava):
    watched = tmp_path / "watched"
    watched.mkdir()
    old_bytes = distinct_image(2, tmp_path / "old.jpg").read_bytes()
    new_bytes = distinct_image(3, tmp_path / "new.jpg").read_bytes()
    gate_deleted, gate_replaced = tmp_path / "gate-deleted", tmp_path / "gate-replaced"
    # Seam at the model call, for timing only: hold the call until the test has changed the
    # file system (the deletion and the replacement themselves are real).
    env = {
        "WATCHER_FAULTS": json.dumps(
            {
                "model": [
                    {"match": "doomed.jpg", "gate": str(gate_deleted), "times": 1},
                    {"match": "swapped.jpg", "gate": str(gate_replaced), "times": 1},
                ]
            }
        )
    }
    cfg = write_config(tmp_path, tiny_llava, [{"path": str(watched), "settle_seconds": 0.3}])
    reached = lambda gate: gate.with_name(gate.name + ".reached").exists()  # noqa: E731
    with Daemon(cfg, tmp_path, env=env) as d:
        # 16. Deleted while being captioned: forgotten, nothing written, no error.
        doomed = distinct_image(1, watched / "doomed.jpg")
        wait_for(lambda: reached(gate_deleted), 60, "doomed.jpg at the model")
        doomed.unlink()
        gate_deleted.touch()
        wait_for(
            lambda: d.logged("image deleted while being captioned", path=str(doomed)),
            30,
            "the writer to notice the deletion",
        )
        wait_for(lambda: d.job_state(doomed) is None, 30, "the job to be forgotten")
        assert str(doomed) not in d.rows() and not (watched / "doomed.txt").exists()

        # 17. Replaced by other bytes while being captioned: the stale caption is not
        # written; the image is captioned again from its new bytes.
        swapped = watched / "swapped.jpg"
        swapped.write_bytes(old_bytes)
        wait_for(lambda: reached(gate_replaced), 60, "swapped.jpg at the model")
        swapped.write_bytes(new_bytes)
        gate_replaced.touch()
        new_sha = hashlib.sha256(new_bytes).hexdigest()
        row = wait_for(
            lambda: (r := d.rows().get(str(swapped))) and r["sha256"] == new_sha and r,
            60,
            "the caption of the new bytes",
        )
        assert _sidecar_matches_row(row)
        lines = [e["event"] for e in d.events() if e.get("path") == str(swapped)]
        requeued = "image changed while being captioned; re-queued"
        assert requeued in lines and "captioned" not in lines[: lines.index(requeued)], lines
        # What the stale caption would have been: the old bytes, captioned (from the cache).
        (watched / "old-copy.jpg").write_bytes(old_bytes)
        wait_for(lambda: d.captioned(watched / "old-copy.jpg"), 60, "old-copy sidecar")
        assert (watched / "old-copy.txt").read_text() != (watched / "swapped.txt").read_text()
        assert d.proc.poll() is None
    assert d.proc.returncode == 0
