"""Where the time goes: CPU seconds by process and by thread, GPU utilisation over time."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from daemon_harness import children


def cpu_self() -> float:
    """CPU seconds (user + system) used by this process so far."""
    t = os.times()
    return t.user + t.system


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) used by process `pid` so far (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def cpu_tree(pid: int) -> float:
    """CPU seconds used so far by process `pid` and its living children."""
    return cpu_of(pid) + sum(cpu_of(k) for k in children(pid))


class ThreadCpu:
    """CPU seconds per pipeline stage (thread name without its number) in this process, from
    /proc/self/task, sampled so that threads which end meanwhile are counted too (up to their
    last sample: the pipeline's threads live as long as the run, so little is lost).

    Every 0.1 s: at 0.02 s the sampler itself took 30-50 ms of CPU per second with a dozen
    threads to read, about 10 ms per image of `watcher caption` on the `small` model, on the
    machine it measures and inside the process CPU figure (`own` says what it took)."""

    def __init__(self, every: float = 0.1) -> None:
        self.every = every
        self.own = 0.0  # CPU seconds the sampler's own thread used
        self._seen: dict[int, tuple[str, float, float]] = {}  # native id -> name, first, last
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _ticks(nid: int) -> float | None:
        try:
            fields = Path(f"/proc/self/task/{nid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def _sample(self, initial: bool = False) -> None:
        # Every thread of the process, Python's by their name and native ones (torch's,
        # OpenMP's, the interpreter's helpers) as "native <comm>": CPU the Python threads do
        # not account for shows up under its own name instead of nowhere.
        named = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        try:
            nids = [int(n) for n in os.listdir("/proc/self/task")]
        except OSError:
            return
        for nid in nids:
            pyname = named.get(nid)
            if pyname is not None and pyname.startswith("bench-"):  # the benchmark's own
                continue
            v = self._ticks(nid)
            if v is None:
                continue
            if pyname is not None:
                name = pyname.rstrip("0123456789").rstrip("_-") or pyname
            else:
                name = f"native {self._comm(nid)}"
            if nid in self._seen:
                old = self._seen[nid]
                self._seen[nid] = (old[0], old[1], v)
            else:  # a thread started meanwhile counts from zero
                self._seen[nid] = (name, v if initial else 0.0, v)

    @staticmethod
    def _comm(nid: int) -> str:
        try:
            return Path(f"/proc/self/task/{nid}/comm").read_text().strip().rstrip("0123456789")
        except OSError:
            return "?"

    def _loop(self) -> None:
        t0 = time.thread_time()
        while not self._stop.wait(self.every):
            self._sample()
        self.own = time.thread_time() - t0

    def __enter__(self) -> ThreadCpu:
        self._sample(initial=True)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="bench-cpu")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def by_stage(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, first, last in self._seen.values():
            out[name] = out.get(name, 0.0) + last - first
        return out


class GpuSampler:
    """nvidia-smi utilisation and memory every 100 ms, into a list."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (time, util %, MiB used)
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> GpuSampler:
        if shutil.which("nvidia-smi") is None:
            return self
        self.proc = subprocess.Popen(
            [
                "nvidia-smi",
                "--query-gpu=utilization.gpu,memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                "100",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True, name="bench-gpu").start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                util, used = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.time(), util, used))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def window(self, t0: float, t1: float) -> list[tuple[float, float, float]]:
        return [s for s in self.samples if t0 <= s[0] <= t1]
