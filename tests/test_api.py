"""The library API (`from watcher import ...`): the README's example run for real, the report
of caption_folders, its progress calls, and a cheap `import watcher`."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from images import distinct_image, write_empty
from test_cli import config, row

import watcher
import watcher.backends as backends
from watcher import CaptionError, CaptionReport, caption_folders, load_config, open_index

README = Path(__file__).resolve().parent.parent / "README.md"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def readme_library_example() -> str:
    """The python block of the README's "Use it as a library" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Use it as a library\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the library section has one python example"
    return blocks[0]


def test_readme_library_example_runs(tmp_path, tiny_llava):
    code = readme_library_example()
    assert len([ln for ln in code.splitlines() if ln.strip()]) == 5  # the five-line example
    home = tmp_path / "home"
    shoot = home / "Pictures" / "shoot"
    distinct_image(1, shoot / "photo.jpg")
    distinct_image(2, shoot / "bike.jpg")
    # A sidecar of the user's is kept, and its text is what the index holds and searches.
    (shoot / "bike.txt").write_text("a red bicycle against a wall\n")
    cfg = config(tmp_path, tiny_llava)  # isolate: false, log level warning
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_env(HOME=str(home), WATCHER_CONFIG=str(cfg)),
        cwd=tmp_path,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"2 captioned, 0 failed, ok: True\n['{shoot / 'bike.jpg'}']\n"
    photo = row(tmp_path / "index.db", shoot / "photo.jpg")
    assert (shoot / "photo.txt").read_text() == photo["caption"] + "\n"
    assert photo["caption"].split() and photo["caption"] != "a red bicycle against a wall"
    assert (shoot / "bike.txt").read_text() == "a red bicycle against a wall\n"
    assert "Traceback" not in r.stderr


def test_import_watcher_loads_no_model_library_and_exports_resolve():
    probe = (
        "import sys, watcher\n"
        "heavy = [m for m in ('torch', 'transformers', 'PIL') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from watcher import caption_folders\n"
        "assert 'torch' not in sys.modules\n"
        "print(caption_folders.__module__)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, "watcher.captioning\n", "")
    # Every exported name resolves and says what it is.
    for name in watcher.__all__:
        value = getattr(watcher, name)
        if name != "__version__":
            assert (value.__doc__ or "").strip(), f"watcher.{name} has no docstring"
    assert set(watcher.__all__) == {"__version__", *watcher._EXPORTS}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        watcher.nope  # noqa: B018


@pytest.fixture
def folder(tmp_path):
    """Two images to caption, one with a sidecar of the user's, one empty file (fails)."""
    pics = tmp_path / "pics"
    distinct_image(1, pics / "a.jpg")
    distinct_image(2, pics / "b.jpg")
    distinct_image(3, pics / "mine.jpg")
    (pics / "mine.txt").write_text("hand written\n")
    write_empty(pics / "empty.jpg")
    os.utime(pics / "empty.jpg", (1, 1))  # old: not a file still arriving
    return pics


def test_caption_folders_reports_what_it_did_and_calls_progress_once_per_image(
    tmp_path, tiny_llava, folder, monkeypatch
):
    from watcher.log import configure_logging

    cfg = load_config(config(tmp_path, tiny_llava))
    configure_logging(cfg.log)  # the CLI tests before may have left it on a closed stream
    started: list[tuple[int, int | None]] = []
    calls: list[tuple[str, str, int, int]] = []
    report = caption_folders(
        cfg,
        [folder],
        on_start=lambda total, daemon: started.append((total, daemon)),
        on_progress=lambda o, done, total: calls.append((o.path, o.state, done, total)),
    )
    names = ("a.jpg", "b.jpg", "mine.jpg", "empty.jpg")
    assert started == [(4, None)]
    assert sorted(c[0] for c in calls) == sorted(str(folder / n) for n in names)
    assert [(c[2], c[3]) for c in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert {c[0]: c[1] for c in calls}[str(folder / "empty.jpg")] == "failed"

    assert report.ran and report.folders == (folder,) and report.daemon is None
    assert sorted(o.path for o in report.captioned) == sorted(
        str(folder / n) for n in ("a.jpg", "b.jpg", "mine.jpg")
    )
    assert [o.path for o in report.kept] == [str(folder / "mine.jpg")]
    assert [(f.path, bool(f.error.strip())) for f in report.failed] == [
        (str(folder / "empty.jpg"), True)
    ]
    assert (report.new, report.up_to_date, report.captioned_again, report.reused) == (4, 0, [], 0)
    assert (report.ok, report.exit_code) == (False, 1)
    for o in report.captioned:
        if o.sidecar_state == "written":
            assert (
                Path(o.sidecar).read_text()
                == row(tmp_path / "index.db", Path(o.path))["caption"] + "\n"
            )
    assert (folder / "mine.txt").read_text() == "hand written\n"
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.new = 0  # type: ignore[misc]

    # The failed image deleted: the next run has nothing to do and never loads the model.
    (folder / "empty.jpg").unlink()
    monkeypatch.setattr(backends, "open_backend", lambda *a, **k: pytest.fail("model loaded"))
    calls.clear()
    again = caption_folders(cfg, [str(folder)], on_progress=lambda *a: calls.append(a))
    assert (again.ran, again.up_to_date, again.captioned, again.failed, again.ok) == (
        False,
        3,
        (),
        (),
        True,
    )
    assert calls == []

    # A deleted sidecar of ours: written again from the index, no model work.
    (folder / "a.txt").unlink()
    plan = caption_folders(cfg, [folder], dry_run=True)
    assert (plan.dry_run, plan.missing_sidecars, plan.queued) == (
        True,
        (str(folder / "a.jpg"),),
        (),
    )
    assert not (folder / "a.txt").exists()
    done = caption_folders(cfg, [folder])
    assert done.restored == (str(folder / "a.jpg"),) and done.ok
    assert (folder / "a.txt").read_text() == row(tmp_path / "index.db", folder / "a.jpg")[
        "caption"
    ] + "\n"

    hits = open_index(cfg.database).search("hand written")
    assert [r.path for r, _ in hits] == [str(folder / "mine.jpg")]


def test_caption_folders_refuses_what_is_not_a_folder_and_a_query_task_without_question(
    tmp_path, tiny_llava
):
    from watcher import ConfigError

    cfg = load_config(config(tmp_path, tiny_llava))
    (tmp_path / "file.jpg").write_bytes(b"x")
    for bad in (tmp_path / "missing", tmp_path / "file.jpg"):
        with pytest.raises(CaptionError, match=re.escape(f"{bad}: not a folder")):
            caption_folders(cfg, [bad])
    with pytest.raises(ConfigError, match="--task query needs --question"):
        caption_folders(cfg, [tmp_path], task="query")
    assert not (tmp_path / "index.db").exists()  # nothing was started


def test_caption_report_exit_code_follows_failures_pending_sidecars_and_unfinished():
    base = CaptionReport(folders=())
    assert (base.ok, base.exit_code) == (True, 0)
    assert CaptionReport(folders=(), restore_pending=(("/p/a.jpg", "read-only"),)).exit_code == 1
    assert CaptionReport(folders=(), unfinished=True, daemon=7).exit_code == 1
