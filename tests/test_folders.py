"""Watched folders that are missing, go away, come back or are replaced, and folders given on the
command line across reloads (issues 11.8, 12.1, 12.2), through the real daemon.

The daemon checks its folders every WATCHER_FOLDER_CHECK_SECONDS (2 s by default; 0.2 s
here). Each test waits on what a user sees: the sidecar and the job done, `watcher status`,
the log.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from daemon_harness import Daemon, run_cli, wait_for, write_config
from images import distinct_image

pytestmark = pytest.mark.timeout(240)

FAST = {"WATCHER_FOLDER_CHECK_SECONDS": "0.2"}


def _folder(path: Path) -> dict:
    return {"path": str(path), "settle_seconds": 0.2}


def _status(cfg: Path) -> tuple[str, dict]:
    code, text, _ = run_cli("--config", str(cfg), "status")
    assert code == 0
    code, js, _ = run_cli("--config", str(cfg), "status", "--json")
    assert code == 0
    return text, json.loads(js)


def _state(cfg: Path, folder: Path) -> dict | None:
    daemon = _status(cfg)[1]["daemon"]
    for f in (daemon or {}).get("folders", []):
        if f["path"] == str(folder):
            return f
    return None


def _reload(cfg: Path) -> None:
    code, out, err = run_cli("--config", str(cfg), "reload")
    assert code == 0, out + err


def test_reload_after_run_dir_keeps_watching_dir(tmp_path, tiny_llava):
    inbox, configured = tmp_path / "inbox", tmp_path / "configured"
    inbox.mkdir()
    configured.mkdir()
    cfg = write_config(tmp_path, tiny_llava, [_folder(configured)])
    with Daemon(cfg, tmp_path, str(inbox), env=FAST) as d:
        _reload(cfg)
        wait_for(lambda: d.logged("config reloaded"), 30, "the reload")
        assert not d.logged("stopped watching")
        distinct_image(1, inbox / "after-reload.jpg")
        distinct_image(2, configured / "configured.jpg")
        wait_for(lambda: d.captioned(inbox / "after-reload.jpg"), 60, "the command-line folder")
        wait_for(lambda: d.captioned(configured / "configured.jpg"), 60, "the config's folder")
        text, report = _status(cfg)
        assert sorted(f["path"] for f in report["daemon"]["folders"]) == [
            str(configured),
            str(inbox),
        ]
        assert "watching 2 folders" in text


def test_folder_missing_at_start_is_said_and_watched_once_it_appears(tmp_path, tiny_llava):
    inbox, other = tmp_path / "inbox", tmp_path / "other"
    other.mkdir()
    cfg = write_config(tmp_path, tiny_llava, [_folder(other)])
    with Daemon(cfg, tmp_path, str(inbox), env=FAST) as d:
        # Said loudly at start, and in status; the other folder is watched meanwhile.
        [said] = d.logged("watched folder missing", folder=str(inbox))
        assert said["level"] == "error" and said["reason"] == "does not exist"
        state = _state(cfg, inbox)
        assert state["state"] == "missing" and state["missing"] == "does not exist"
        text, _ = _status(cfg)
        line = next(ln for ln in text.splitlines() if ln.startswith(f"  {inbox}"))
        assert "missing since" in line and "waiting for it to appear" in line
        distinct_image(1, other / "o.jpg")
        wait_for(lambda: d.captioned(other / "o.jpg"), 60, "the other folder")
        # A reload does not lose it either.
        _reload(cfg)
        wait_for(lambda: d.logged("config reloaded"), 30, "the reload")
        # It appears, with an image already in it and one added later.
        staging = tmp_path / "staging"
        distinct_image(2, staging / "early.jpg")
        staging.rename(inbox)
        wait_for(
            lambda: d.logged("watched folder is back", folder=str(inbox)), 30, "the folder noticed"
        )
        distinct_image(3, inbox / "late.jpg")
        wait_for(lambda: d.captioned(inbox / "early.jpg"), 60, "the catch-up scan")
        wait_for(lambda: d.captioned(inbox / "late.jpg"), 60, "the new watch")
        assert _state(cfg, inbox)["state"] == "watching"


@pytest.mark.parametrize("gap", [True, False], ids=["noticed-missing", "replaced-at-once"])
def test_root_deleted_and_recreated_is_watched_again(tmp_path, tiny_llava, gap):
    watched = tmp_path / "watched"
    watched.mkdir()
    cfg = write_config(tmp_path, tiny_llava, [_folder(watched)])
    with Daemon(cfg, tmp_path, env=FAST) as d:
        distinct_image(1, watched / "a.jpg")
        wait_for(lambda: d.captioned(watched / "a.jpg"), 60, "a.jpg")
        shutil.rmtree(watched)
        if gap:
            wait_for(lambda: d.logged("watched folder missing"), 30, "the folder missed")
            wait_for(
                lambda: (_state(cfg, watched) or {}).get("state") == "missing",
                30,
                "status says missing",
            )
            watched.mkdir()
            wait_for(lambda: d.logged("watched folder is back"), 30, "the folder back")
        else:
            watched.mkdir()  # a new folder (another inode) at the same name
            wait_for(
                lambda: d.logged("watched folder replaced") or d.logged("watched folder is back"),
                30,
                "the new folder noticed",
            )
        distinct_image(2, watched / "b.jpg")
        wait_for(lambda: d.captioned(watched / "b.jpg"), 60, "an image in the new folder")
        wait_for(lambda: str(watched / "a.jpg") not in d.rows(), 30, "the deleted image's row")
        assert _state(cfg, watched)["state"] == "watching"


def test_root_renamed_away_is_missing_and_a_new_folder_at_its_name_is_watched(tmp_path, tiny_llava):
    watched = tmp_path / "watched"
    watched.mkdir()
    cfg = write_config(tmp_path, tiny_llava, [_folder(watched)])
    with Daemon(cfg, tmp_path, env=FAST) as d:
        distinct_image(1, watched / "a.jpg")
        wait_for(lambda: d.captioned(watched / "a.jpg"), 60, "a.jpg")
        watched.rename(tmp_path / "renamed")
        wait_for(
            lambda: (_state(cfg, watched) or {}).get("state") == "missing",
            30,
            "status says missing",
        )
        state = _state(cfg, watched)
        assert state["indexed_images"] == 1  # the rows are kept: it may be a disk unmounted
        text, _ = _status(cfg)
        line = next(ln for ln in text.splitlines() if ln.startswith(f"  {watched}"))
        assert "missing since" in line and "1 indexed image points into it" in line
        [said] = d.logged("watched folder missing")
        assert said["indexed_images"] == 1
        # A file written into the renamed folder is not ours any more.
        distinct_image(3, tmp_path / "renamed" / "elsewhere.jpg")
        watched.mkdir()
        distinct_image(2, watched / "new.jpg")
        wait_for(lambda: d.captioned(watched / "new.jpg"), 60, "the new folder's image")
        # The catch-up scan of the new folder: the old row (the file is not here) is gone, so
        # search no longer returns it as if present.
        wait_for(lambda: str(watched / "a.jpg") not in d.rows(), 30, "the renamed-away row")
        assert not (tmp_path / "renamed" / "elsewhere.txt").exists()
        assert _state(cfg, watched)["state"] == "watching"
