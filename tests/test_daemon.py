"""The daemon end to end: events, settle, restarts, kill -9, duplicates, shutdown, status."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_harness import Daemon, sidecar_ready, wait_for, write_config
from images import distinct_image


def _png_bytes(i: int, size=(96, 72)) -> bytes:
    import io

    from images import distinct_pil

    buf = io.BytesIO()
    distinct_pil(i, size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(params=[False, True], ids=["native", "polling"])
def polling(request) -> bool:
    return request.param


def test_events_create_copy_move_part_nested_and_slow_writer(tmp_path, tiny_llava, polling):
    watched, outside = tmp_path / "watched", tmp_path / "outside"
    watched.mkdir()
    outside.mkdir()
    settle = 1.5
    cfg = write_config(
        tmp_path,
        tiny_llava,
        [
            {
                "path": str(watched),
                "polling": polling,
                "poll_interval": 0.2,
                "settle_seconds": settle,
            }
        ],
    )
    with Daemon(cfg, tmp_path) as d:
        d.wait_scanned()  # every file below arrives through its events, not the scan
        # created in place
        distinct_image(1, watched / "created.jpg")
        # copied in
        distinct_image(2, outside / "src.jpg")
        shutil.copy(outside / "src.jpg", watched / "copied.jpg")
        # moved in from outside the tree
        distinct_image(3, outside / "moved.jpg")
        os.rename(outside / "moved.jpg", watched / "moved.jpg")
        # browser-style download: written as .part, renamed when complete
        (watched / "download.jpg.part").write_bytes(_png_bytes(4))
        os.rename(watched / "download.jpg.part", watched / "download.png")
        # a nested folder created after start
        (watched / "new" / "deeper").mkdir(parents=True)
        distinct_image(5, watched / "new" / "deeper" / "nested.jpg")
        # written in two halves, pausing longer than a poll but shorter than settle
        data = _png_bytes(6, size=(160, 120))
        with open(watched / "slow.png", "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(0.6)  # the pause is the scenario under test, not a wait for a result
            f.write(data[len(data) // 2 :])
        expected = [
            "created.jpg",
            "copied.jpg",
            "moved.jpg",
            "download.png",
            "new/deeper/nested.jpg",
            "slow.png",
        ]
        wait_for(
            lambda: all(sidecar_ready(watched / e) for e in expected),
            60,
            "sidecars for every arrival",
        )
        rows = wait_for(lambda: (r := d.rows()) and len(r) == 6 and r, 30, "6 index rows")
        assert sorted(rows) == sorted(str(watched / e) for e in expected)
        slow = rows[str(watched / "slow.png")]
        assert slow["sha256"] == hashlib.sha256(data).hexdigest()  # the complete file
        assert len(d.wait_logged("captioned", path=str(watched / "slow.png"))) == 1
        assert not (watched / "download.jpg.txt").exists()
        assert not [p for p in watched.rglob(".*")], "temp files left behind"
    assert d.proc.returncode == 0


def test_move_within_tree_and_delete(tmp_path, tiny_llava):
    watched = tmp_path / "watched"
    (watched / "sub").mkdir(parents=True)
    cfg = write_config(
        tmp_path,
        tiny_llava,
        [{"path": str(watched), "settle_seconds": 0.3, "on_delete": "remove-ours"}],
    )
    with Daemon(cfg, tmp_path) as d:
        distinct_image(1, watched / "a.jpg")
        distinct_image(2, watched / "b.jpg")
        wait_for(
            lambda: d.captioned(watched / "a.jpg") and d.captioned(watched / "b.jpg"),
            60,
            "first sidecars",
        )
        caption = (watched / "a.txt").read_text()
        os.rename(watched / "a.jpg", watched / "sub" / "renamed.jpg")
        wait_for(lambda: str(watched / "sub" / "renamed.jpg") in d.rows(), 30, "row to move")
        assert (watched / "sub" / "renamed.txt").read_text() == caption
        assert not (watched / "a.txt").exists()
        row = d.rows()[str(watched / "sub" / "renamed.jpg")]
        assert row["sidecar"] == str(watched / "sub" / "renamed.txt")
        assert str(watched / "a.jpg") not in d.rows()
        (watched / "b.jpg").unlink()
        wait_for(lambda: str(watched / "b.jpg") not in d.rows(), 30, "row removed on delete")
        wait_for(lambda: not (watched / "b.txt").exists(), 10, "our sidecar removed")
        # A user's sidecar is never removed.
        distinct_image(3, watched / "c.jpg")
        wait_for(lambda: d.captioned(watched / "c.jpg"), 60, "c sidecar")
        (watched / "c.txt").write_text("edited\n")
        (watched / "c.jpg").unlink()
        wait_for(lambda: str(watched / "c.jpg") not in d.rows(), 30, "c row removed")
        assert (watched / "c.txt").read_text() == "edited\n"
    assert d.proc.returncode == 0


def test_modified_image_recaptioned_only_if_sidecar_is_ours(tmp_path, tiny_llava):
    watched = tmp_path / "watched"
    watched.mkdir()
    cfg = write_config(tmp_path, tiny_llava, [{"path": str(watched), "settle_seconds": 0.3}])
    with Daemon(cfg, tmp_path) as d:
        distinct_image(1, watched / "ours.jpg")
        distinct_image(2, watched / "theirs.jpg")
        wait_for(
            lambda: d.captioned(watched / "ours.jpg") and d.captioned(watched / "theirs.jpg"),
            60,
            "sidecars",
        )
        before = (watched / "ours.txt").read_text()
        (watched / "theirs.txt").write_text("my words\n")
        distinct_image(11, watched / "ours.jpg")
        distinct_image(12, watched / "theirs.jpg")
        new_sha = hashlib.sha256((watched / "theirs.jpg").read_bytes()).hexdigest()
        wait_for(
            lambda: d.rows().get(str(watched / "theirs.jpg"), {}).get("sha256") == new_sha,
            60,
            "re-caption of the modified image",
        )
        wait_for(lambda: (watched / "ours.txt").read_text() != before, 60, "ours rewritten")
        assert (watched / "theirs.txt").read_text() == "my words\n"


def test_thousand_images_added_while_stopped(tmp_path, tiny_llava):
    watched = tmp_path / "watched"
    cfg = write_config(
        tmp_path,
        tiny_llava,
        [{"path": str(watched)}],
        model={
            "backend": "transformers",
            "path": str(tiny_llava),
            "batch_size": 16,
            "max_tokens": 4,
        },
    )
    for i in range(1000):
        distinct_image(i, watched / f"d{i // 100}" / f"{i:04d}.png", size=(32, 24))
    with Daemon(cfg, tmp_path) as d:
        wait_for(lambda: len(d.rows()) == 1000, 300, "1000 rows")
        wait_for(lambda: len(list(watched.rglob("*.txt"))) == 1000, 30, "1000 sidecars")
    with Daemon(cfg, tmp_path) as d2:
        wait_for(lambda: d2.logged("scan done"), 60, "catch-up scan")
        [scan] = d2.logged("scan done")
        assert (scan["up_to_date"], scan["new"]) == (1000, 0)
    assert not d2.logged("captioned"), "the second start ran the model"


def test_kill_9_mid_burst_then_restart(tmp_path, tiny_llava):
    watched = tmp_path / "watched"
    watched.mkdir()
    cfg = write_config(
        tmp_path,
        tiny_llava,
        [{"path": str(watched), "settle_seconds": 0.2}],
        model={
            "backend": "transformers",
            "path": str(tiny_llava),
            "batch_size": 8,
            "max_tokens": 4,
        },
    )
    d = Daemon(cfg, tmp_path).start()
    for i in range(500):
        distinct_image(i, watched / f"{i:03d}.png", size=(32, 24))
    wait_for(lambda: len(d.rows()) >= 50, 120, "the burst to be under way")
    d.kill9()
    assert len(d.rows()) < 500, "too late: the burst had finished before the kill"
    with Daemon(cfg, tmp_path) as d2:
        wait_for(lambda: len(d2.rows()) == 500, 300, "500 rows after restart")
        wait_for(
            lambda: all(sidecar_ready(watched / f"{i:03d}.png") for i in range(500)),
            30,
            "500 complete sidecars",
        )
    rows = d2.rows()
    assert len(rows) == 500
    for path, row in rows.items():
        assert Path(row["sidecar"]).read_text() == row["caption"] + "\n", path
    assert len(list(watched.glob("*.txt"))) == 500
    assert not [p for p in watched.iterdir() if p.name.startswith(".")], "temp files left"


def test_three_copies_captioned_once(tmp_path, tiny_llava):
    watched = tmp_path / "watched"
    watched.mkdir()
    cfg = write_config(tmp_path, tiny_llava, [{"path": str(watched), "settle_seconds": 0.3}])
    src = distinct_image(9, tmp_path / "src.jpg")
    with Daemon(cfg, tmp_path) as d:
        # After the catch-up scan: a copy it listed half-way would also come back through
        # its events, and the first (correct) model run would be discarded as stale, so
        # every logged caption would be a reuse of it.
        d.wait_scanned()
        for name in ("one.jpg", "two.jpg", "three.jpg"):
            shutil.copy(src, watched / name)
        names = ("one", "two", "three")
        wait_for(
            lambda: all(d.captioned(watched / f"{n}.jpg") for n in names), 60, "three sidecars"
        )
        wait_for(lambda: len(d.logged("captioned")) == 3, 30, "three log lines")
        for e in d.logged("captioned"):  # every image: path, task, model, ms, outcome
            assert e["path"].startswith(str(watched)) and e["task"] == "short"
            assert e["model"] == str(tiny_llava) and e["outcome"] == "written"
            assert isinstance(e["ms"], float) and e["level"] == "info" and e["timestamp"]
        ran = [e for e in d.logged("captioned") if not e["reused"]]
        assert len(ran) == 1, "the model ran more than once for identical bytes"
        assert len({(watched / f"{n}.txt").read_text() for n in names}) == 1


def test_sigterm_stops_quickly_with_exit_0_and_second_daemon_refused(tmp_path, tiny_llava):
    watched = tmp_path / "watched"
    watched.mkdir()
    cfg = write_config(tmp_path, tiny_llava, [{"path": str(watched)}])
    d = Daemon(cfg, tmp_path).start()
    second = subprocess.run(
        [sys.executable, "-m", "watcher", "--config", str(cfg), "run"],
        capture_output=True,
        text=True,
        timeout=60,
        env=d.env,
    )
    assert second.returncode == 2
    assert "already using" in second.stderr and "watcher run (pid" in second.stderr
    out = subprocess.run(
        [sys.executable, "-m", "watcher", "--config", str(cfg), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=d.env,
    )
    report = json.loads(out.stdout)
    assert report["daemon"]["running"] and report["daemon"]["pid"] == d.proc.pid
    assert [f["path"] for f in report["daemon"]["folders"]] == [str(watched)]
    assert d.stop() == 0  # within the harness's 30 s, or it fails saying so
    assert d.logged("stopped")


def test_folders_on_the_command_line(tmp_path, tiny_llava):
    watched = tmp_path / "inbox"
    watched.mkdir()
    cfg = write_config(tmp_path, tiny_llava, [])
    with Daemon(cfg, tmp_path, str(watched)) as d:
        distinct_image(1, watched / "a.jpg")
        wait_for(lambda: d.captioned(watched / "a.jpg"), 60, "sidecar")
        assert str(watched / "a.jpg") in d.rows()


def test_rescan_finds_what_the_watch_missed(tmp_path, tiny_llava):
    watched = tmp_path / "watched"
    watched.mkdir()
    # A polling watch that does not look again within the test: only `rescan_minutes` (1.2 s)
    # can find a file added after start, as it would after an inotify queue overflow.
    cfg = write_config(
        tmp_path,
        tiny_llava,
        [
            {
                "path": str(watched),
                "polling": True,
                "poll_interval": 3600,
                "rescan_minutes": 0.02,
                "settle_seconds": 0.1,
            }
        ],
    )
    with Daemon(cfg, tmp_path) as d:
        wait_for(lambda: d.logged("scan done"), 60, "the start-up scan")
        [startup] = d.logged("scan done")
        assert startup["new"] == 0
        distinct_image(1, watched / "missed.jpg")
        wait_for(lambda: d.captioned(watched / "missed.jpg"), 60, "the rescan to find it")
        assert [e["new"] for e in d.logged("scan done")].count(1) == 1
        assert str(watched / "missed.jpg") in d.rows()
