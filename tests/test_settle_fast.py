"""Finished files go at once, partial ones never: end-marker checks, the close-write fast path."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from daemon_harness import Daemon, sidecar_ready, wait_for, write_config
from images import distinct_pil
from PIL import Image

from watcher.intake.complete import Verdict, check
from watcher.intake.settle import Ready, Settler

# -- image bytes -------------------------------------------------------------------------------


def _jpeg(i: int = 1, size=(160, 120), **kw) -> bytes:
    buf = io.BytesIO()
    distinct_pil(i, size).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _jpeg_with_thumbnail() -> bytes:
    """A JPEG whose APP1 segment holds a JPEG thumbnail, with an EOI (FF D9) of its own."""
    thumb = _jpeg(9, (32, 24))
    app1 = b"Exif\x00\x00" + thumb
    body = _jpeg(2)
    seg = b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1
    return body[:2] + seg + body[2:]


def _png(i: int = 1, size=(160, 120)) -> bytes:
    buf = io.BytesIO()
    distinct_pil(i, size).save(buf, "PNG")
    return buf.getvalue()


def _gif(frames: int = 6, size=(96, 72)) -> bytes:
    buf = io.BytesIO()
    ims = [distinct_pil(i, size).convert("P") for i in range(frames)]
    ims[0].save(buf, "GIF", save_all=True, append_images=ims[1:], duration=100)
    return buf.getvalue()


def _webp(i: int = 1) -> bytes:
    buf = io.BytesIO()
    distinct_pil(i, (96, 72)).save(buf, "WEBP", quality=80)
    return buf.getvalue()


def _tiff(i: int = 1) -> bytes:
    buf = io.BytesIO()
    distinct_pil(i, (96, 72)).save(buf, "TIFF")
    return buf.getvalue()


def _gif_block_starts(data: bytes) -> list[int]:
    """Offsets where each top-level GIF block starts (frame boundaries, the trailer)."""
    pos = 13 + (3 * (2 << (data[10] & 7)) if data[10] & 0x80 else 0)
    starts = []
    while pos < len(data):
        starts.append(pos)
        if data[pos] == 0x3B:
            break
        if data[pos] == 0x2C:
            local = data[pos + 9]
            pos += 10 + (3 * (2 << (local & 7)) if local & 0x80 else 0) + 1
        else:
            pos += 2
        while data[pos]:
            pos += 1 + data[pos]
        pos += 1
    return starts


def _at(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


FORMATS = {"jpg": _jpeg, "png": _png, "gif": _gif, "webp": _webp, "tif": _tiff}

# -- the end-marker checks ---------------------------------------------------------------------


@pytest.mark.parametrize("ext", sorted(FORMATS))
@pytest.mark.parametrize("strict", [True, False])
def test_a_complete_file_is_complete_and_every_cut_of_it_is_not(tmp_path, ext, strict):
    data = FORMATS[ext]()
    whole = _at(tmp_path, f"whole.{ext}", data)
    if ext == "tif" and not strict:
        assert check(whole, strict=False) is Verdict.UNKNOWN  # no end marker: settle decides
        return
    assert check(whole, strict=strict) is Verdict.COMPLETE
    cuts = sorted({*range(1, len(data), max(1, len(data) // 97)), len(data) - 1, len(data) - 2})
    complete_cuts = [
        n
        for n in cuts
        if check(_at(tmp_path, f"cut.{ext}", data[:n]), strict=strict) is Verdict.COMPLETE
    ]
    assert complete_cuts == []


def test_a_gif_cut_at_each_frame_boundary_is_partial_even_though_pillow_opens_it(tmp_path):
    data = _gif(frames=6)
    starts = _gif_block_starts(data)
    assert data[starts[-1]] == 0x3B and len(starts) > 6
    opens = 0
    for n in starts:  # everything up to (not including) a block: frames 1..k, no trailer
        cut = _at(tmp_path, "cut.gif", data[:n])
        try:
            with Image.open(cut) as im:  # what settle used to trust: the header is fine
                im.load()
            opens += 1
        except OSError:
            pass  # no frame yet
        assert check(cut, strict=False) is Verdict.PARTIAL, n
        assert check(cut, strict=True) is not Verdict.COMPLETE, n
    assert opens >= 5  # Pillow decodes a GIF cut after any frame


def test_a_0x3b_byte_inside_a_frame_is_not_the_gif_trailer(tmp_path):
    data = _gif(frames=3)
    starts = _gif_block_starts(data)
    # Every byte value occurs in the frames' data; cut right after each 0x3B inside them.
    inner = [i for i in range(starts[0], starts[-1]) if data[i] == 0x3B]
    assert inner, "the test image has no 0x3B inside its frames"
    for i in inner:
        assert check(_at(tmp_path, "cut.gif", data[: i + 1]), strict=False) is Verdict.PARTIAL


def test_a_jpeg_cut_after_its_thumbnail_eoi_is_not_complete(tmp_path):
    data = _jpeg_with_thumbnail()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
    thumb_end = data.index(b"\xff\xd9") + 2  # the thumbnail's EOI, inside APP1
    assert thumb_end < len(data) - 2
    cut = _at(tmp_path, "cut.jpg", data[:thumb_end])
    assert check(cut, strict=True) is not Verdict.COMPLETE
    assert check(cut, strict=False) is Verdict.PARTIAL
    assert check(_at(tmp_path, "whole.jpg", data), strict=True) is Verdict.COMPLETE


def test_jpeg_trailing_bytes(tmp_path):
    data = _jpeg()
    # Zero padding after the EOI: finished.
    assert check(_at(tmp_path, "pad.jpg", data + b"\x00" * 300), strict=True) is Verdict.COMPLETE
    # Data appended after the EOI (a phone's motion-photo video): not proof the writer is
    # done, so no fast path; but the image itself is complete for the settle check.
    tail = _at(tmp_path, "motion.jpg", data + b"ftypmp42" + os.urandom(5000))
    assert check(tail, strict=True) is not Verdict.COMPLETE
    assert check(tail, strict=False) is Verdict.COMPLETE


def test_png_needs_its_iend_chunk_with_its_crc(tmp_path):
    data = _png()
    assert data.endswith(b"IEND\xaeB`\x82")
    bad_crc = data[:-4] + b"\x00\x00\x00\x00"
    assert check(_at(tmp_path, "crc.png", bad_crc), strict=True) is not Verdict.COMPLETE


def test_webp_length_must_match(tmp_path):
    data = _webp()
    assert (
        check(_at(tmp_path, "long.webp", data + b"\x00\x00"), strict=True) is not Verdict.COMPLETE
    )


def test_links_pipes_and_other_files_get_no_verdict(tmp_path):
    target = _at(tmp_path, "real.jpg", _jpeg())
    (tmp_path / "link.jpg").symlink_to(target)
    os.mkfifo(tmp_path / "pipe.jpg")
    for name in ("link.jpg", "pipe.jpg"):
        assert check(tmp_path / name, strict=True) is Verdict.UNKNOWN  # and it did not block
    assert check(_at(tmp_path, "a.bmp", b"BM" + b"\x00" * 100), strict=True) is Verdict.UNKNOWN
    assert check(tmp_path / "missing.jpg", strict=True) is Verdict.UNKNOWN


# -- the settler on its own --------------------------------------------------------------------


class _Collect:
    def __init__(self) -> None:
        self.ready: list[tuple[Path, int]] = []  # (path, its size when handed on)
        self.event = threading.Event()

    def __call__(self, ready: list[Ready]) -> None:
        self.ready += [(r.path, r.path.stat().st_size) for r in ready]
        self.event.set()


@pytest.fixture()
def settler():
    got = _Collect()
    s = Settler(got)
    s.start()
    yield s, got
    s.stop()
    s.join(10)


def test_a_closed_complete_file_goes_at_once_despite_a_long_settle(tmp_path, settler):
    s, got = settler
    p = _at(tmp_path, "a.jpg", _jpeg())
    s.touch(p, tmp_path, 60.0, closed=True)
    assert got.event.wait(30), "a closed, complete JPEG waited for settle_seconds"
    assert got.ready == [(p, p.stat().st_size)]
    assert s.pending() == 0


@pytest.mark.parametrize("ext", ["jpg", "png", "gif"])
def test_a_closed_partial_file_waits_and_goes_once_when_complete(tmp_path, settler, ext):
    s, got = settler
    data = FORMATS[ext]()
    p = _at(tmp_path, f"a.{ext}", data[: len(data) // 2])
    s.touch(p, tmp_path, 60.0, closed=True)
    # The close check has run once the file is no longer due (it waits out settle now).
    wait_for(lambda: not s.due_within(30.0), 30, "the close check")
    assert got.ready == [] and s.pending() == 1
    with open(p, "ab") as f:  # the writer reopens and appends the rest
        f.write(data[len(data) // 2 :])
    s.touch(p, tmp_path, 60.0)  # the modification: settle again ...
    s.touch(p, tmp_path, 60.0, closed=True)  # ... until the close, with the end there
    assert got.event.wait(30)
    assert got.ready == [(p, len(data))]


def test_a_modification_after_the_close_rearms_settle(tmp_path, settler):
    s, got = settler
    p = _at(tmp_path, "a.jpg", _jpeg())
    with s._cond:  # both events arrive before the settle loop looks (as in a burst)
        s.touch(p, tmp_path, 60.0, closed=True)
        s.touch(p, tmp_path, 60.0)  # reopened for appending
    wait_for(lambda: not s.due_within(30.0), 30, "the settle loop to look")
    assert got.ready == [] and s.pending() == 1


def test_without_a_close_a_complete_file_waits_for_settle(tmp_path, settler):
    s, got = settler
    p = _at(tmp_path, "a.jpg", _jpeg())
    t0 = time.monotonic()
    s.touch(p, tmp_path, 0.5)
    assert got.event.wait(30)
    assert time.monotonic() - t0 >= 0.5
    assert got.ready == [(p, p.stat().st_size)]


# -- the daemon end to end ---------------------------------------------------------------------


def _write_in_parts(path: Path, data: bytes, cuts: list[int], pause: float) -> None:
    """Write `data` in parts, opening and closing the file for each (a slow writer that
    appends), pausing between parts."""
    bounds = [0, *cuts, len(data)]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        with open(path, "ab" if i else "wb") as f:
            f.write(data[a:b])
        if b < len(data):
            time.sleep(pause)  # the pause is the scenario under test, not a wait for a result


def _model_calls_with(d: Daemon, path: Path) -> int:
    """Model calls that included `path`, from the fault seam's log line (its gate is open, so
    it only records each call)."""
    return sum(
        1
        for e in d.logged("injected fault (test only)", site="model")
        if str(path) in e.get("paths", [])
    )


def _recording_env(tmp_path: Path) -> dict:
    gate = tmp_path / "gate-open"
    gate.write_text("")
    return {"WATCHER_FAULTS": json.dumps({"model": {"gate": str(gate)}})}


def test_closed_complete_jpeg_and_png_are_captioned_without_the_settle_wait(tmp_path, tiny_llava):
    watched = tmp_path / "watched"
    watched.mkdir()
    cfg = write_config(
        tmp_path,
        tiny_llava,
        [{"path": str(watched), "settle_seconds": 60}],
        model={
            "backend": "transformers",
            "path": str(tiny_llava),
            "batch_size": 8,
            "max_tokens": 6,
            "isolate": False,
        },
    )
    with Daemon(cfg, tmp_path, env=_recording_env(tmp_path)) as d:
        d.wait_scanned()
        half = _jpeg(7)
        (watched / "half.jpg").write_bytes(half[: len(half) // 2])  # closed, but partial
        done = {"a.jpg": _jpeg(1), "b.png": _png(2)}
        for name, data in done.items():
            with open(watched / name, "wb") as f:
                f.write(data)
        # Well inside settle_seconds = 60: only the close path can have queued them.
        wait_for(lambda: all(d.captioned(watched / n) for n in done), 40, "fast-path captions")
        rows = d.rows()
        for name, data in done.items():
            assert rows[str(watched / name)]["sha256"] == hashlib.sha256(data).hexdigest()
        # The partial file was closed before them and looked at first: it is not queued.
        assert d.job_state(watched / "half.jpg") is None
        assert not (watched / "half.txt").exists()
        # Its writer comes back and finishes it: queued at its close, captioned once.
        with open(watched / "half.jpg", "ab") as f:
            f.write(half[len(half) // 2 :])
        wait_for(lambda: d.captioned(watched / "half.jpg"), 40, "the finished file")
        assert d.rows()[str(watched / "half.jpg")]["sha256"] == hashlib.sha256(half).hexdigest()
        for name in ("a.jpg", "b.png", "half.jpg"):
            assert len(d.wait_logged("captioned", path=str(watched / name))) == 1
            assert _model_calls_with(d, watched / name) == 1
        assert len(d.rows()) == 3
    assert d.proc.returncode == 0


@pytest.mark.parametrize("mode", ["polling", "fast_close off"])
def test_without_close_events_a_complete_file_waits_for_settle(tmp_path, tiny_llava, mode):
    watched = tmp_path / "watched"
    watched.mkdir()
    settle = 1.5
    folder = {"path": str(watched), "settle_seconds": settle}
    folder.update(
        {"polling": True, "poll_interval": 0.1} if mode == "polling" else {"fast_close": False}
    )
    cfg = write_config(
        tmp_path,
        tiny_llava,
        [folder],
        model={
            "backend": "transformers",
            "path": str(tiny_llava),
            "batch_size": 8,
            "max_tokens": 6,
            "isolate": False,
        },
    )
    with Daemon(cfg, tmp_path) as d:
        d.wait_scanned()
        written = time.time()  # every event for the file comes after this
        with open(watched / "a.jpg", "wb") as f:
            f.write(_jpeg(3))
        wait_for(lambda: d.captioned(watched / "a.jpg"), 40, "the caption")
        con = sqlite3.connect(d.db)
        ((enqueued,),) = con.execute(
            "SELECT enqueued FROM jobs WHERE path = ?", (str(watched / "a.jpg"),)
        )
        con.close()
        assert enqueued - written >= settle  # not one moment before settle_seconds
    assert d.proc.returncode == 0


@pytest.mark.slow  # 30-50 s on 2 busy cores (daemon start-ups)
@pytest.mark.parametrize("polling", [False, True], ids=["native", "polling"])
def test_slow_writers_are_captioned_once_from_the_complete_file(tmp_path, tiny_llava, polling):
    watched = tmp_path / "watched"
    watched.mkdir()
    settle = 0.3
    cfg = write_config(
        tmp_path,
        tiny_llava,
        [
            {
                "path": str(watched),
                "settle_seconds": settle,
                "polling": polling,
                "poll_interval": 0.1,
            }
        ],
        model={
            "backend": "transformers",
            "path": str(tiny_llava),
            "batch_size": 8,
            "max_tokens": 6,
            "isolate": False,
        },
    )
    gif = _gif(frames=6)
    starts = _gif_block_starts(gif)
    jpeg, png = _jpeg(4, (320, 240)), _png(5, (320, 240))
    files = {"slow.gif": gif, "append.jpg": jpeg, "append.png": png}
    with Daemon(cfg, tmp_path, env=_recording_env(tmp_path)) as d:
        d.wait_scanned()
        # Pauses longer than settle_seconds (and than a poll), each part closed: before
        # the end marker, every part is a file that stopped changing and opens as an image.
        writers = [
            threading.Thread(
                target=_write_in_parts,
                args=(
                    watched / "slow.gif",
                    gif,
                    [starts[0], *starts[2:-1:2], starts[-1]],
                    3 * settle,
                ),
            ),
            threading.Thread(
                target=_write_in_parts,
                args=(
                    watched / "append.jpg",
                    jpeg,
                    [len(jpeg) // 3, 2 * len(jpeg) // 3],
                    3 * settle,
                ),
            ),
            threading.Thread(
                target=_write_in_parts,
                args=(watched / "append.png", png, [len(png) // 2], 3 * settle),
            ),
        ]
        for w in writers:
            w.start()
        for w in writers:
            w.join(60)
        wait_for(lambda: all(d.captioned(watched / n) for n in files), 60, "the captions")
        rows = d.rows()
        assert sorted(rows) == sorted(str(watched / n) for n in files)
        for name, data in files.items():
            path = watched / name
            assert rows[str(path)]["sha256"] == hashlib.sha256(data).hexdigest()
            assert sidecar_ready(path)
            assert len(d.wait_logged("captioned", path=str(path))) == 1, name
            assert _model_calls_with(d, path) == 1, name
    assert d.proc.returncode == 0


# -- the switch --------------------------------------------------------------------------------


def test_fast_close_is_on_by_default_and_must_be_a_boolean(tmp_path):
    from watcher.config import ConfigError, parse_config

    cfg = parse_config({"folders": [{"path": str(tmp_path)}]})
    assert cfg.folders[0].fast_close is True
    cfg = parse_config({"defaults": {"fast_close": False}, "folders": [str(tmp_path)]})
    assert cfg.folders[0].fast_close is False
    with pytest.raises(ConfigError) as e:
        parse_config({"folders": [{"path": str(tmp_path), "fast_close": "yes"}]})
    assert str(e.value) == "config: folders[0].fast_close: expected true or false; got 'yes'"


@pytest.mark.parametrize("fast_close", [True, False])
def test_a_close_event_takes_the_fast_path_only_when_switched_on(tmp_path, fast_close):
    from watchdog.events import FileClosedEvent, FileModifiedEvent

    from watcher.config import FolderConfig
    from watcher.intake.observer import FolderHandler, Sink

    calls: list[tuple[str, str]] = []

    class Recorder(Sink):
        def file_touched(self, path, folder):
            calls.append(("touched", path.name))

        def file_closed(self, path, folder):
            calls.append(("closed", path.name))

    _at(tmp_path, "a.jpg", _jpeg())
    handler = FolderHandler(FolderConfig(tmp_path, fast_close=fast_close), Recorder())
    handler.dispatch(FileModifiedEvent(str(tmp_path / "a.jpg")))
    handler.dispatch(FileClosedEvent(str(tmp_path / "a.jpg")))
    assert calls == [("touched", "a.jpg"), ("closed" if fast_close else "touched", "a.jpg")]
