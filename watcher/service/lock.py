"""One daemon (or one `watcher caption`) per database: an flock beside the database file."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from watcher.index import DatabaseError, os_reason, verify


class AlreadyRunning(RuntimeError):
    pass


class LockError(DatabaseError):
    """The lock file cannot be used (a link, not a plain file, a folder we cannot write)."""


class DatabaseLock:
    """Held for the life of the process; the OS drops it if the process dies, even by kill -9."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self.db_path = db_path
        self._fd: int | None = None

    def acquire(self, what: str) -> None:
        # The database first: a folder or another program's file given as --db is refused
        # before anything (this lock file included) is created beside it.
        verify(self.db_path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Never follow a link (`ln -s victim index.db.lock` must not reach victim), never
            # truncate on open, never block (a named pipe put there).
            fd = os.open(
                self.path,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                0o666,
            )
        except OSError as e:
            raise LockError(self._refusal(e, what)) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise LockError(
                    f"{self.path} is not a regular file; refusing to use it as the "
                    "lock. Remove it if no watcher is running"
                )
            if st.st_nlink != 1:
                # A hard link to someone's file: writing our pid would change that file.
                raise LockError(
                    f"{self.path} has other hard links; refusing to write to it. "
                    "Remove it if no watcher is running"
                )
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise AlreadyRunning(
                f"{holder} is already using {self.path.with_suffix('')}; "
                f"stop it first (or use another database) before running {what}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # Ours now (a plain file with one name, locked): the holder's text replaces the last.
        os.ftruncate(fd, 0)
        os.write(fd, f"watcher {what} (pid {os.getpid()})".encode())
        self._fd = fd

    def _refusal(self, e: OSError, what: str) -> str:
        if e.errno == errno.ELOOP:
            return (
                f"{self.path} is a symbolic link; refusing to open it (it could point at "
                "any file). Remove it if no watcher is running"
            )
        if e.errno == errno.EISDIR:
            return f"{self.path} is a folder; refusing to use it as the lock. Remove it"
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return (
                f"cannot create the lock file {self.path}: {os_reason(e)}. `watcher "
                f"{what}` needs to write in the database folder {self.path.parent}; "
                "`watcher status` and `watcher search` still work read-only"
            )
        return f"cannot open the lock file {self.path}: {os_reason(e)}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
