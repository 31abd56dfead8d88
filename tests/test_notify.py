"""sd_notify over a real AF_UNIX datagram socket, by path and in the abstract namespace."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from watcher.service.notify import Notifier

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs AF_UNIX sockets")


@pytest.fixture
def path_socket():
    # sun_path holds at most 107 bytes; pytest's tmp_path can be longer than that.
    d = Path(tempfile.mkdtemp(prefix="sdn-"))
    addr = str(d / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(addr)
    sock.settimeout(2)
    yield addr, sock
    sock.close()
    os.unlink(addr)
    d.rmdir()


@pytest.fixture
def abstract_socket():
    if not sys.platform.startswith("linux"):
        pytest.skip("the abstract socket namespace is Linux-only")
    name = f"watcher-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    yield "@" + name, sock
    sock.close()


def recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_messages_over_a_path_socket(path_socket):
    addr, sock = path_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": addr})
    assert n.enabled
    assert n.ready(status="watching 2 folders")
    assert recv(sock) == ["READY=1", "STATUS=watching 2 folders"]
    assert n.status("captioning\nline two")
    assert recv(sock) == ["STATUS=captioning line two"]
    assert n.watchdog()
    assert recv(sock) == ["WATCHDOG=1"]
    before = time.monotonic_ns() // 1000
    assert n.reloading()
    reloading, monotonic = recv(sock)
    after = time.monotonic_ns() // 1000
    assert reloading == "RELOADING=1"
    assert monotonic.startswith("MONOTONIC_USEC=")
    assert before <= int(monotonic.split("=", 1)[1]) <= after
    assert n.ready()
    assert recv(sock) == ["READY=1"]
    assert n.extend_timeout(30)
    assert recv(sock) == ["EXTEND_TIMEOUT_USEC=30000000"]
    assert n.stopping()
    assert recv(sock) == ["STOPPING=1"]
    n.close()


def test_abstract_namespace(abstract_socket):
    addr, sock = abstract_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": addr})
    assert n.ready()
    assert recv(sock) == ["READY=1"]
    assert n.stopping()
    assert recv(sock) == ["STOPPING=1"]


def test_no_socket_is_a_no_op():
    n = Notifier.from_env({})
    assert not n.enabled
    assert not n.ready() and not n.status("x") and not n.watchdog()
    assert not n.stopping() and not n.reloading()
    assert n.watchdog_interval() is None


def test_send_failure_never_raises(tmp_path):
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    n = Notifier.from_env({"NOTIFY_SOCKET": "@" + uuid.uuid4().hex})
    assert n.ready() is False


def test_watchdog_interval():
    pid = os.getpid()
    n = Notifier.from_env({"WATCHDOG_USEC": "120000000"}, pid=pid)
    assert n.watchdog_timeout() == 120.0
    assert n.watchdog_interval() == 60.0
    n = Notifier.from_env({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(pid)}, pid=pid)
    assert n.watchdog_interval() == 1.0
    # Meant for another process (we were forked or exec'd by the main process).
    n = Notifier.from_env({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(pid + 1)}, pid=pid)
    assert n.watchdog_interval() is None
    for bad in ("", "0", "-5", "soon"):
        assert Notifier.from_env({"WATCHDOG_USEC": bad}).watchdog_interval() is None


def test_from_os_environ_and_unset(monkeypatch, path_socket):
    addr, sock = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", addr)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier.from_env(unset=True)
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert n.watchdog_interval() == 2.0
    assert n.watchdog()
    assert recv(sock) == ["WATCHDOG=1"]
