"""The daemon as a service: notify protocol, SIGHUP reload, watch limits, retry, status."""

from __future__ import annotations

import ctypes
import errno
import json
import signal
import socket
import subprocess
import sys
import time

import yaml
from daemon_harness import Daemon, wait_for, write_config
from images import distinct_image, write_text_as_png


def _notify_socket(tmp_path) -> tuple[str, socket.socket]:
    """A real AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(60)
    return str(path), sock


def test_notify_ready_status_watchdog_stopping_in_order(tmp_path, tiny_llava):
    watched = tmp_path / "watched"
    watched.mkdir()
    sock_path, sock = _notify_socket(tmp_path)
    cfg = write_config(tmp_path, tiny_llava, [{"path": str(watched)}])
    d = Daemon(cfg, tmp_path, env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1500000"})
    d.start(wait_ready=False)
    seen: list[str] = []

    def receive_until(prefix: str) -> None:
        while True:
            for line in sock.recv(4096).decode().splitlines():
                seen.append(line)
                if line.startswith(prefix):
                    return

    try:
        receive_until("READY=1")
        receive_until("STATUS=")
        receive_until("WATCHDOG=1")
        assert d.stop() == 0
        receive_until("STOPPING=1")
    finally:
        sock.close()
    first = {
        k: next(i for i, line in enumerate(seen) if line.startswith(k))
        for k in ("READY=1", "STATUS=", "WATCHDOG=1", "STOPPING=1")
    }
    assert first["READY=1"] < first["WATCHDOG=1"] < first["STOPPING=1"]
    assert first["READY=1"] <= first["STATUS="] < first["STOPPING=1"]
    status = next(line for line in seen if line.startswith("STATUS=") and "queued" in line)
    assert "done" in status and "failed" in status


def test_sighup_adds_a_folder_and_refuses_a_broken_config(tmp_path, tiny_llava):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cfg = write_config(tmp_path, tiny_llava, [{"path": str(a), "settle_seconds": 0.2}])
    distinct_image(1, b / "before.jpg")  # present before b is watched: the catch-up scan
    with Daemon(cfg, tmp_path) as d:
        data = yaml.safe_load(cfg.read_text())
        data["folders"].append({"path": str(b), "settle_seconds": 0.2, "task": "long"})
        cfg.write_text(yaml.safe_dump(data))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: d.logged("config reloaded"), 30, "reload")
        distinct_image(2, b / "after.jpg")
        wait_for(
            lambda: d.captioned(b / "after.jpg") and d.captioned(b / "before.jpg"),
            60,
            "sidecars in the added folder",
        )
        assert d.rows()[str(b / "after.jpg")]["task"] == "long"

        cfg.write_text("folders:\n  - path: /x\n    task: detailed\n")
        d.proc.send_signal(signal.SIGHUP)
        [refused] = wait_for(
            lambda: d.logged("config reload refused; keeping the running config"), 30, "refusal"
        )
        assert "folders[0].task: expected one of" in refused["reason"]
        assert d.proc.poll() is None
        distinct_image(3, a / "still.jpg")
        distinct_image(4, b / "still.jpg")
        wait_for(
            lambda: d.captioned(a / "still.jpg") and d.captioned(b / "still.jpg"),
            60,
            "old config still running",
        )

        # `watcher reload` sends the same signal to the daemon found in the database.
        data["folders"] = data["folders"][:1]
        cfg.write_text(yaml.safe_dump(data))
        r = subprocess.run(
            [sys.executable, "-m", "watcher", "--config", str(cfg), "reload"],
            capture_output=True,
            text=True,
            timeout=60,
            env=d.env,
        )
        assert r.returncode == 0 and f"pid {d.proc.pid}" in r.stdout
        wait_for(lambda: len(d.logged("config reloaded")) == 2, 30, "second reload")
        wait_for(lambda: d.logged("stopped watching", folder=str(b)), 30, "b unwatched")
    assert d.proc.returncode == 0


def test_watch_limit_fails_that_folder_only(tmp_path, monkeypatch):
    import watchdog.observers.inotify_c as inotify_c

    from watcher.config import Config
    from watcher.intake.observer import Sink
    from watcher.service.watches import Watch

    full, fine = tmp_path / "full", tmp_path / "fine"
    full.mkdir()
    fine.mkdir()
    real = inotify_c.inotify_add_watch

    def at_limit(fd, path, mask):  # the kernel's answer when max_user_watches is reached
        if path.startswith(bytes(full)):
            ctypes.set_errno(errno.ENOSPC)
            return -1
        return real(fd, path, mask)

    monkeypatch.setattr(inotify_c, "inotify_add_watch", at_limit)
    cfg = Config().with_folders([full, fine])
    refused, ok = Watch(cfg.folders[0], Sink()), Watch(cfg.folders[1], Sink())
    assert (refused.start(), ok.start()) == (False, True)
    try:
        assert refused.state == "error" and ok.state == "watching"
        assert refused.observer is None
        assert "fs.inotify.max_user_watches" in refused.error
        assert "sysctl" in refused.error and "polling: true" in refused.error
        assert ok.error is None and ok.observer.is_alive()
    finally:
        ok.stop()


def test_failed_files_show_in_status_and_retry_requeues(tmp_path, tiny_llava):
    watched = tmp_path / "watched"
    watched.mkdir()
    cfg = write_config(tmp_path, tiny_llava, [{"path": str(watched), "settle_seconds": 0.2}])
    with Daemon(cfg, tmp_path) as d:
        write_text_as_png(watched / "notes.png")
        distinct_image(1, watched / "good.jpg")
        wait_for(
            lambda: (
                d.job_state(watched / "notes.png")
                and d.job_state(watched / "notes.png")[0] == "failed"
            ),
            60,
            "failure",
        )
        wait_for(lambda: d.captioned(watched / "good.jpg"), 60, "good sidecar")
        assert d.proc.poll() is None, "a bad file stopped the daemon"
        run = [sys.executable, "-m", "watcher", "--config", str(cfg)]
        st = subprocess.run(
            run + ["status", "--json"], capture_output=True, text=True, timeout=60, env=d.env
        )
        report = json.loads(st.stdout)
        assert report["queue"]["failed"] == 1
        [failure] = report["failures"]
        assert failure["path"] == str(watched / "notes.png")
        assert failure["reason"].startswith("not an image")
        text = subprocess.run(
            run + ["status"], capture_output=True, text=True, timeout=60, env=d.env
        ).stdout
        assert "daemon: running" in text and f"{watched / 'notes.png'}: not an image" in text
        # Fix the file, then retry: it is captioned.
        distinct_image(2, tmp_path / "fixed.png")
        (tmp_path / "fixed.png").rename(watched / "notes.png")
        wait_for(lambda: d.captioned(watched / "notes.png"), 60, "captioned after fix")
        write_text_as_png(watched / "bad2.png")
        wait_for(
            lambda: (d.job_state(watched / "bad2.png") or ("",))[0] == "failed", 60, "bad2 failed"
        )
        r = subprocess.run(
            run + ["retry", str(watched / "bad2.png")],
            capture_output=True,
            text=True,
            timeout=60,
            env=d.env,
        )
        assert r.returncode == 0 and "1 failed image queued again" in r.stdout
        wait_for(
            lambda: (
                (d.job_state(watched / "bad2.png") or ("",))[0] == "failed"
                and len(d.logged("image failed", path=str(watched / "bad2.png"))) == 2
            ),
            60,
            "retried and failed again, with its reason",
        )


def test_hung_model_worker_stops_the_watchdog_pings_and_idle_does_not(tmp_path, tiny_llava):
    """WATCHDOG=1 comes only while the model worker makes progress: a model call that hangs
    (held at the test-only gate) stops the pings so systemd restarts the service; an idle
    worker keeps them coming."""
    watched = tmp_path / "watched"
    watched.mkdir()
    sock_path, sock = _notify_socket(tmp_path)
    gate = tmp_path / "gate"
    cfg = write_config(tmp_path, tiny_llava, [{"path": str(watched), "settle_seconds": 0.2}])
    env = {
        "NOTIFY_SOCKET": sock_path,
        "WATCHDOG_USEC": "1000000",
        "WATCHER_FAULTS": json.dumps({"model": {"gate": str(gate), "times": 1}}),
    }

    def next_datagram() -> list[str]:
        return sock.recv(4096).decode().splitlines()

    try:
        with Daemon(cfg, tmp_path, env=env) as d:
            # Idle: pings arrive.
            wait_for(lambda: "WATCHDOG=1" in next_datagram(), 30, "pings while idle")
            distinct_image(1, watched / "a.jpg")
            wait_for(lambda: gate.with_name("gate.reached").exists(), 60, "model call held")
            stuck = "model worker is not responding; not confirming the watchdog"
            wait_for(lambda: d.logged(stuck), 30, "the hang to be noticed")
            # From now until the gate opens, no ping: drain what is queued, then listen.
            sock.settimeout(0.01)
            while True:
                try:
                    sock.recv(4096)
                except TimeoutError:
                    break
            received: list[str] = []
            listen_until = time.monotonic() + 2.5  # the loop ticks every 1/6 s: many ticks
            while (left := listen_until - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    received += next_datagram()
                except TimeoutError:
                    break
            assert "WATCHDOG=1" not in received and any(
                r.startswith("STATUS=") for r in received
            ), received
            gate.touch()
            wait_for(lambda: d.captioned(watched / "a.jpg"), 60, "caption after release")
            sock.settimeout(30)
            wait_for(lambda: "WATCHDOG=1" in next_datagram(), 30, "pings again")
            assert len(d.logged(stuck)) == 1 and d.logged("model worker responding again")
    finally:
        sock.close()
