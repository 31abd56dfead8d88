"""The daemon under benchmark: the tests' `Daemon`, its log followed as it grows, its memory
sampled, every wait failing with the log's tail instead of an assertion."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon_harness import Daemon, memory_mib, wait_for, write_config

from bench.checks import BenchFailure


def thread_env(torch_threads: int) -> dict[str, str]:
    """torch/OpenMP threads for the daemons and model processes (`--torch-threads`; 0:
    torch's default)."""
    if torch_threads <= 0:
        return {}
    return {"OMP_NUM_THREADS": str(torch_threads), "MKL_NUM_THREADS": str(torch_threads)}


def daemon_config(
    path: Path,
    *,
    model: Path,
    db: Path,
    folders: list[dict],
    batch: int,
    max_tokens: int,
    device: str = "cpu",
    dtype: str = "auto",
    search: dict | None = None,
) -> Path:
    """The tests' config (JSON log lines at info) with the benchmark's model settings, index
    and folders, and the daemon's default retry backoff (not the tests' quick one)."""
    from watcher.config import Config

    return write_config(
        path.parent,
        model,
        folders,
        name=path.name,
        model={
            "backend": "transformers",
            "path": str(model),
            "batch_size": batch,
            "max_tokens": max_tokens,
            "device": device,
            "dtype": dtype,
        },
        database=str(db),
        retry_backoff=Config().retry_backoff,
        **({} if search is None else {"search": search}),
    )


def _parse_ts(ts: str) -> float:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


class BenchDaemon(Daemon):
    """`watcher run` in a subprocess. Its JSON log is parsed incrementally (the burst
    benchmark polls 10,000 lines), each event with its time as `t` (epoch seconds); the
    memory of the daemon with its model process is sampled every `sample_every` seconds (None:
    not sampled; each sample walks /proc, some 3 ms of CPU and of this process's GIL, which
    the throughput benchmarks' own pipeline threads share)."""

    def __init__(
        self,
        config: Path,
        folder: Path,
        *,
        env: dict[str, str],
        sample_every: float | None = None,
        ready_timeout: float = 300,
    ) -> None:
        super().__init__(config, folder, env=env)
        self.sample_every = sample_every
        self.ready_timeout = ready_timeout
        self.rss: list[tuple[float, int]] = []  # (time, bytes)
        self.t_start = 0.0
        self._events: list[dict] = []
        self._pos = 0
        self._buf = b""
        self._stop_sampling = threading.Event()

    def start(self, wait_ready: bool = True) -> BenchDaemon:
        self._events, self._pos, self._buf = [], 0, b""
        self._stop_sampling = threading.Event()
        self.t_start = time.time()
        super().start(wait_ready=False)
        if self.sample_every is not None:
            threading.Thread(target=self._sample, daemon=True, name="bench-rss").start()
        if wait_ready:
            try:
                self.wait(lambda: self.logged("watching"), self.ready_timeout, "daemon start")
            except BenchFailure:
                self.stop()
                raise
        return self

    def _sample(self) -> None:
        assert self.sample_every is not None
        while not self._stop_sampling.wait(self.sample_every):
            rss = self.memory().get("VmRSS")
            if rss:
                self.rss.append((time.time(), rss))

    def events(self) -> list[dict]:
        """Every JSON log line so far (read on from where the last call stopped)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        self._pos += len(data)
        lines = (self._buf + data).split(b"\n")
        self._buf = lines.pop()
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict):
                if "timestamp" in e:
                    e["t"] = _parse_ts(e["timestamp"])
                self._events.append(e)
        return self._events

    def wait(
        self, predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
    ) -> Any:
        """`predicate()`'s first truthy value; BenchFailure with the log's tail if the daemon
        exits or `timeout` passes first."""
        value = None

        def done_or_dead() -> bool:
            nonlocal value
            value = predicate()
            return bool(value) or self._dead()

        try:
            wait_for(done_or_dead, timeout, what, interval)
        except AssertionError:
            raise BenchFailure(
                f"timed out after {timeout:.0f}s waiting for {what}:\n{self.tail()}"
            ) from None
        if not value:
            assert self.proc is not None
            raise BenchFailure(
                f"daemon exited ({self.proc.returncode}) waiting for {what}:\n{self.tail()}"
            )
        return value

    def tail(self, n: int = 3000) -> str:
        return self.log_text()[-n:]

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak) in bytes, of the daemon with its model process."""
        assert self.proc is not None
        out = {}
        for key in ("VmRSS", "VmHWM"):
            kib = round(memory_mib(self.proc.pid, key) * 1024)
            if kib:
                out[key] = kib * 1024
        return out

    def errors(self) -> list[dict]:
        return [e for e in self.events() if e.get("level") in ("error", "critical")]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self._stop_sampling.set()
        if self.proc is None:
            return 0
        try:
            code = super().stop(sig, timeout)
        except AssertionError as e:  # killed after `timeout`
            raise BenchFailure(str(e)) from None
        self.events()  # its last lines
        return code

    def __exit__(self, *exc: object) -> None:
        self.stop()


def captioned_under(d: BenchDaemon, folder: Path) -> list[dict]:
    """The daemon's `captioned` log lines for images in `folder`."""
    prefix = str(folder) + os.sep
    return [e for e in d.logged("captioned") if str(e.get("path", "")).startswith(prefix)]


def wait_drained(d: BenchDaemon, folder: Path, n: int, timeout: float) -> list[dict]:
    """Wait until `n` images in `folder` are captioned; their `captioned` log lines."""

    def done() -> list[dict] | None:
        got = captioned_under(d, folder)
        failed = d.logged("image failed")
        if failed:
            raise BenchFailure(f"{len(failed)} images failed, e.g. {failed[0]}")
        return got if len({e["path"] for e in got}) >= n else None

    return d.wait(done, timeout, f"{n} sidecars under {folder}", interval=0.1)
