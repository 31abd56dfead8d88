"""Hostile surroundings of the process and its database (issue 11: items 3, 5, 9, 10, 11).

Code dropped in the working directory never runs; the lock file and the files beside the
database are never followed or truncated; a database path that is not ours (a folder, a pipe,
another program's SQLite file, a newer schema, a read-only folder) gets a message and exit 2;
`watcher status` tells a stopped daemon from a running one; an idle daemon under a short
systemd watchdog never says its worker is not responding. Each test asserts what the user
sees: the exit code, the message, the files, the log.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_harness import Daemon, run_cli, sidecar_ready, wait_for, write_config
from images import distinct_image

from watcher.index import APPLICATION_ID, SCHEMA_VERSION, connect

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
# What `watcher caption DIR` and `watcher run` run as, besides the in-process runner.
CONSOLE_SCRIPT = Path(sys.executable).parent / "watcher"


def _model(tiny: Path, *, isolate: bool = False) -> dict:
    return {
        "backend": "transformers",
        "path": str(tiny),
        "batch_size": 4,
        "max_tokens": 4,
        "isolate": isolate,
    }


def _config(
    tmp_path: Path, tiny: Path, folders: list[dict] | None = None, *, isolate: bool = False, **extra
) -> Path:
    return write_config(tmp_path, tiny, folders or [], model=_model(tiny, isolate=isolate), **extra)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def _no_traceback(*texts: str) -> None:
    for t in texts:
        assert "Traceback" not in t, t


# --- 3. code in the working directory ----------------------------------------------------------

# Each writes a marker (an absolute path outside the folder) if it is ever imported.
HOSTILE_MODULES = (
    "structlog.py",
    "torch.py",
    "yaml.py",
    "transformers.py",
    "numpy.py",
    "sitecustomize.py",
    "usercustomize.py",
    "PIL/__init__.py",
    "sqlite_utils/__init__.py",
)


def _plant(folder: Path, markers: Path, names: tuple[str, ...]) -> None:
    for name in names:
        f = folder / name
        f.parent.mkdir(parents=True, exist_ok=True)
        marker = markers / name.replace("/", "_")
        f.write_text(f"open({str(marker)!r}, 'w').write('imported')\n")


@pytest.mark.parametrize("how", ["console script", "python -m watcher", "python -I -m watcher"])
def test_code_in_the_working_directory_never_runs(tmp_path, tiny_llava, how):
    """`watcher caption .` in a folder holding a `structlog.py` (torch.py, PIL/, ...): none
    of it is imported, in the CLI or in the model process (model.isolate: true), and every
    image is captioned. `python -m watcher` cannot keep a `watcher/` package in the cwd from
    being imported before our code runs: that is why the service runs `python -I -m`."""
    folder, markers = tmp_path / "shared", tmp_path / "markers"
    markers.mkdir()
    for i in range(3):
        distinct_image(i, folder / f"img{i}.jpg")
    names = HOSTILE_MODULES
    if how != "python -m watcher":
        names += ("watcher/__init__.py", "watcher/__main__.py", "watcher/cli.py")
    _plant(folder, markers, names)
    cfg = _config(tmp_path, tiny_llava, isolate=True)
    argv = {
        "console script": [str(CONSOLE_SCRIPT)],
        "python -m watcher": [sys.executable, "-m", "watcher"],
        "python -I -m watcher": [sys.executable, "-I", "-m", "watcher"],
    }[how]
    r = subprocess.run(
        [*argv, "--config", str(cfg), "caption", "."],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
    )
    assert sorted(p.name for p in markers.iterdir()) == [], r.stderr[-3000:]
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "3 new, 0 up to date" in r.stdout
    for i in range(3):
        assert sidecar_ready(folder / f"img{i}.jpg")


def test_model_process_path_leaves_out_the_working_directory(tmp_path, monkeypatch):
    """The model child's argv (built here, not run) isolates it: -I and an explicit path with
    this package's root and no entry naming the working directory, even when ours had one."""
    from watcher.isolated import python_command, safe_sys_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", str(tmp_path), f"{tmp_path}/.", *sys.path])
    kept = safe_sys_path()
    assert "" not in kept and str(tmp_path) not in kept and f"{tmp_path}/." not in kept
    argv = python_command("watcher.backends.process", ["3", "4"])
    assert argv[:4] == [sys.executable, "-I", "-u", "-c"]
    assert str(tmp_path) not in json.loads(argv[5])
    assert argv[6:] == ["watcher.backends.process", "3", "4"]


def test_service_command_for_a_source_checkout_is_isolated_too(tmp_path, monkeypatch):
    """A checkout that is not installed is put on the service's path explicitly (-I ignores
    PYTHONPATH); the command runs, from a home folder full of traps, and imports none."""
    import plistlib

    from watcher.config import Config
    from watcher.service import install as service

    monkeypatch.setattr(service, "_python_path", lambda python: str(ROOT))
    home, markers = tmp_path / "home", tmp_path / "markers"
    home.mkdir()
    markers.mkdir()
    _plant(home, markers, (*HOSTILE_MODULES, "watcher/__init__.py"))
    missing = tmp_path / "no config.yaml"
    cfg = Config().with_folders([tmp_path / "pics"])
    argv = plistlib.loads(service.render_launchd(cfg, missing, home=home, env={}))[
        "ProgramArguments"
    ]
    assert argv[1:3] == ["-I", "-u"]
    unit = service.render_systemd(cfg, missing, env={})
    assert "-I -u -c" in unit and "PYTHONPATH" not in unit
    r = subprocess.run(
        argv,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=120,
        env={**_env(), "PYTHONPATH": str(home)},
    )
    assert sorted(p.name for p in markers.iterdir()) == [], r.stderr
    assert r.returncode == 2 and str(missing) in r.stderr and "not found" in r.stderr, r.stderr


# --- 5. the lock file ---------------------------------------------------------------------------

# How the lock file was prepared -> what the refusal says after its path.
LOCK_TRAPS = {
    "symlink": "is a symbolic link",
    "dangling symlink": "is a symbolic link",
    "hard link": "has other hard links",
    "fifo": "is not a regular file",
    "folder": "is a folder",
}


@pytest.mark.parametrize("trap", list(LOCK_TRAPS))
@pytest.mark.parametrize("command", ["caption", "run"])
def test_lock_file_is_never_followed_nor_truncated(tmp_path, tiny_llava, trap, command):
    folder = tmp_path / "pics"
    distinct_image(1, folder / "a.jpg")
    db = tmp_path / "data" / "index.db"
    db.parent.mkdir()
    lock = db.with_name("index.db.lock")
    victim = tmp_path / "victim"
    victim.write_text("precious, not ours\n")
    before = (victim.read_bytes(), victim.stat().st_mtime_ns)
    if trap == "symlink":
        lock.symlink_to(victim)
    elif trap == "dangling symlink":
        lock.symlink_to(tmp_path / "not-there")
    elif trap == "hard link":
        os.link(victim, lock)
    elif trap == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    cfg = _config(tmp_path, tiny_llava, database=str(db))
    code, out, err = run_cli("--config", str(cfg), command, str(folder))
    assert code == 2, out + err
    assert f"watcher: database error: {lock} {LOCK_TRAPS[trap]}" in err, err
    _no_traceback(out, err)
    assert (victim.read_bytes(), victim.stat().st_mtime_ns) == before
    assert not (tmp_path / "not-there").exists()
    assert not (folder / "a.txt").exists()


def test_files_beside_the_database_are_never_followed(tmp_path, tiny_llava):
    folder = tmp_path / "pics"
    distinct_image(1, folder / "a.jpg")
    db = tmp_path / "index.db"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    cfg = _config(tmp_path, tiny_llava, database=str(db))
    for suffix in ("-wal", "-shm", "-journal"):
        link = Path(str(db) + suffix)
        link.symlink_to(victim)
        for argv in (("caption", str(folder)), ("status",), ("retry", "--all")):
            code, out, err = run_cli("--config", str(cfg), *argv)
            assert code == 2, (suffix, argv, out, err)
            assert f"{link} is not a regular file" in err, err
        assert victim.read_text() == "precious\n" and link.is_symlink()
        link.unlink()
    code, out, err = run_cli("--config", str(cfg), "caption", str(folder))
    assert code == 0 and sidecar_ready(folder / "a.jpg"), out + err


# --- 9. database problems -------------------------------------------------------------------


def _foreign_sqlite(path: Path, kind: str) -> Path:
    con = sqlite3.connect(path)
    if kind == "other tables":
        con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        con.execute("INSERT INTO notes (body) VALUES ('keep me')")
    elif kind == "our table names":  # meta/images/jobs but not ours: no version, no mark
        for t in (
            "meta (key TEXT, value TEXT)",
            "images (path TEXT)",
            "jobs (path TEXT)",
            "daemon (id INTEGER)",
        ):
            con.execute(f"CREATE TABLE {t}")
    elif kind == "another application id":
        con.execute("PRAGMA application_id = 42")
        con.execute("CREATE TABLE t (x)")
    elif kind == "application id, no tables":
        con.execute("PRAGMA application_id = 42")
        con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()
    return path


COMMANDS = [
    ("status",),
    ("status", "--json"),
    ("search", "cat"),
    ("retry", "--all"),
    ("caption", "{folder}"),
    ("run", "{folder}"),
    ("reload",),
]


def _run_all(cfg: Path, folder: Path, commands=COMMANDS):
    for argv in commands:
        argv = [a.format(folder=folder) for a in argv]
        code, out, err = run_cli("--config", str(cfg), *argv)
        _no_traceback(out, err)
        yield argv, code, out, err


@pytest.mark.parametrize(
    "kind",
    ["other tables", "our table names", "another application id", "application id, no tables"],
)
def test_another_programs_sqlite_file_is_never_changed(tmp_path, tiny_llava, kind):
    folder = tmp_path / "pics"
    distinct_image(1, folder / "a.jpg")
    db = _foreign_sqlite(tmp_path / "their.db", kind)
    digest = _sha(db)
    cfg = _config(tmp_path, tiny_llava, database=str(db))
    for argv, code, out, err in _run_all(cfg, folder):
        if argv == ["reload"]:
            # Nothing to signal: said as before, but the file was not touched either.
            assert code in (1, 2), err
            continue
        assert code == 2, (argv, out, err)
        assert f"{db} is not a moondream-watcher database" in err, (argv, err)
        assert _sha(db) == digest, argv
    # Nothing created beside it either: no lock file, no -wal or -shm.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("their.db")) == [
        "their.db"
    ]
    assert not (folder / "a.txt").exists()


@pytest.mark.parametrize(
    "content",
    [
        b"just some notes\n",
        b"\xff\xd8\xff\xe0" + bytes(600),
        os.urandom(5000),
        b"SQLite format 2\x00" + bytes(100),
    ],
)
def test_a_file_that_is_not_sqlite_is_refused(tmp_path, tiny_llava, content):
    folder = tmp_path / "pics"
    distinct_image(1, folder / "a.jpg")
    db = tmp_path / "index.db"
    db.write_bytes(content)
    cfg = _config(tmp_path, tiny_llava, database=str(db))
    for argv, code, out, err in _run_all(cfg, folder, COMMANDS[:-1]):
        assert code == 2, (argv, out, err)
        assert f"{db} is not a SQLite database" in err, (argv, err)
    assert db.read_bytes() == content


def test_a_damaged_sqlite_file_gives_a_message(tmp_path, tiny_llava):
    folder = tmp_path / "pics"
    distinct_image(1, folder / "a.jpg")
    good = tmp_path / "good.db"
    connect(good).conn.close()
    db = tmp_path / "index.db"  # our header (and mark), then garbage: a damaged copy
    db.write_bytes(good.read_bytes()[:100] + os.urandom(8000))
    cfg = _config(tmp_path, tiny_llava, database=str(db))
    for argv, code, out, err in _run_all(
        cfg, folder, [("status",), ("search", "x"), ("caption", "{folder}")]
    ):
        assert code == 2, (argv, out, err)
        assert f"watcher: database error: the database {db} is damaged" in err, err


@pytest.mark.parametrize("what", ["folder", "fifo", "parent is a file", "dangling symlink"])
def test_a_database_path_that_is_no_file_is_refused(tmp_path, tiny_llava, what):
    folder = tmp_path / "pics"
    distinct_image(1, folder / "a.jpg")
    if what == "folder":
        db = tmp_path / "dbdir"
        db.mkdir()
        expected = f"{db} is a folder, not a database file"
    elif what == "fifo":
        db = tmp_path / "index.db"
        os.mkfifo(db)
        expected = f"{db} is not a regular file"
    elif what == "parent is a file":
        (tmp_path / "afile").write_text("x")
        db = tmp_path / "afile" / "index.db"
        expected = "Not a directory (ENOTDIR)"
    else:
        db = tmp_path / "index.db"
        db.symlink_to(tmp_path / "elsewhere.db")
        expected = "is a symbolic link"
    before = sorted(p.name for p in tmp_path.iterdir())
    # A real process: a pipe opened as a database would hang it; a traceback would show.
    for argv in (
        ["status"],
        ["search", "x"],
        ["caption", str(folder)],
        ["retry", "--all"],
        ["run", str(folder)],
    ):
        r = subprocess.run(
            [str(CONSOLE_SCRIPT), "--db", str(db), *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(),
            cwd=tmp_path,
        )
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
        assert "watcher: database error:" in r.stderr and expected in r.stderr, r.stderr
        _no_traceback(r.stdout, r.stderr)
    # No stray `dbdir.lock`, nothing created through the link, no half-made database.
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (folder / "a.txt").exists()


def test_an_empty_file_is_initialised(tmp_path, tiny_llava):
    folder = tmp_path / "pics"
    distinct_image(1, folder / "a.jpg")
    db = tmp_path / "index.db"
    db.touch()
    cfg = _config(tmp_path, tiny_llava, database=str(db))
    code, out, err = run_cli("--config", str(cfg), "status")
    assert code == 0 and "images indexed: 0" in out and db.stat().st_size == 0, err
    code, out, err = run_cli("--config", str(cfg), "caption", str(folder))
    assert code == 0 and "1 new" in out, err
    assert sqlite3.connect(db).execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
    code, out, err = run_cli("--config", str(cfg), "status")
    assert code == 0 and "images indexed: 1" in out


def test_a_database_made_before_the_mark_is_still_ours(tmp_path, tiny_llava):
    folder = tmp_path / "pics"
    distinct_image(1, folder / "a.jpg")
    db = tmp_path / "index.db"
    cfg = _config(tmp_path, tiny_llava, database=str(db))
    assert run_cli("--config", str(cfg), "caption", str(folder))[0] == 0
    con = sqlite3.connect(db)
    con.execute("PRAGMA application_id = 0")  # as every database was before this change
    con.commit()
    con.close()
    code, out, err = run_cli("--config", str(cfg), "status")
    assert code == 0 and "images indexed: 1" in out, err
    assert sqlite3.connect(db).execute("PRAGMA application_id").fetchone() == (0,)  # read-only
    distinct_image(2, folder / "b.jpg")
    code, out, err = run_cli("--config", str(cfg), "caption", str(folder))
    assert code == 0 and "1 new, 1 up to date" in out, err
    assert sqlite3.connect(db).execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)


def test_a_newer_schema_is_refused(tmp_path, tiny_llava):
    folder = tmp_path / "pics"
    distinct_image(1, folder / "a.jpg")
    db = tmp_path / "index.db"
    connect(db).conn.close()
    con = sqlite3.connect(db)
    con.execute(
        "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
    )
    con.commit()
    con.close()
    digest = _sha(db)
    cfg = _config(tmp_path, tiny_llava, database=str(db))
    for argv, code, out, err in _run_all(cfg, folder, COMMANDS[:-1]):
        assert code == 2, (argv, out, err)
        assert (
            f"database schema {SCHEMA_VERSION + 1} is newer than this watcher "
            f"({SCHEMA_VERSION}); upgrade moondream-watcher"
        ) in err, (argv, err)
    assert _sha(db) == digest


def _unprivileged_wrapper():
    from test_hostile import _unprivileged_wrapper as wrapper

    return wrapper()


@pytest.mark.slow  # six interpreters per case, one of them captioning
@pytest.mark.parametrize("read_only", ["folder", "folder and file", "file"])
def test_a_read_only_database_is_read_and_not_written(tmp_path, tiny_llava, read_only):
    """status and search work; caption, retry and run say they cannot write, exit 2."""
    wrapper = _unprivileged_wrapper()
    if wrapper is None:
        pytest.skip("root that cannot drop its capabilities: chmod does not bind it")
    folder = tmp_path / "pics"
    distinct_image(1, folder / "a.jpg")
    data = tmp_path / "data"
    db = data / "index.db"
    cfg = _config(tmp_path, tiny_llava, database=str(db))
    # In a process of its own: no connection left open here keeps a writable -wal beside it.
    r = subprocess.run(
        [str(CONSOLE_SCRIPT), "--config", str(cfg), "caption", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert r.returncode == 0 and not (data / "index.db-wal").exists(), r.stderr
    con = sqlite3.connect(db)
    word = con.execute("SELECT caption FROM images").fetchone()[0].split()[0]
    con.close()
    distinct_image(2, folder / "b.jpg")
    if read_only != "folder":
        db.chmod(0o444)
    if read_only != "file":
        data.chmod(0o555)
    before = sorted(p.name for p in data.iterdir())

    def watcher(*argv: str) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [*wrapper, sys.executable, "-m", "watcher", "--config", str(cfg), *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(),
        )
        _no_traceback(r.stdout, r.stderr)
        return r

    try:
        st = watcher("status")
        assert st.returncode == 0 and "images indexed: 1" in st.stdout, st.stderr
        found = watcher("search", word)
        assert found.returncode == 0 and str(folder / "a.jpg") in found.stdout, found.stderr
        for argv in (["caption", str(folder)], ["retry", "--all"], ["run", str(folder)]):
            r = watcher(*argv)
            assert r.returncode == 2, (argv, r.stdout, r.stderr)
            assert "watcher: database error: cannot " in r.stderr, r.stderr
            assert "`watcher status` and `watcher search` still work read-only" in r.stderr
        assert not (folder / "b.txt").exists()
        # Nothing new beside it (in a writable folder SQLite may leave its empty -wal/-shm).
        extra = {"index.db-wal", "index.db-shm"} if read_only == "file" else set()
        assert sorted(p.name for p in data.iterdir() if p.name not in extra) == before
    finally:
        data.chmod(0o755)
        db.chmod(0o644)


# --- 9. the database deleted or replaced under the daemon ---------------------------------------


@pytest.mark.slow  # two daemon starts
@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_database_deleted_under_the_daemon_stops_it_loudly(tmp_path, tiny_llava, how):
    watched = tmp_path / "watched"
    distinct_image(1, watched / "a.jpg")
    cfg = _config(tmp_path, tiny_llava, [{"path": str(watched), "settle_seconds": 0.2}])
    d = Daemon(cfg, tmp_path).start()
    try:
        wait_for(lambda: d.captioned(watched / "a.jpg"), 60, "first caption")
        if how == "deleted":
            d.db.unlink()
        else:
            other = _foreign_sqlite(tmp_path / "other.db", "other tables")
            digest = _sha(other)
            os.replace(other, d.db)
        wait_for(lambda: d.proc.poll() is not None, 30, "the daemon to stop")
    finally:
        code = d.stop()
    assert code == 1, d.log_text()[-3000:]
    [line] = d.logged(
        "database file deleted or replaced while running; stopping (exit 1) "
        "so that a restart opens the database at its path"
    )
    assert line["database"] == str(d.db) and line["gone"] is (how == "deleted")
    assert f"the database {d.db} was {how} while running; stopping" in d.log_text()
    if how == "replaced":
        assert _sha(d.db) == digest  # another program's file: not one byte changed
        return
    # What systemd's Restart=on-failure does next: a new start makes a new database.
    distinct_image(2, watched / "b.jpg")
    with Daemon(cfg, tmp_path) as again:
        wait_for(
            lambda: again.captioned(watched / "b.jpg") and again.captioned(watched / "a.jpg"),
            60,
            "captions in the new database",
        )
        code, out, err = run_cli("--config", str(cfg), "status")
        assert code == 0 and "images indexed: 2" in out and "daemon: running" in out


# --- 10. status that is true --------------------------------------------------------------------


@pytest.mark.slow  # waits out HEARTBEAT_STALE (30 s) on purpose
def test_a_stopped_daemon_is_shown_as_not_responding(tmp_path, tiny_llava):
    """SIGSTOP leaves the pid alive: the heartbeat's age tells it is not running."""
    from watcher.service.status import HEARTBEAT_STALE

    watched = tmp_path / "watched"
    watched.mkdir()
    cfg = _config(tmp_path, tiny_llava, [{"path": str(watched)}])
    with Daemon(cfg, tmp_path) as d:
        pid = d.proc.pid
        code, out, _ = run_cli("--config", str(cfg), "status")
        assert code == 0 and f"daemon: running (pid {pid})" in out, out
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            out = wait_for(
                lambda: (lambda r: "not responding" in r[1] and r[1])(
                    run_cli("--config", str(cfg), "status")
                ),
                HEARTBEAT_STALE + 60,
                "status to notice",
                interval=0.5,
            )
            assert time.monotonic() - t0 > HEARTBEAT_STALE - 3  # not before it is stale
            m = re.search(rf"daemon: not responding \(pid {pid}, last heartbeat (\d+) s ago\)", out)
            assert m and int(m.group(1)) >= HEARTBEAT_STALE, out
            report = json.loads(run_cli("--config", str(cfg), "status", "--json")[1])
            assert report["daemon"]["responding"] is False
            assert report["daemon"]["heartbeat_age"] >= HEARTBEAT_STALE
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(
            lambda: f"daemon: running (pid {pid})" in run_cli("--config", str(cfg), "status")[1],
            30,
            "running again",
            interval=0.2,
        )


def test_pending_sidecars_heading_does_not_guess_the_reason(tmp_path, tiny_llava):
    """Sidecars pending for a name too long and for a folder in the way: the heading says
    what to do, each path its own reason (not "folder not writable" for all)."""
    folder = tmp_path / "pics"
    stem = "x" * 248
    distinct_image(1, folder / f"{stem}.jpg")
    distinct_image(2, folder / f"{stem}.png")  # {name}.txt is 256 bytes: too long
    distinct_image(3, folder / "b.jpg")
    (folder / "b.txt").mkdir()  # a folder where the sidecar goes (overwrite: always)
    cfg = _config(tmp_path, tiny_llava, [{"path": str(folder), "overwrite": "always"}])
    code, out, err = run_cli("--config", str(cfg), "caption", str(folder))
    assert code == 0, out + err
    code, out, err = run_cli("--config", str(cfg), "status")
    assert code == 0, err
    assert "folder not writable" not in out
    assert (
        "sidecars pending (caption kept in the index; `watcher retry --all` once the "
        "reason is fixed): 2"
    ) in out, out
    assert (
        f"  {folder / stem}.png: cannot write sidecar: File name too long (ENAMETOOLONG)" in out
    ), out
    assert f"  {folder / 'b.jpg'}: cannot write sidecar: Is a directory (EISDIR)" in out, out


# --- 11. the watchdog and an idle worker ------------------------------------------------------


@pytest.mark.parametrize("watchdog_usec", [1_000_000, 2_000_000])
def test_idle_daemon_under_a_short_watchdog_is_never_not_responding(
    tmp_path, tiny_llava, watchdog_usec
):
    """The idle worker wakes once a second; the watchdog judges it every 1/6 of WatchdogSec.
    Idle is not stuck: pings keep coming and the log never says "not responding"."""
    watched = tmp_path / "watched"
    watched.mkdir()
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    cfg = _config(tmp_path, tiny_llava, [{"path": str(watched)}])
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": str(watchdog_usec)}
    pings = 0

    def ping_count(at_least: int) -> bool:
        nonlocal pings
        pings += sock.recv(4096).decode().splitlines().count("WATCHDOG=1")
        return pings >= at_least

    try:
        with Daemon(cfg, tmp_path, env=env) as d:
            # Five watchdog periods of pings, at one ping per loop tick (WatchdogSec / 6).
            wait_for(lambda: ping_count(30), 120, "30 WATCHDOG=1 pings")
            stuck = d.logged("model worker is not responding; not confirming the watchdog")
            assert not stuck and not d.logged("model worker responding again"), stuck
            # (The watchdog still bites on a worker busy for too long: test_daemon_service.py::
            # test_hung_model_worker_stops_the_watchdog_pings_and_idle_does_not.)
    finally:
        sock.close()


def test_a_notify_socket_nobody_reads_never_blocks_the_daemon(tmp_path):
    """systemd slow to read (or a socket nobody reads): sends fail fast, they never wait."""
    import threading

    from watcher.service.notify import Notifier

    path = tmp_path / "full.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    results: list[bool] = []
    n = Notifier(str(path))
    sender = threading.Thread(
        target=lambda: results.extend(n.watchdog() for _ in range(5000)), daemon=True
    )
    try:
        sender.start()
        sender.join(30)
        assert not sender.is_alive(), "a send blocked on the full socket"
        assert results[0] is True and results[-1] is False  # queued, then dropped when full
    finally:
        sock.close()
        n.close()
