"""What each subcommand prints, in the gaps test_cli*.py leave: the full output of a caption
run, `--json` forms, usage errors (exit 2 and a line naming the problem), and the progress
bar on a terminal. The model runs in this process (`isolate: false`), on one shared run."""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from daemon_harness import run_cli, wait_for
from images import distinct_image, write_empty
from rows import image_row
from test_cli import config, row

from watcher.captioning import CaptionReport
from watcher.cli import Progress, print_caption_report
from watcher.config import Config, LogConfig
from watcher.index import Index, connect, transaction
from watcher.messages import Outcome


@dataclass(frozen=True)
class Library:
    """One folder captioned once (module-wide): two images, a sidecar of the user's, an empty
    file that fails, a PDF passed over; what the caption run printed."""

    tmp: Path
    pics: Path
    cfg: Path
    code: int
    out: str
    err: str

    @property
    def db(self) -> Path:
        return self.tmp / "index.db"


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_llava) -> Library:
    tmp = tmp_path_factory.mktemp("library")
    pics = tmp / "pics"
    distinct_image(1, pics / "a.jpg")
    distinct_image(2, pics / "b.jpg")
    distinct_image(3, pics / "mine.jpg")
    (pics / "mine.txt").write_text("hand written\n")
    write_empty(pics / "empty.jpg")
    os.utime(pics / "empty.jpg", (1, 1))  # old: not a file still arriving
    (pics / "notes.pdf").write_bytes(b"%PDF-1.4\n")
    cfg = config(tmp, tiny_llava)
    code, out, err = run_cli("--config", str(cfg), "caption", str(pics))
    return Library(tmp, pics, cfg, code, out, err)


def _failure(library: Library) -> str:
    """The reason the empty file failed, as the jobs table holds it."""
    con = sqlite3.connect(library.db)
    try:
        return con.execute("SELECT error FROM jobs WHERE state = 'failed'").fetchone()[0]
    finally:
        con.close()


def _index(tmp_path: Path, captions: dict[str, str]) -> Path:
    """An index with these rows (path -> caption) and no model run."""
    db_path = tmp_path / "index.db"
    db = connect(db_path)
    with transaction(db):
        for path, caption in captions.items():
            Index(db).upsert(image_row(path, caption))
    db.conn.close()
    return db_path


# -- caption -------------------------------------------------------------------------------


def test_caption_prints_progress_summary_kept_failed_and_passed_over(library):
    pics, reason = library.pics, _failure(library)
    lines = library.out.splitlines()
    progress = sorted(re.sub(r"^\[\d/4\] ", "", ln) for ln in lines if ln.startswith("["))
    assert progress == [
        f"done: {pics / 'a.jpg'} ({pics / 'a.txt'})",
        f"done: {pics / 'b.jpg'} ({pics / 'b.txt'})",
        f"failed: {pics / 'empty.jpg'} ({reason})",
        f"kept: {pics / 'mine.jpg'} (existing sidecar left alone: {pics / 'mine.txt'})",
    ]
    assert sorted(ln[:5] for ln in lines if ln.startswith("[")) == [
        "[1/4]",
        "[2/4]",
        "[3/4]",
        "[4/4]",
    ]
    assert [ln for ln in lines if not ln.startswith("[")] == [
        "3 new, 0 up to date, 1 existing sidecar left alone, 1 failed",
        f"sidecar kept: {pics / 'mine.txt'}: not written by watcher (your own); not overwritten",
        "(`--overwrite always` replaces kept sidecars)",
        f"failed: {pics / 'empty.jpg'}: {reason}",
        "passed over: 1 file (not an image extension): notes.pdf",
    ]
    assert library.code == 1 and reason.strip()


def test_caption_usage_errors_name_the_problem(tmp_path, tiny_llava, capsys):
    cfg = config(tmp_path, tiny_llava)
    base = ("--config", str(cfg))
    assert run_cli(*base, "caption", str(tmp_path / "nope")) == (
        2,
        "",
        f"watcher: {tmp_path / 'nope'}: not a folder\n",
    )
    assert run_cli(*base, "caption", "--task", "query", str(tmp_path)) == (
        2,
        "",
        "watcher: config error: --task query needs --question\n",
    )
    code, _, _ = run_cli(*base, "caption")
    assert code == 2
    assert "the following arguments are required: FOLDER" in capsys.readouterr().err
    code, _, _ = run_cli(*base, "caption", "--overwrite", "sometimes", str(tmp_path))
    assert code == 2 and "invalid choice: 'sometimes'" in capsys.readouterr().err
    assert not (tmp_path / "index.db").exists()


# -- the progress on a terminal, and a run handed to the daemon ----------------------------


class FakeTerminal(io.StringIO):
    """What a terminal receives: the bar's redraws and the log lines, on one stream."""

    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_with_log_lines_above_it(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")  # plain `key=value` log lines
    screen = FakeTerminal()
    cfg = Config(log=LogConfig(level="info", format="console"))
    progress = Progress(screen, screen, cfg)
    progress.start(3, None)
    log = structlog.get_logger("watcher.test")
    try:
        for i in range(3):
            log.info("captioned", path=f"/p/{i}.jpg")
            progress(Outcome(f"/p/{i}.jpg", "done", sidecar=f"/p/{i}.txt"), i + 1, 3)
    finally:
        progress.close()
    text = screen.getvalue()
    segments = [s for ln in text.split("\n") for s in ln.split("\r")]
    bars = [s for s in segments if s.startswith("captioning:")]
    assert bars and re.search(r"3/3 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+ images/s\]", bars[-1]), text
    logs = [s for s in segments if "captioned" in s and "path=" in s]
    assert len(logs) == 3 and all("images/s" not in s for s in logs), text
    # Each log line is written where the bar was (cleared first), then the bar again.
    assert text.index("path=/p/0.jpg") < text.rindex("1/3")
    assert "done: /p/" not in text  # no plain per-image lines on a terminal


def test_progress_lines_off_a_terminal_and_the_daemon_handover(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    cfg = Config(database=tmp_path / "index.db")
    progress = Progress(out, err, cfg)
    progress.start(3, 4242)
    progress(Outcome("/p/a.jpg", "done", "read-only folder", sidecar_state="pending"), 1, 3)
    progress(Outcome("/p/b.jpg", "failed", "cannot identify image file"), 2, 3)
    progress(Outcome("/p/c.jpg", "gone", "image deleted meanwhile"), 3, 3)
    progress.close()
    assert err.getvalue() == (
        f"watcher run (pid 4242) is using {tmp_path / 'index.db'}: handing it 3 images and "
        "following its progress\n"
    )
    assert out.getvalue().splitlines() == [
        "[1/3] sidecar pending: /p/a.jpg (read-only folder)",
        "[2/3] failed: /p/b.jpg (cannot identify image file)",
        "[3/3] gone: /p/c.jpg (image deleted meanwhile)",
    ]


def test_a_daemon_that_stops_before_finishing_is_exit_1_and_says_the_images_stay_queued():
    out, err = io.StringIO(), io.StringIO()
    report = CaptionReport(folders=(Path("/p"),), queued=("/p/a.jpg",), daemon=7, unfinished=True)
    assert print_caption_report(report, out, err) == 1
    assert out.getvalue() == ""
    assert err.getvalue() == (
        "watcher: the daemon stopped before finishing; the images stay queued for its next start\n"
    )


# -- recaption -----------------------------------------------------------------------------


def test_recaption_errors_name_the_image_folder_or_query(library, tmp_path):
    base = ("--config", str(library.cfg))
    text = library.pics / "mine.txt"
    assert run_cli(*base, "recaption", str(text.with_name("gone.jpg"))) == (
        2,
        "",
        f"watcher: {library.pics / 'gone.jpg'}: not an image file\n",
    )
    assert run_cli(*base, "recaption", "--folder", str(library.pics / "a.jpg")) == (
        2,
        "",
        f"watcher: {library.pics / 'a.jpg'}: not a folder\n",
    )
    assert run_cli(*base, "recaption", "--query", "zzzunfindable") == (1, "", "no matches\n")
    empty = tmp_path / "none.db"
    assert run_cli(*base, "--db", str(empty), "recaption", "--query", "x") == (
        1,
        "",
        f"watcher: no index yet at {empty}\n",
    )


# -- retry -----------------------------------------------------------------------------------


def test_retry_dry_run_lists_each_path_then_retry_does_it(tmp_path, tiny_llava, capsys):
    pics = tmp_path / "pics"
    distinct_image(1, pics / "a.jpg")
    for name in ("empty.jpg", "gone.jpg"):
        write_empty(pics / name)
        os.utime(pics / name, (1, 1))
    cfg = config(tmp_path, tiny_llava)
    base = ("--config", str(cfg))
    assert run_cli(*base, "caption", str(pics))[0] == 1
    caption = row(tmp_path / "index.db", pics / "a.jpg")["caption"]
    (pics / "a.txt").unlink()
    (pics / "gone.jpg").unlink()

    assert run_cli(*base, "retry") == (
        2,
        "",
        "watcher: retry needs --all or one or more paths\n",
    )
    code, out, _ = run_cli(*base, "retry", "--all", "--dry-run")
    assert (code, out.splitlines()) == (
        0,
        [
            "would queue 1 failed image again, try 0 pending sidecars, write 1 missing "
            "sidecar from the index, forget 1 failure of deleted images",
            f"would retry: {pics / 'empty.jpg'}",
            f"would write the missing sidecar of: {pics / 'a.jpg'}",
            f"would forget (deleted): {pics / 'gone.jpg'}",
        ],
    )
    assert not (pics / "a.txt").exists()
    code, out, _ = run_cli(*base, "retry", "--all")
    assert (code, out) == (
        0,
        "1 failed image queued again; 0 pending sidecars written; 1 missing sidecar written "
        "again; 1 failure of deleted images forgotten\n",
    )
    assert (pics / "a.txt").read_text() == caption + "\n"
    code, out, _ = run_cli(*base, "retry", str(pics / "a.jpg"))
    assert (code, out) == (0, "0 failed images queued again; 0 pending sidecars written\n")


# -- search ----------------------------------------------------------------------------------


def test_search_prints_path_and_caption_and_says_no_matches(tmp_path, capsys):
    db = _index(tmp_path, {"/p/sky.jpg": "a blue sky", "/p/sea.jpg": "a grey sea"})
    # --mode text: this index has no caption vectors (the default, hybrid, says so on stderr).
    text = ("--db", str(db), "search", "--mode", "text")
    assert run_cli(*text, "sky") == (0, "/p/sky.jpg\n    a blue sky\n", "")
    assert run_cli(*text, "mountain") == (1, "", "no matches\n")
    assert run_cli(*text, "mountain", "--json") == (1, "[]\n", "")
    code, out, _ = run_cli("--db", str(db), "search", "grey", "--json")
    assert code == 0
    assert [(h["path"], h["caption"], h["sidecar"]) for h in json.loads(out)] == [
        ("/p/sea.jpg", "a grey sea", None)
    ]
    missing = tmp_path / "none.db"
    assert run_cli("--db", str(missing), "search", "sky") == (
        1,
        "",
        f"watcher: no index yet at {missing}\n",
    )
    assert not missing.exists()  # search never creates a database
    code, _, _ = run_cli("--db", str(db), "search", "sky", "--limit", "many")
    assert code == 2 and "invalid int value: 'many'" in capsys.readouterr().err


# -- status ----------------------------------------------------------------------------------


def test_status_text_and_json(library):
    reason = _failure(library)
    code, out, _ = run_cli("--config", str(library.cfg), "status")
    assert code == 0
    lines = out.splitlines()
    assert lines[:4] == [
        f"database: {library.db}",
        "daemon: not running",
        "images indexed: 3",
        "queue: 0 pending, 0 running, 3 done, 1 failed",
    ]
    assert re.fullmatch(r"rate: [\d.]+ images/s over the last minute", lines[4]), lines[4]
    assert lines[5:] == [
        "sidecars kept (edited by you; not overwritten): 1",
        f"  {library.pics / 'mine.txt'}: not written by watcher (your own); not overwritten",
        "last failures:",
        f"  {library.pics / 'empty.jpg'}: {reason}",
    ]
    code, out, _ = run_cli("--config", str(library.cfg), "status", "--json")
    report = json.loads(out)
    assert code == 0
    assert (report["database"], report["images"], report["sidecars_kept"]) == (
        str(library.db),
        3,
        1,
    )
    assert [(f["path"], f["reason"]) for f in report["failures"]] == [
        (str(library.pics / "empty.jpg"), reason)
    ]


# -- show ------------------------------------------------------------------------------------


def test_show_a_failed_image_and_without_an_index(library, tmp_path):
    reason, empty = _failure(library), library.pics / "empty.jpg"
    base = ("--config", str(library.cfg))
    assert run_cli(*base, "show", str(empty)) == (0, f"{empty}\n  state: failed: {reason}\n", "")
    code, out, _ = run_cli(*base, "show", str(empty), "--json")
    assert (code, json.loads(out)) == (
        0,
        {"path": str(empty), "exists": True, "job": {"state": "failed", "reason": reason}},
    )
    none = tmp_path / "none.db"
    assert run_cli(*base, "--db", str(none), "show", str(empty)) == (
        1,
        "",
        f"watcher: {empty} is not in the index ({none})\n",
    )


# -- prune -----------------------------------------------------------------------------------


def test_prune_with_nothing_to_remove_and_without_an_index(library, tmp_path):
    base = ("--config", str(library.cfg))
    assert run_cli(*base, "prune", "--dry-run") == (
        0,
        "would remove 0 index rows and 0 jobs of images that no longer exist\n",
        "",
    )
    none = tmp_path / "none.db"
    assert run_cli(*base, "--db", str(none), "prune") == (
        1,
        "",
        f"watcher: no index yet at {none}\n",
    )
    assert not none.exists()


# -- init ------------------------------------------------------------------------------------


def test_init_warns_about_a_folder_that_does_not_exist_yet_and_records_the_db(tmp_path):
    from watcher.config import load_config

    target, later, db = tmp_path / "c.yaml", tmp_path / "later", tmp_path / "my.db"
    code, out, err = run_cli("--config", str(target), "--db", str(db), "init", str(later))
    assert (code, out, err) == (
        0,
        f"wrote {target}: 1 folder; edit it, then `watcher run`\n",
        f"watcher: {later}: not a folder (it is watched anyway once it exists)\n",
    )
    cfg = load_config(target)
    assert ([f.path for f in cfg.folders], cfg.database) == ([later], db)


# -- completion ------------------------------------------------------------------------------


def test_completion_for_zsh_and_an_unknown_shell(capsys):
    code, out, _ = run_cli("completion", "zsh")
    assert code == 0 and "compdef" in out and "watcher" in out
    code, _, _ = run_cli("completion", "fish")
    assert code == 2 and "invalid choice: 'fish'" in capsys.readouterr().err


# -- reload ----------------------------------------------------------------------------------


def test_reload_signals_the_daemon_recorded_in_the_database_or_says_none_runs(tmp_path):
    db = _index(tmp_path, {})
    assert run_cli("--db", str(db), "reload") == (1, "", f"watcher: no daemon is running on {db}\n")
    # A stand-in daemon: a process recorded as the daemon that notes the SIGHUP it gets.
    got = tmp_path / "got-sighup"
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import pathlib, signal, sys, time\n"
            f"signal.signal(signal.SIGHUP, lambda *a: (pathlib.Path({str(got)!r}).touch(),"
            " sys.exit(0)))\n"
            f"pathlib.Path({str(ready)!r}).touch()\n"
            "time.sleep(120)\n",
        ]
    )
    try:
        wait_for(ready.exists, 30, "the stand-in daemon to start")
        con = sqlite3.connect(db)
        with con:
            con.execute(
                "INSERT INTO daemon (id, pid, started, heartbeat, folders, stopped) "
                "VALUES (1, ?, ?, ?, '[]', NULL)",
                (child.pid, time.time(), time.time()),
            )
        con.close()
        assert run_cli("--db", str(db), "reload") == (
            0,
            f"asked the daemon (pid {child.pid}) to reload its config\n",
            "",
        )
        assert child.wait(timeout=30) == 0 and got.exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# -- run -------------------------------------------------------------------------------------


def test_run_refuses_without_folders_and_with_a_folder_as_database(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("log: {level: warning}\n")
    base = ("--config", str(cfg), "--db", str(tmp_path / "index.db"))
    assert run_cli(*base, "run") == (
        2,
        "",
        "watcher: no folders to watch: give them on the command line or under `folders:` "
        f"in {cfg}\n",
    )
    (tmp_path / "pics").mkdir()
    code, out, err = run_cli("--config", str(cfg), "--db", str(tmp_path), "run", str(tmp_path))
    assert (code, out) == (2, "")
    assert err.startswith("watcher: database error: ") and str(tmp_path) in err, err
    assert "Traceback" not in err


# -- model -----------------------------------------------------------------------------------


def test_model_info_names_the_local_model_and_an_action_is_required(library, capsys):
    from watcher.config import load_config

    path = load_config(library.cfg).model.path  # tiny_llava's folder
    code, out, _ = run_cli("--config", str(library.cfg), "model", "info")
    assert code == 0 and f"model.path: {path} (" in out, out
    code, _, _ = run_cli("model")
    assert code == 2 and "the following arguments are required: ACTION" in capsys.readouterr().err


# -- service ---------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="the systemd unit's path")
def test_service_status_when_not_installed_and_an_action_is_required(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    code, out, _ = run_cli("--db", str(tmp_path / "index.db"), "service", "status")
    unit = tmp_path / "xdg" / "systemd" / "user" / "moondream-watcher.service"
    assert (code, out) == (
        3,
        f"not installed ({unit} does not exist); run `watcher service install`\n",
    )
    code, _, _ = run_cli("service", "restart")
    assert code == 2 and "invalid choice: 'restart'" in capsys.readouterr().err
