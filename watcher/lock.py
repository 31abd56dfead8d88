"""One daemon (or one `watcher caption`) per database: an flock beside the database file."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class AlreadyRunning(RuntimeError):
    pass


class DatabaseLock:
    """Held for the life of the process; the OS drops it if the process dies, even by kill -9."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self, what: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise AlreadyRunning(
                f"{holder} is already using {self.path.with_suffix('')}; "
                f"stop it first (or use another database) before running {what}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"watcher {what} (pid {os.getpid()})".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
