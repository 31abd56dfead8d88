"""`watcher caption` end to end on a real (tiny, random-weight) transformers model."""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
import yaml
from daemon_harness import cli_config as _config
from daemon_harness import run_cli as _run
from images import distinct_image, write_empty, write_text_as_png


def _rows(db: Path) -> dict[str, tuple]:
    con = sqlite3.connect(db)
    try:
        return {
            r[0]: r[1:]
            for r in con.execute(
                "SELECT path, caption, task, model, sidecar, sidecar_state, width, height "
                "FROM images"
            )
        }
    finally:
        con.close()


def test_caption_twenty_images_search_and_second_run(tmp_path, tiny_llava, monkeypatch):
    pics = tmp_path / "pics"
    for i in range(20):
        distinct_image(i, pics / f"img{i:02d}.jpg")
    cfg = _config(tmp_path, tiny_llava)

    code, out, _ = _run("--config", str(cfg), "caption", str(pics))
    assert code == 0, out
    assert "20 new, 0 up to date, 0 failed" in out
    sidecars = {p.stem: p.read_text() for p in pics.glob("*.txt")}
    assert len(sidecars) == 20
    assert all(t.strip() and t.endswith("\n") for t in sidecars.values())
    rows = _rows(tmp_path / "index.db")
    assert len(rows) == 20
    for path, (caption, task, model, sidecar, state, w, h) in rows.items():
        assert Path(sidecar).read_text() == caption + "\n"
        assert (task, model, state, w, h) == ("short", str(tiny_llava), "written", 96, 72)
        assert sidecar == path[:-4] + ".txt"
    assert not [p for p in os.listdir(pics) if p.startswith(".")], "temp files left behind"

    # A word found in exactly one sidecar finds that image first.
    counts = Counter(w for t in sidecars.values() for w in set(t.lower().split()))
    stem, word = next(
        (s, w) for s, t in sorted(sidecars.items()) for w in t.lower().split() if counts[w] == 1
    )
    code, out, _ = _run("--config", str(cfg), "search", word)
    assert code == 0
    assert out.splitlines()[0] == str(pics / f"{stem}.jpg")

    # Second run: nothing to do, and the model is not even loaded.
    import watcher.backends as backends

    def no_model(_cfg, _log_cfg=None):
        raise AssertionError("the model was loaded on a run with nothing to do")

    monkeypatch.setattr(backends, "open_backend", no_model)
    code, out, _ = _run("--config", str(cfg), "caption", str(pics))
    assert (code, out.strip()) == (0, "0 new, 20 up to date")


def test_hand_written_sidecar_survives_and_ours_is_updated(tmp_path, tiny_llava):
    pics = tmp_path / "pics"
    distinct_image(1, pics / "x.jpg")
    distinct_image(2, pics / "y.jpg")
    (pics / "x.txt").write_text("my own careful caption\n")
    cfg = _config(tmp_path, tiny_llava)
    code, out, _ = _run("--config", str(cfg), "caption", str(pics))
    assert code == 0 and "1 existing sidecar left alone" in out
    assert (pics / "x.txt").read_text() == "my own careful caption\n"
    rows = _rows(tmp_path / "index.db")
    assert rows[str(pics / "x.jpg")][4] == "kept"
    first_y = (pics / "y.txt").read_text()

    # New bytes for both: ours (y.txt, unchanged since we wrote it) is rewritten; the
    # user's x.txt is still left alone.
    distinct_image(7, pics / "x.jpg")
    distinct_image(8, pics / "y.jpg")
    code, out, _ = _run("--config", str(cfg), "caption", str(pics))
    assert code == 0 and "2 new" in out
    assert (pics / "x.txt").read_text() == "my own careful caption\n"
    assert (pics / "y.txt").read_text() != first_y

    # Once the user edits our sidecar, it is theirs.
    (pics / "y.txt").write_text("edited by hand\n")
    distinct_image(9, pics / "y.jpg")
    assert _run("--config", str(cfg), "caption", str(pics))[0] == 0
    assert (pics / "y.txt").read_text() == "edited by hand\n"


def test_overwrite_always_replaces_user_file(tmp_path, tiny_llava):
    pics = tmp_path / "pics"
    distinct_image(1, pics / "x.jpg")
    (pics / "x.txt").write_text("old\n")
    cfg = _config(tmp_path, tiny_llava, defaults={"overwrite": "always"})
    assert _run("--config", str(cfg), "caption", str(pics))[0] == 0
    assert (pics / "x.txt").read_text() != "old\n"


def test_same_stem_images_get_separate_sidecars(tmp_path, tiny_llava):
    pics = tmp_path / "pics"
    distinct_image(1, pics / "photo.jpg")
    distinct_image(2, pics / "photo.png")
    cfg = _config(tmp_path, tiny_llava, log={"level": "info", "format": "json"})
    code, out, err = _run("--config", str(cfg), "caption", str(pics))
    assert code == 0
    rows = _rows(tmp_path / "index.db")
    assert rows[str(pics / "photo.jpg")][3] == str(pics / "photo.txt")
    assert rows[str(pics / "photo.png")][3] == str(pics / "photo.png.txt")
    assert (pics / "photo.txt").read_text() == rows[str(pics / "photo.jpg")][0] + "\n"
    assert (pics / "photo.png.txt").read_text() == rows[str(pics / "photo.png")][0] + "\n"
    assert "sidecar name taken by another image" in err


def test_failures_exit_1_and_are_listed_with_reasons(tmp_path, tiny_llava):
    pics = tmp_path / "pics"
    distinct_image(1, pics / "good.jpg")
    write_empty(pics / "empty.jpg")
    write_text_as_png(pics / "notes.png")
    os.utime(pics / "empty.jpg", (1, 1))  # old: not a file still being written
    os.utime(pics / "notes.png", (1, 1))
    cfg = _config(tmp_path, tiny_llava)
    code, out, _ = _run("--config", str(cfg), "caption", str(pics))
    assert code == 1
    assert "1 new, 0 up to date, 2 failed" in out
    assert f"failed: {pics / 'empty.jpg'}: empty file (0 bytes)" in out
    assert f"failed: {pics / 'notes.png'}: not an image" in out
    assert (pics / "good.txt").exists()
    assert not (pics / "empty.txt").exists() and not (pics / "notes.txt").exists()
    code, out, _ = _run("--config", str(cfg), "status")
    assert f"{pics / 'notes.png'}: not an image" in out


def test_usage_and_config_errors_exit_2(tmp_path, tiny_llava):
    code, _, err = _run("caption", str(tmp_path / "missing"))
    assert code == 2 and "not a folder" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("folders:\n  - path: /x\n    task: detailed\n")
    code, _, err = _run("--config", str(bad), "caption", str(tmp_path))
    assert code == 2
    assert (
        "folders[0].task: expected one of prompt, short, normal, long, query; got 'detailed'" in err
    )
    assert _run("caption")[0] == 2


def test_batched_captions_equal_one_by_one(tmp_path, tiny_llava):
    texts = []
    for batch in (1, 8):
        d = tmp_path / f"b{batch}"
        for i in range(8):
            distinct_image(i, d / "pics" / f"{i}.jpg", size=(60 + 7 * i, 50 + 3 * i))
        cfg = _config(d, tiny_llava)
        data = yaml.safe_load(cfg.read_text())
        data["model"]["batch_size"] = batch
        cfg.write_text(yaml.safe_dump(data))
        assert _run("--config", str(cfg), "caption", str(d / "pics"))[0] == 0
        texts.append([(d / "pics" / f"{i}.txt").read_text() for i in range(8)])
    assert texts[0] == texts[1]
    assert len(set(texts[0])) > 1  # image-sensitive, not one caption for everything


def test_identical_copies_run_the_model_once(tmp_path, tiny_llava):
    pics = tmp_path / "pics"
    distinct_image(3, pics / "a.jpg")
    for name in ("b.jpg", "c.jpg"):
        (pics / name).write_bytes((pics / "a.jpg").read_bytes())
    cfg = _config(tmp_path, tiny_llava)
    code, out, _ = _run("--config", str(cfg), "caption", str(pics))
    assert code == 0
    assert "3 new, 0 up to date (2 copies of identical images, no model work)" in out
    assert len({(pics / n).read_text() for n in ("a.txt", "b.txt", "c.txt")}) == 1


def test_prefix_suffix_and_task_override(tmp_path, tiny_llava):
    pics = tmp_path / "pics"
    distinct_image(4, pics / "a.jpg")
    cfg = _config(tmp_path, tiny_llava, defaults={"prefix": "mytoken", "suffix": "best"})
    assert _run("--config", str(cfg), "caption", "--task", "prompt", str(pics))[0] == 0
    text = (pics / "a.txt").read_text().strip()
    assert text.startswith("mytoken, ") and text.endswith(", best")
    assert _rows(tmp_path / "index.db")[str(pics / "a.jpg")][1] == "prompt"


@pytest.mark.parametrize("task", ["short", "prompt"])
def test_python_dash_m_works(tmp_path, tiny_llava, task):
    import subprocess
    import sys

    pics = tmp_path / "pics"
    distinct_image(5, pics / "a.jpg")
    cfg = _config(tmp_path, tiny_llava)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "watcher",
            "--config",
            str(cfg),
            "caption",
            "--task",
            task,
            str(pics),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "1 new, 0 up to date, 0 failed" in r.stdout


@pytest.mark.timeout(120)
def test_unexpected_writer_error_gives_jobs_back_and_caption_finishes(
    tmp_path, tiny_llava, monkeypatch
):
    """A bug that escapes the writer's batch must not leave jobs `running` (caption would
    wait on them forever): they are retried, and here the retry succeeds."""
    from watcher.index import Index

    pics = tmp_path / "pics"
    for i in range(3):
        distinct_image(i, pics / f"{i}.jpg")
    cfg = _config(tmp_path, tiny_llava, retry_backoff=0.05)
    real_upsert, calls = Index.upsert, []

    def flaky(self, row):
        calls.append(row.path)
        if len(calls) == 1:
            raise RuntimeError("simulated bug in the writer")
        return real_upsert(self, row)

    monkeypatch.setattr(Index, "upsert", flaky)
    code, out, _ = _run("--config", str(cfg), "caption", str(pics))
    assert code == 0, out
    assert "3 new, 0 up to date" in out and "0 failed" in out
    assert len(_rows(tmp_path / "index.db")) == 3
    assert len(calls) > 3  # the first batch really failed and was redone
