"""`watcher caption --ray` on a local Ray cluster (2 CPUs, the tiny model in CPU actors):
the same sidecars and rows as `watcher caption`, resumable, and an actor killed mid-run."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import threading
from pathlib import Path

import pytest
import yaml
from conftest import require
from daemon_harness import run_cli
from images import distinct_image

try:
    import ray
except ImportError:
    ray = None

pytestmark = pytest.mark.slow

COLUMNS = (
    "caption, model_caption, task, outputs, model, revision, sidecar_state, sidecar_error, "
    "width, height, sha256, size"
)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    require("ray", ray is not None, "pip install 'moondream-watcher[ray]'")
    ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _config(tmp_path: Path, model: Path, name: str) -> Path:
    data = {
        "model": {
            "backend": "transformers",
            "path": str(model),
            "batch_size": 2,
            "max_tokens": 6,
            "isolate": False,
        },
        "database": str(tmp_path / f"{name}.db"),
        "log": {"level": "info", "format": "json"},
        "defaults": {"index_tasks": ["prompt"]},
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _rows(db: Path, root: Path) -> dict[str, tuple]:
    con = sqlite3.connect(db)
    try:
        return {
            os.path.relpath(path, root): (os.path.relpath(sidecar, root), *rest)
            for path, sidecar, *rest in con.execute(f"SELECT path, sidecar, {COLUMNS} FROM images")
        }
    finally:
        con.close()


def _sidecars(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.txt"))}


def _folder(root: Path, n: int) -> Path:
    for i in range(n):
        distinct_image(i, root / ("sub" if i % 3 == 0 else "") / f"img{i:02d}.png")
    shutil.copy(root / "img01.png", root / "copy-of-01.png")  # identical bytes
    (root / "notes.md").write_text("not an image")
    return root


def test_same_sidecars_and_rows_as_caption_and_a_second_run_does_nothing(tmp_path, tiny_llava):
    local = _folder(tmp_path / "local", 7)
    cluster = tmp_path / "cluster"
    shutil.copytree(local, cluster)
    code, out, err = run_cli(
        "--config", str(_config(tmp_path, tiny_llava, "local")), "caption", str(local)
    )
    assert code == 0, out + err
    cfg = _config(tmp_path, tiny_llava, "ray")
    code, out, err = run_cli(
        "--config", str(cfg), "caption", str(cluster), "--ray", "--actors", "2"
    )
    assert code == 0, out + err
    assert "8 new, 0 up to date, 0 failed" in out
    assert _sidecars(cluster) == _sidecars(local)
    assert len(_sidecars(cluster)) == 8
    ray_rows = _rows(tmp_path / "ray.db", cluster)
    assert ray_rows == _rows(tmp_path / "local.db", local)
    assert all(r[7] == "written" for r in ray_rows.values())
    con = sqlite3.connect(tmp_path / "ray.db")
    assert con.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall() == [
        ("done", 8)
    ]

    # Resumable: a second run finds everything done and starts no Ray work.
    mtimes = {p: p.stat().st_mtime_ns for p in cluster.rglob("*.txt")}
    code, out, err = run_cli("--config", str(cfg), "caption", str(cluster), "--ray")
    assert code == 0, out + err
    assert "0 new, 8 up to date" in out
    assert "backfill on ray" not in err
    assert {p: p.stat().st_mtime_ns for p in cluster.rglob("*.txt")} == mtimes


def _actor_pids() -> list[int]:
    """The model actors of this test process's own Ray cluster (its descendants): never
    another process's on a shared machine."""
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "CaptionActor" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def test_an_actor_killed_mid_run_loses_and_repeats_nothing(tmp_path, tiny_llava):
    from watcher.cluster import caption_on_ray
    from watcher.config import load_config

    pics = tmp_path / "pics"
    for i in range(12):
        distinct_image(i, pics / f"img{i:02d}.png")
    cfg = load_config(_config(tmp_path, tiny_llava, "kill"))
    killed: list[tuple[int, int]] = []
    first = threading.Event()

    finished: list[tuple[str, str]] = []

    def progress(outcome, done, total):
        finished.append((outcome.path, outcome.state))
        if not first.is_set():
            first.set()
            pids = _actor_pids()
            assert pids, "no CaptionActor process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append((pids[0], done))

    report = caption_on_ray(cfg, [pics], actors=1, on_progress=progress)
    assert killed and killed[0][1] < 12  # killed with work left for it
    assert report.ok and len(report.captioned) == 12, report.failed
    assert sorted(p.name for p in pics.glob("*.txt")) == [f"img{i:02d}.txt" for i in range(12)]
    assert not [p for p in pics.iterdir() if p.name.endswith(".watcher-tmp")]
    con = sqlite3.connect(tmp_path / "kill.db")
    assert con.execute("SELECT count(*), count(DISTINCT path) FROM images").fetchone() == (12, 12)
    assert con.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall() == [
        ("done", 12)
    ]
    # The driver committed each image once (a batch Ray ran again is not committed again).
    assert sorted(finished) == sorted((str(p), "done") for p in pics.glob("*.png"))
