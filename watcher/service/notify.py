"""The systemd notify protocol (sd_notify(3)) in a few lines, without a dependency.

    notifier = Notifier.from_env()
    ...load the model...
    notifier.ready(status="watching 2 folders")
    every notifier.watchdog_interval() seconds (when not None): notifier.watchdog()
    on SIGHUP: notifier.reloading(); ...reload...; notifier.ready()
    on SIGTERM: notifier.stopping()

Outside systemd ($NOTIFY_SOCKET unset) every method is a no-op that returns False.
Sending never raises: failures are logged at debug level and reported as False.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("watcher.service.notify")


class Notifier:
    """Sends state changes to the service manager over $NOTIFY_SOCKET."""

    def __init__(
        self,
        address: str | None = None,
        *,
        watchdog_usec: int | None = None,
    ) -> None:
        """`address`: a socket path, '@name' for the abstract namespace, or None (no-op)."""
        self._address: bytes | None = _socket_address(address) if address else None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        unset: bool = False,
        pid: int | None = None,
    ) -> Notifier:
        """From $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID.

        With `unset`, the variables are removed from os.environ (as sd_notify's
        unset_environment does) so that child processes do not talk to systemd for us.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog = _watchdog_usec(env, os.getpid() if pid is None else pid)
        if unset and environ is None:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        return cls(address, watchdog_usec=watchdog)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    # --- messages --------------------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete."""
        return self.send("READY=1", *([_status(status)] if status is not None else []))

    def status(self, text: str) -> bool:
        """A one-line status shown by `systemctl status`."""
        return self.send(_status(text))

    def watchdog(self) -> bool:
        """Still alive; must come more often than WatchdogSec= (see watchdog_interval)."""
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        """Shutdown has begun."""
        return self.send("STOPPING=1")

    def reloading(self) -> bool:
        """A reload has begun; send ready() when it is done.

        MONOTONIC_USEC (CLOCK_MONOTONIC, which is what time.monotonic reads on Linux) is
        what Type=notify-reload services must send with RELOADING=1.
        """
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before a start/stop timeout (EXTEND_TIMEOUT_USEC)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def send(self, *assignments: str) -> bool:
        """Send newline-separated VAR=value assignments in one datagram."""
        if self._address is None or not assignments:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Never wait: with the manager's queue full (it is slow, or a test stopped
                # reading), a blocking send would stall the daemon's main loop. A dropped
                # WATCHDOG/STATUS is sent again at the next tick.
                self._sock.sendto(data, socket.MSG_DONTWAIT, self._address)
            return True
        except OSError as e:
            log.debug(
                "sd_notify failed",
                address=_printable(self._address),
                message=assignments[0],
                error=f"{type(e).__name__}: {e}",
            )
            return False

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    # --- watchdog --------------------------------------------------------------------------

    def watchdog_timeout(self) -> float | None:
        """WatchdogSec= in seconds, or None when the watchdog is off or meant for another PID."""
        return self._watchdog_usec / 1_000_000 if self._watchdog_usec else None

    def watchdog_interval(self) -> float | None:
        """How often to call watchdog(): half the timeout, as sd_watchdog_enabled(3) advises."""
        timeout = self.watchdog_timeout()
        return timeout / 2 if timeout else None


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != pid:
                return None
        except ValueError:
            return None
    return usec


def _socket_address(address: str) -> bytes:
    raw = os.fsencode(address)
    if raw.startswith(b"@"):
        return b"\0" + raw[1:]  # abstract namespace
    return raw


def _printable(address: bytes) -> str:
    return "@" + os.fsdecode(address[1:]) if address.startswith(b"\0") else os.fsdecode(address)


def _status(text: str) -> str:
    # One assignment per line: a newline in the text would start a bogus assignment.
    return "STATUS=" + " ".join(str(text).splitlines())
