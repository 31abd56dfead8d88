"""The settler's decisions on a fake clock: settle_seconds, changing files, the close-write
fast path and end-marker gating, each to the tick, without waiting for real time."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from images import distinct_pil

from watcher.intake.settle import UNREADABLE_GRACE, Ready, Settler

# A tick that binary floating point adds exactly, so "just before" and "at" are exact.
TICK = 2.0**-10


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Handed:
    """on_ready: records each batch as (names, sizes at hand-on time)."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.sizes: dict[str, int] = {}
        self.fail = False

    def __call__(self, ready: list[Ready]) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        self.batches.append(sorted(r.path.name for r in ready))
        self.sizes.update({r.path.name: r.path.stat().st_size for r in ready})

    @property
    def names(self) -> list[str]:
        return [n for b in self.batches for n in b]


@pytest.fixture()
def rig(tmp_path: Path) -> tuple[Settler, Clock, Handed]:
    clock, handed = Clock(), Handed()
    return Settler(handed, clock=clock), clock, handed  # never started: run_once drives it


def _bytes(fmt: str, i: int = 1) -> bytes:
    buf = io.BytesIO()
    im = distinct_pil(i, (48, 36))
    if fmt == "GIF":
        frames = [distinct_pil(i + k, (48, 36)).convert("P") for k in range(4)]
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    else:
        im.save(buf, fmt)
    return buf.getvalue()


def _write(path: Path, data: bytes, mtime_s: int = 1_700_000_000) -> Path:
    path.write_bytes(data)
    # A fixed mtime, so "changed" is decided by what a test writes, not by timer resolution.
    os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))
    return path


def _until(s: Settler, clock: Clock, handed: Handed, step: float, limit: float) -> float:
    """Advance the clock by `step` and run the loop once, until something is handed on;
    return the seconds that took (or `limit` if nothing was)."""
    start = clock.now
    while clock.now - start < limit:
        clock.advance(step)
        s.run_once()
        if handed.batches:
            break
    return round(clock.now - start, 6)


# -- settle_seconds ----------------------------------------------------------------------------


@pytest.mark.parametrize("settle", [0.0, 0.5, 2.0, 30.0])
def test_an_unchanged_complete_file_goes_exactly_at_settle_seconds(tmp_path, rig, settle):
    s, clock, handed = rig
    p = _write(tmp_path / "a.jpg", _bytes("JPEG"))
    s.touch(p, tmp_path, settle)
    if settle:
        clock.advance(settle - TICK)
        assert s.run_once() and handed.batches == []
        assert s.due_within(TICK) and not s.due_within(TICK / 2)
        clock.advance(TICK)
    assert s.run_once()
    assert handed.batches == [["a.jpg"]]
    assert s.pending() == 0 and not s.due_within(3600)


def test_a_batch_of_due_files_is_handed_on_together_and_later_ones_wait(tmp_path, rig):
    s, clock, handed = rig
    for name, fmt in (("a.jpg", "JPEG"), ("b.png", "PNG"), ("c.jpg", "JPEG")):
        s.touch(_write(tmp_path / name, _bytes(fmt)), tmp_path, 1.0)
    clock.advance(0.5)
    late = _write(tmp_path / "late.jpg", _bytes("JPEG", 2))
    s.touch(late, tmp_path, 1.0)
    clock.advance(0.5)
    s.run_once()
    assert handed.batches == [["a.jpg", "b.png", "c.jpg"]]
    assert s.pending() == 1
    clock.advance(0.5)
    s.run_once()
    assert handed.batches[1:] == [["late.jpg"]]


def test_each_folder_keeps_its_own_settle_seconds(tmp_path, rig):
    s, clock, handed = rig
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    fast.mkdir()
    slow.mkdir()
    s.touch(_write(fast / "a.jpg", _bytes("JPEG")), fast, 1.0)
    s.touch(_write(slow / "b.jpg", _bytes("JPEG")), slow, 5.0)
    assert _until(s, clock, handed, 0.25, 10) == 1.0
    assert handed.batches == [["a.jpg"]]
    handed.batches.clear()
    assert _until(s, clock, handed, 0.25, 10) == 4.0  # 5 s after its touch
    assert handed.batches == [["b.jpg"]]


# -- files that keep changing ------------------------------------------------------------------


def test_a_file_with_events_more_often_than_settle_never_goes_until_they_stop(tmp_path, rig):
    s, clock, handed = rig
    data = _bytes("JPEG")
    p = tmp_path / "a.jpg"
    for i in range(1, 21):  # a writer appending every 0.5 s for 10 s; settle is 1 s
        _write(p, data[: len(data) * i // 20], 1_700_000_000 + i)
        s.touch(p, tmp_path, 1.0)
        clock.advance(0.5)
        s.run_once()
    assert handed.batches == []
    clock.advance(0.5 - TICK)
    s.run_once()
    assert handed.batches == []
    clock.advance(TICK)  # 1 s after the last event
    s.run_once()
    assert handed.batches == [["a.jpg"]] and handed.sizes["a.jpg"] == len(data)


def test_a_change_without_an_event_restarts_the_wait_from_when_it_was_seen(tmp_path, rig):
    s, clock, handed = rig
    first, second = _bytes("JPEG", 1), _bytes("JPEG", 2)
    p = _write(tmp_path / "a.jpg", first)
    s.touch(p, tmp_path, 2.0)
    clock.advance(1.0)
    _write(p, second + b"\x00" * 7, 1_700_000_001)  # replaced; the event was missed
    clock.advance(1.0)
    s.run_once()  # sees the change at t=2: settle again from now
    assert handed.batches == []
    clock.advance(2.0 - TICK)
    s.run_once()
    assert handed.batches == []
    clock.advance(TICK)
    s.run_once()
    assert handed.batches == [["a.jpg"]] and handed.sizes["a.jpg"] == len(second) + 7


def test_same_size_rewrite_is_a_change_by_its_mtime(tmp_path, rig):
    s, clock, handed = rig
    data = _bytes("JPEG")
    p = _write(tmp_path / "a.jpg", data)
    s.touch(p, tmp_path, 1.0)
    clock.advance(0.5)
    _write(p, data, 1_700_000_099)  # same bytes, new mtime: someone wrote it again
    clock.advance(0.5)
    s.run_once()
    assert handed.batches == []
    assert _until(s, clock, handed, 0.25, 5) == 1.0


def test_an_event_during_hand_on_keeps_the_file_for_another_round(tmp_path):
    clock = Clock()
    handed: list[str] = []
    s: Settler

    def on_ready(ready: list[Ready]) -> None:
        handed.extend(r.path.name for r in ready)
        if len(handed) == 1:  # written again while being queued
            clock.advance(0.25)
            s.touch(ready[0].path, tmp_path, 1.0)

    s = Settler(on_ready, clock=clock)
    p = _write(tmp_path / "a.jpg", _bytes("JPEG"))
    s.touch(p, tmp_path, 1.0)
    clock.advance(1.0)
    s.run_once()
    assert handed == ["a.jpg"] and s.pending() == 1
    clock.advance(1.0 - TICK)
    s.run_once()
    assert handed == ["a.jpg"]
    clock.advance(TICK)
    s.run_once()
    assert handed == ["a.jpg", "a.jpg"] and s.pending() == 0


# -- the close-write fast path -----------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("WEBP", "webp")]
)
def test_a_closed_file_with_its_end_marker_goes_at_once(tmp_path, rig, fmt, ext):
    s, clock, handed = rig
    p = _write(tmp_path / f"a.{ext}", _bytes(fmt))
    s.touch(p, tmp_path, 60.0, closed=True)
    assert s.due_within(0)
    s.run_once()  # no time has passed
    assert handed.batches == [[f"a.{ext}"]] and s.pending() == 0


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif")])
def test_a_closed_partial_file_waits_out_settle_then_goes_when_complete(tmp_path, rig, fmt, ext):
    s, clock, handed = rig
    data = _bytes(fmt)
    p = _write(tmp_path / f"a.{ext}", data[: len(data) // 2])
    s.touch(p, tmp_path, 5.0, closed=True)
    s.run_once()
    assert handed.batches == [] and s.pending() == 1
    # Now on the settle path: not due before settle_seconds after the close.
    assert not s.due_within(5.0 - TICK) and s.due_within(5.0)
    clock.advance(3.0)
    _write(p, data, 1_700_000_001)  # its writer comes back and finishes it
    s.touch(p, tmp_path, 5.0, closed=True)
    s.run_once()
    assert handed.batches == [[f"a.{ext}"]] and handed.sizes[f"a.{ext}"] == len(data)


def test_a_close_then_a_modification_before_the_look_takes_the_settle_path(tmp_path, rig):
    s, clock, handed = rig
    p = _write(tmp_path / "a.jpg", _bytes("JPEG"))
    s.touch(p, tmp_path, 2.0, closed=True)
    s.touch(p, tmp_path, 2.0)  # reopened for appending before the loop looked
    s.run_once()
    assert handed.batches == []
    assert _until(s, clock, handed, 0.5, 10) == 2.0


def test_a_closed_tiff_goes_at_once_when_it_decodes_in_full(tmp_path, rig):
    s, clock, handed = rig
    data = _bytes("TIFF")
    cut = _write(tmp_path / "cut.tif", data[: len(data) - 40])
    whole = _write(tmp_path / "whole.tif", data)
    s.touch(cut, tmp_path, 3.0, closed=True)
    s.touch(whole, tmp_path, 3.0, closed=True)
    s.run_once()
    assert handed.batches == [["whole.tif"]] and s.pending() == 1


def test_a_closed_file_in_a_format_without_an_end_marker_waits_for_settle(tmp_path, rig):
    s, clock, handed = rig
    p = _write(tmp_path / "a.bmp", _bytes("BMP"))
    s.touch(p, tmp_path, 3.0, closed=True)
    s.run_once()
    assert handed.batches == []
    assert _until(s, clock, handed, 0.5, 10) == 3.0  # then it opens as an image: goes


def test_jpeg_data_after_the_end_marker_is_no_fast_path_but_settles(tmp_path, rig):
    s, clock, handed = rig
    # A motion photo: video appended after the EOI may still be being written.
    p = _write(tmp_path / "a.jpg", _bytes("JPEG") + b"ftypmp42" + b"\x01" * 500)
    s.touch(p, tmp_path, 2.0, closed=True)
    s.run_once()
    assert handed.batches == []
    assert _until(s, clock, handed, 0.5, 10) == 2.0


# -- end-marker gating on the settle path ------------------------------------------------------


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif")])
def test_a_stable_file_without_its_end_marker_is_held_until_the_grace(tmp_path, rig, fmt, ext):
    s, clock, handed = rig
    data = _bytes(fmt)
    p = _write(tmp_path / f"a.{ext}", data[: len(data) * 2 // 3])
    s.touch(p, tmp_path, 0.5)
    # Checked every min(1, settle) s while stable and partial; handed on (to fail with a
    # clear reason downstream) once stable for UNREADABLE_GRACE.
    assert _until(s, clock, handed, 0.5, 3 * UNREADABLE_GRACE) == UNREADABLE_GRACE
    assert handed.sizes[f"a.{ext}"] == len(data) * 2 // 3


def test_a_held_partial_file_goes_settle_seconds_after_it_is_finished(tmp_path, rig):
    s, clock, handed = rig
    data = _bytes("GIF")
    p = _write(tmp_path / "a.gif", data[: len(data) // 2])
    s.touch(p, tmp_path, 0.5)
    clock.advance(4.0)
    s.run_once()
    assert handed.batches == []
    _write(p, data, 1_700_000_001)
    s.touch(p, tmp_path, 0.5)
    assert _until(s, clock, handed, 0.25, 10) == 0.5
    assert handed.sizes["a.gif"] == len(data)


def test_a_long_settle_is_not_cut_short_by_the_grace(tmp_path, rig):
    s, clock, handed = rig
    data = _bytes("JPEG")
    p = _write(tmp_path / "a.jpg", data[:100])
    settle = UNREADABLE_GRACE * 3
    s.touch(p, tmp_path, settle)
    assert _until(s, clock, handed, 1.0, 2 * settle) == settle


def test_a_stable_file_that_is_no_image_goes_after_the_grace(tmp_path, rig):
    s, clock, handed = rig
    p = _write(tmp_path / "a.bmp", b"BM" + b"\x00" * 60)  # no end marker to look for; no image
    s.touch(p, tmp_path, 1.0)
    assert _until(s, clock, handed, 1.0, 3 * UNREADABLE_GRACE) == UNREADABLE_GRACE


# -- files that go away or are not files -------------------------------------------------------


def test_a_deleted_file_is_dropped_not_handed_on(tmp_path, rig):
    s, clock, handed = rig
    p = _write(tmp_path / "a.jpg", _bytes("JPEG"))
    s.touch(p, tmp_path, 1.0)
    p.unlink()
    clock.advance(1.0)
    s.run_once()
    assert handed.batches == [] and s.pending() == 0


def test_a_fifo_is_dropped_without_being_opened(tmp_path, rig):
    s, clock, handed = rig
    fifo = tmp_path / "a.jpg"
    os.mkfifo(fifo)
    s.touch(fifo, tmp_path, 0.0, closed=True)
    s.run_once()  # opening it would block this test forever
    assert handed.batches == [] and s.pending() == 0


def test_forget_and_forget_under(tmp_path, rig):
    s, clock, handed = rig
    sub = tmp_path / "sub"
    sub.mkdir()
    a = _write(tmp_path / "a.jpg", _bytes("JPEG", 1))
    b = _write(sub / "b.jpg", _bytes("JPEG", 2))
    c = _write(sub / "c.jpg", _bytes("JPEG", 3))
    for p in (a, b, c):
        s.touch(p, tmp_path, 1.0)
    s.forget(a)
    s.forget_under(sub)
    assert s.pending() == 0
    clock.advance(5.0)
    s.run_once()
    assert handed.batches == []


# -- when queueing fails -----------------------------------------------------------------------


def test_a_failed_hand_on_is_retried_a_second_later(tmp_path, rig):
    s, clock, handed = rig
    p = _write(tmp_path / "a.jpg", _bytes("JPEG"))
    s.touch(p, tmp_path, 1.0)
    handed.fail = True
    clock.advance(1.0)
    assert s.run_once() is False
    assert s.pending() == 1 and not s.due_within(1.0 - TICK) and s.due_within(1.0)
    handed.fail = False
    clock.advance(1.0 - TICK)
    s.run_once()
    assert handed.batches == []
    clock.advance(TICK)
    assert s.run_once() is True
    assert handed.batches == [["a.jpg"]] and s.pending() == 0
