"""Load (issue 6, case 20): 5,000 small images arrive within a minute while the daemon runs.
All are captioned, the queue drains, and the daemon's memory stays bounded (its peak RSS is
printed in the test output)."""

from __future__ import annotations

import io
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from daemon_harness import Daemon, memory_mib, wait_for, write_config
from images import distinct_pil

N = 5000
FOLDERS = 10


def _png(i: int) -> bytes:
    # Small files, but 256x192 decoded (147 KB each): were all 5,000 held in memory at once,
    # that alone would be 700+ MiB.
    buf = io.BytesIO()
    distinct_pil(i, (256, 192)).save(buf, format="PNG")
    return buf.getvalue()


def _counts(db: Path) -> dict[str, int]:
    con = sqlite3.connect(db, timeout=30)
    try:
        jobs = dict(con.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        jobs["images"] = con.execute("SELECT count(*) FROM images").fetchone()[0]
        return jobs
    finally:
        con.close()


@pytest.mark.slow  # about 40-90 s on 2 cores
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_5000_images_in_a_minute_are_all_captioned_in_bounded_memory(tmp_path, tiny_llava, capsys):
    watched = tmp_path / "watched"
    watched.mkdir()
    cfg = write_config(
        tmp_path,
        tiny_llava,
        [{"path": str(watched), "settle_seconds": 0.5}],
        model={
            "backend": "transformers",
            "path": str(tiny_llava),
            "batch_size": 32,
            "max_tokens": 2,
        },
    )
    blobs = [_png(i) for i in range(N)]  # made before the clock starts
    with Daemon(cfg, tmp_path) as d:
        pid = d.proc.pid
        base = memory_mib(pid, "VmRSS")
        samples: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                try:
                    samples.append(memory_mib(pid, "VmRSS"))
                except (OSError, AssertionError):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        for i, blob in enumerate(blobs):
            (watched / f"d{i % FOLDERS}").mkdir(exist_ok=True)
            (watched / f"d{i % FOLDERS}" / f"{i:04d}.png").write_bytes(blob)
        arrived = time.monotonic() - t0
        assert arrived < 60, f"writing the images took {arrived:.0f}s: not a one-minute burst"

        wait_for(lambda: _counts(d.db).get("done", 0) == N, 900, f"{N} jobs done", interval=1.0)
        elapsed = time.monotonic() - t0
        counts = _counts(d.db)
        peak = memory_mib(pid, "VmHWM")
        done.set()
        sampler.join(5)
        assert d.proc.poll() is None

    assert counts.get("pending", 0) == 0 and counts.get("running", 0) == 0, counts
    assert counts.get("failed", 0) == 0 and counts["images"] == N, counts
    sidecars = list(watched.rglob("*.txt"))
    assert len(sidecars) == N
    assert all(p.read_text().endswith("\n") for p in sidecars)
    with capsys.disabled():
        print(
            f"\n[load] {N} images written in {arrived:.1f}s, all captioned {elapsed:.0f}s "
            f"after the first ({N / elapsed:.0f}/s); daemon + model process RSS after start "
            f"{base:.0f} MiB, "
            f"peak {peak:.0f} MiB (+{peak - base:.0f}), "
            f"highest sampled {max(samples, default=base):.0f} MiB"
        )
    # In flight at once: at most 3 batches + 2 per decode thread; the rest waits in SQLite.
    assert peak - base < 250, f"peak RSS grew by {peak - base:.0f} MiB"
