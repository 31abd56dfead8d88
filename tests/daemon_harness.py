"""Run the real daemon in a subprocess and wait on what it does, with deadlines."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from watcher.paths import decode, encode


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 60.0,
    what: str = "condition",
    interval: float = 0.05,
):
    """Poll `predicate` until truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def children(pid: int) -> list[int]:
    """Living child processes of `pid` (the daemon's model process), from /proc (Linux)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(entry))
    return kids


def memory_mib(pid: int, key: str) -> float:
    """VmRSS (now) or VmHWM (the peak so far), in MiB, of `pid` plus its children: the
    daemon and its model process. (Summed peaks: never less than the peak of the sum.)"""
    total = 0.0
    for p in (pid, *children(pid)):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue
        # A process that has exited but is not yet reaped has no memory lines.
        kb = next((int(ln.split()[1]) for ln in lines if ln.startswith(key + ":")), 0)
        total += kb / 1024
    return total


def run_cli(*argv: str) -> tuple[int, str, str]:
    """`watcher ARGV...` in-process, as the CLI runner: (exit code, stdout, stderr)."""
    from watcher.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def write_config(
    tmp_path: Path, model_path: Path, folders: list[dict], *, name: str = "config.yaml", **extra
) -> Path:
    """`tmp_path/name`: a config for the tiny model with JSON log lines; `extra` replaces
    top-level sections (`model=`, `database=`, ...)."""
    data = {
        "model": {
            "backend": "transformers",
            "path": str(model_path),
            "batch_size": 8,
            "max_tokens": 6,
        },
        "database": str(tmp_path / "index.db"),
        "log": {"level": "info", "format": "json"},
        "folders": folders,
        "retry_backoff": 0.2,
    }
    data.update(extra)
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def cli_config(tmp_path: Path, model: Path, **extra) -> Path:
    """`tmp_path/config.yaml` for one-shot commands: the tiny model in-process (no worker
    process to start), warnings only; `extra` replaces top-level sections (`folders=`)."""
    data = {
        "model": {
            "backend": "transformers",
            "path": str(model),
            "batch_size": 4,
            "max_tokens": 8,
            "isolate": False,
        },
        "database": str(tmp_path / "index.db"),
        "log": {"level": "warning"},
        "retry_backoff": 0.05,
    }
    data.update(extra)
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


class Daemon:
    def __init__(
        self,
        config: Path,
        tmp_path: Path,
        *args: str,
        env: dict | None = None,
        wrapper: tuple[str, ...] = (),
    ):
        """`wrapper`: a command the daemon runs under (e.g. setpriv dropping capabilities)."""
        self.config = config
        self.wrapper = tuple(wrapper)
        self.db = Path(yaml.safe_load(config.read_text())["database"])
        self.log_path = tmp_path / f"daemon-{time.monotonic_ns()}.log"
        self.args = args
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True) -> Daemon:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                *self.wrapper,
                sys.executable,
                "-m",
                "watcher",
                "--config",
                str(self.config),
                "run",
                *self.args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        if wait_ready:
            wait_for(lambda: self.logged("watching") or self._dead(), 120, "daemon start")
            assert self.proc.poll() is None, self.log_text()
        return self

    def _dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def logged(self, event: str, **fields) -> list[dict]:
        return [
            e
            for e in self.events()
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    def wait_logged(self, event: str, timeout: float = 30.0, **fields) -> list[dict]:
        """The `event` lines with these fields, once there is at least one. The writer logs
        `captioned` just after its commit, so `captioned()` can be true a moment before the
        line is there: a test counting those lines waits for them with this."""
        return wait_for(lambda: self.logged(event, **fields), timeout, f"a {event!r} line")

    def wait_scanned(self, folders: int = 1, timeout: float = 60.0) -> None:
        """Until the start-up catch-up scan of `folders` folders is done. A file written
        before a scan lists its folder is queued by the scan, not through settle: a test
        about how new files settle writes them after this."""
        wait_for(lambda: len(self.logged("scan done")) >= folders, timeout, "the catch-up scan")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            tail = self.log_text()[-3000:]
            raise AssertionError("daemon did not stop in time:\n" + tail) from None
        self._log.close()
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()

    # -- what the user sees -------------------------------------------------------------
    def rows(self) -> dict[str, dict]:
        return index_rows(self.db)

    def captioned(self, image: Path) -> bool:
        """The image's sidecar is complete and its job is done. (The writer renames the
        sidecar into place before it commits the row and the job: a test that reads the
        index must wait for this, not for the sidecar alone.)"""
        return sidecar_ready(image) and self.job_state(image) == ("done", None)

    def job_state(self, path: Path) -> tuple | None:
        con = sqlite3.connect(self.db, timeout=30)
        try:
            return con.execute(
                "SELECT state, error FROM jobs WHERE path = ?", (encode(path),)
            ).fetchone()
        finally:
            con.close()


def sidecar_ready(image: Path) -> bool:
    side = image.with_suffix(".txt")
    return side.exists() and side.read_text().endswith("\n")


def index_rows(db: Path) -> dict[str, dict]:
    """Every `images` row of the index at `db`, keyed by the real path (stored paths are
    encoded: watcher.paths); {} when there is no index yet."""
    if not db.exists():
        return {}
    con = sqlite3.connect(db, timeout=30)
    con.row_factory = sqlite3.Row
    try:
        return {decode(r["path"]): dict(r) for r in con.execute("SELECT * FROM images")}
    except sqlite3.OperationalError:
        return {}
    finally:
        con.close()


def job_states(db: Path) -> dict[str, str]:
    """Every job's state (`pending`, `running`, `done`, ...) in the index at `db`, keyed by
    the real path."""
    con = sqlite3.connect(db, timeout=30)
    try:
        return {decode(path): state for path, state in con.execute("SELECT path, state FROM jobs")}
    finally:
        con.close()
