#!/usr/bin/env python
"""moondream-watcher benchmarks (issue 7): is the model kept busy, does it scale?

    .venv/bin/python bench/run.py                 # every CPU benchmark at the issue's sizes
    .venv/bin/python bench/run.py pipeline        # one benchmark (pipeline latency scale burst gpu)
    .venv/bin/python bench/run.py --quick         # everything, small sizes (a minute or two)
    .venv/bin/python bench/run.py gpu             # on a CUDA machine: a Moondream2-sized model

Speeds are reported as ratios taken in the same run (the machines are noisy); every benchmark
first checks its own outcome (every sidecar written, every row present, the scan found what
it should) and fails instead of reporting a speed when it does not. The report is printed,
written as JSON under bench/out/, and appended to bench/RESULTS.md (with date, machine, git
commit and the exact command) unless --no-record. See bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import io
import json
import os
import platform
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models, images, daemon_harness
sys.path.insert(0, str(ROOT))
# Never the Hub: every model here is built locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402
from daemon_harness import children  # noqa: E402  (the daemon's model process)

RESULTS_MD = ROOT / "bench" / "RESULTS.md"
THREAD_ENV: dict[str, str] = {}  # torch/OpenMP threads for the daemons (--torch-threads)
OUT_DIR = ROOT / "bench" / "out"
CPU_BENCHMARKS = ("pipeline", "latency", "scale", "burst")
ALL_BENCHMARKS = (*CPU_BENCHMARKS, "gpu")


class BenchFailure(RuntimeError):
    """The benchmark's own outcome check failed: no speed is reported."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- machine, commit ------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(Exception):
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info = {
        "host": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": cpu,
        "cores": cores,
        "ram_gib": mem,
        "python": platform.python_version(),
    }
    with contextlib.suppress(Exception):
        import torch
        import transformers

        info["torch"] = torch.__version__
        info["transformers"] = transformers.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError):
        info["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def git_commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(
            ["git", *a], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    sha = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "watcher")
    return sha + (" + uncommitted changes in watcher/" if dirty else "")


# --- images ---------------------------------------------------------------------------------


def image_bytes(i: int, size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    """A distinct picture for `i` (the tests' generator), with `i` stamped into its pixels so
    that no two images in a run share bytes: the pipeline re-uses captions of identical
    bytes, which would make a benchmark skip model work."""
    from images import distinct_pil

    im = distinct_pil(i, size)
    px = im.load()
    w, h = im.size
    for bit in range(24):
        on = (i >> bit) & 1
        for dx in range(2):  # 2x2 cells survive JPEG well enough to change the bytes
            for dy in range(2):
                x, y = 2 * bit + dx, h - 2 + dy
                if x < w:
                    px[x, y] = (255, 255, 255) if on else (0, 0, 0)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_images(folder: Path, ids: Sequence[int], size: tuple[int, int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths, seen = [], set()
    for i in ids:
        data = image_bytes(i, size)
        if data in seen:
            raise BenchFailure(f"image generator produced duplicate bytes for {i}")
        seen.add(data)
        p = folder / f"img{i:06d}.jpg"
        p.write_bytes(data)
        paths.append(p)
    return paths


def sidecar_of(image: Path) -> Path:
    return image.with_suffix(".txt")


def check_sidecars(images: Sequence[Path]) -> None:
    missing = [p for p in images if not sidecar_of(p).is_file()]
    if missing:
        raise BenchFailure(f"{len(missing)} of {len(images)} sidecars missing, e.g. {missing[0]}")
    empty = [p for p in images if not sidecar_of(p).read_text().strip()]
    if empty:
        raise BenchFailure(f"{len(empty)} empty sidecars, e.g. {sidecar_of(empty[0])}")


def check_rows(db: Path, images: Sequence[Path]) -> None:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    try:
        rows = dict(con.execute("SELECT path, sidecar_state FROM images").fetchall())
        jobs = dict(con.execute("SELECT path, state FROM jobs").fetchall())
    finally:
        con.close()
    missing = [p for p in images if rows.get(str(p)) != "written"]
    if missing:
        raise BenchFailure(
            f"{len(missing)} of {len(images)} index rows missing or not "
            f"'written', e.g. {missing[0]}: {rows.get(str(missing[0]))}"
        )
    undone = [p for p in images if jobs.get(str(p)) != "done"]
    if undone:
        raise BenchFailure(
            f"{len(undone)} jobs not done, e.g. {undone[0]}: {jobs.get(str(undone[0]))}"
        )


# --- the tiny model and the backend ---------------------------------------------------------


def tiny_model(work: Path) -> Path:
    path = work / "tiny-llava"
    if not (path / "config.json").exists():
        from tiny_models import build_tiny_llava

        build_tiny_llava(path)
    return path


class TimedBackend:
    """Wraps a loaded backend: counts the seconds spent in the model, and ignores close() so
    one loaded model serves every measurement (model loading is not pipeline cost)."""

    def __init__(self, backend) -> None:
        self.inner = backend
        self.name = backend.name
        self.revision = backend.revision
        self.max_batch = backend.max_batch
        self.placement = getattr(backend, "placement", None)
        self.busy = 0.0
        self.calls = 0
        self.sizes: list[int] = []  # images per model call

    def describe(self, images, tasks):
        t0 = time.perf_counter()
        try:
            self.inner.max_batch = self.max_batch
            return self.inner.describe(images, tasks)
        finally:
            self.busy += time.perf_counter() - t0
            self.calls += 1
            self.sizes.append(len(images))

    def close(self) -> None:
        pass


# --- the daemon in a subprocess -------------------------------------------------------------


def parse_ts(ts: str) -> float:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def tree_status(pid: int) -> dict[str, int]:
    """proc_status summed over `pid` and its children: the daemon with its model process.
    (Summed peaks: never less than the peak of the sum.)"""
    total: dict[str, int] = {}
    for p in (pid, *children(pid)):
        for k, v in proc_status(p).items():
            total[k] = total.get(k, 0) + v
    return total


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (peak RSS) in bytes, from /proc (Linux); psutil's RSS elsewhere."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        try:
            import psutil

            rss = psutil.Process(pid).memory_info().rss
            out = {"VmRSS": rss}
        except Exception:
            pass
    return out


def write_config(
    path: Path,
    *,
    model: Path,
    db: Path,
    folders: list[dict],
    batch: int,
    max_tokens: int,
    device: str = "cpu",
    dtype: str = "auto",
) -> Path:
    data = {
        "model": {
            "backend": "transformers",
            "path": str(model),
            "batch_size": batch,
            "max_tokens": max_tokens,
            "device": device,
            "dtype": dtype,
        },
        "database": str(db),
        "log": {"level": "info", "format": "json"},
        "folders": folders,
    }
    path.write_text(yaml.safe_dump(data))
    return path


class DaemonProc:
    """`watcher run` in a subprocess: its JSON log followed incrementally, its memory sampled."""

    def __init__(self, config: Path, log_path: Path, sample_every: float = 0.1) -> None:
        self.config = config
        self.log_path = log_path
        self.sample_every = sample_every
        self.events: list[dict] = []
        self._pos = 0
        self._buf = b""
        self.rss: list[tuple[float, int]] = []  # (time, bytes)
        self.proc: subprocess.Popen | None = None
        self._stop_sampling = threading.Event()
        self.entry = ["-m", "watcher"]  # how the daemon is started (experiments wrap it)

    def start(self, ready_timeout: float = 300) -> DaemonProc:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **THREAD_ENV}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.t_start = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, *self.entry, "--config", str(self.config), "run"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        self._sampler = threading.Thread(target=self._sample, daemon=True, name="bench-rss")
        self._sampler.start()
        self.wait(lambda: self.find("watching"), ready_timeout, "daemon start")
        return self

    def _sample(self) -> None:
        while not self._stop_sampling.wait(self.sample_every):
            st = tree_status(self.proc.pid)
            if "VmRSS" in st:
                self.rss.append((time.time(), st["VmRSS"]))

    def poll(self) -> list[dict]:
        with open(self.log_path, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        self._pos += len(data)
        lines = (self._buf + data).split(b"\n")
        self._buf = lines.pop()
        new = []
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict):
                if "timestamp" in e:
                    e["t"] = parse_ts(e["timestamp"])
                new.append(e)
        self.events.extend(new)
        return new

    def find(self, event: str, **fields) -> list[dict]:
        self.poll()
        return [
            e
            for e in self.events
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    def wait(
        self, predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05
    ):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                raise BenchFailure(
                    f"daemon exited ({self.proc.returncode}) waiting for {what}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchFailure(
                    f"timed out after {timeout:.0f}s waiting for {what}:\n{self.tail()}"
                )
            time.sleep(interval)

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def memory(self) -> dict[str, int]:
        """The daemon's memory with its model process's."""
        return tree_status(self.proc.pid)

    def errors(self) -> list[dict]:
        self.poll()
        return [e for e in self.events if e.get("level") in ("error", "critical")]

    def stop(self, timeout: float = 60) -> int:
        self._stop_sampling.set()
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        self.poll()
        return code

    def __enter__(self) -> DaemonProc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def drop(paths: Sequence[Path], into: Path) -> list[Path]:
    """Move prepared files into a watched folder (rename: each lands whole, at once)."""
    out = []
    for p in paths:
        dest = into / p.name
        os.rename(p, dest)
        out.append(dest)
    return out


def captioned_under(d: DaemonProc, folder: Path) -> list[dict]:
    prefix = str(folder) + os.sep
    return [e for e in d.find("captioned") if str(e.get("path", "")).startswith(prefix)]


def wait_drained(d: DaemonProc, folder: Path, n: int, timeout: float) -> list[dict]:
    def done():
        got = captioned_under(d, folder)
        failed = [e for e in d.events if e.get("event") == "image failed"]
        if failed:
            raise BenchFailure(f"{len(failed)} images failed, e.g. {failed[0]}")
        return got if len({e["path"] for e in got}) >= n else None

    return d.wait(done, timeout, f"{n} sidecars under {folder}", interval=0.1)


def quiet_logging() -> None:
    """watcher's own log lines in this process: warnings and up, to stderr."""
    from watcher.config import LogConfig
    from watcher.log import configure_logging

    configure_logging(LogConfig(format="console", level="warning"), stream=sys.stderr)


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
    /proc/self/task, sampled so that threads which end meanwhile are counted too."""

    def __init__(self, every: float = 0.02) -> None:
        self.every = every
        self._seen: dict[int, tuple[str, float, float]] = {}  # native id -> name, first, last
        self._stop = threading.Event()

    @staticmethod
    def _ticks(nid: int) -> float | None:
        try:
            fields = Path(f"/proc/self/task/{nid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def _sample(self, initial: bool = False) -> None:
        for t in threading.enumerate():
            nid = t.native_id
            if nid is None or t.name.startswith("bench-"):  # the benchmark's own threads
                continue
            v = self._ticks(nid)
            if v is None:
                continue
            name = t.name.rstrip("0123456789").rstrip("_-") or t.name
            if nid in self._seen:
                old = self._seen[nid]
                self._seen[nid] = (old[0], old[1], v)
            else:  # a thread started meanwhile counts from zero
                self._seen[nid] = (name, v if initial else 0.0, v)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> ThreadCpu:
        self._sample(initial=True)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="bench-cpu")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_stage(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, first, last in self._seen.values():
            out[name] = out.get(name, 0.0) + last - first
        return out


# --- helpers --------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return out


@dataclasses.dataclass
class Result:
    name: str
    lines: list[str]
    data: dict
    ok: bool = True


# --- 1. pipeline efficiency -----------------------------------------------------------------


def bare_loop(backend, tasks, paths: Sequence[Path], batch: int, cfg) -> tuple[float, float]:
    """Decode then caption, one batch at a time, in this thread. (seconds, model seconds)."""
    from watcher.jobs import Job
    from watcher.pipeline.decode import prepare

    model = 0.0
    outputs = 0
    t0 = time.perf_counter()
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        prepared = [
            prepare(Job(0, p, p.parent, 0, 0), max_pixels=cfg.max_pixels, max_side=cfg.max_side)
            for p in chunk
        ]
        m0 = time.perf_counter()
        backend.max_batch = batch
        out = backend.describe([p.image for p in prepared], tasks)
        model += time.perf_counter() - m0
        outputs += sum(1 for o in out if o and o[0].strip())
    elapsed = time.perf_counter() - t0
    if outputs != len(paths):
        raise BenchFailure(f"bare loop: {outputs} captions for {len(paths)} images")
    return elapsed, model


def run_caption(
    cfg_path: Path, folder: Path, backend: TimedBackend, log_file: Path
) -> tuple[float, float]:
    """`watcher caption FOLDER` in this process, on the already-loaded model (a model process,
    as `watcher caption` runs it)."""
    import watcher.backends as backends
    from watcher.cli import main

    real = backends.open_backend
    backends.open_backend = lambda cfg, log_cfg=None: backend
    busy0 = backend.busy
    try:
        with open(log_file, "a") as err, open(os.devnull, "w") as out:
            t0 = time.perf_counter()
            code = main(["--config", str(cfg_path), "caption", str(folder)], out=out, err=err)
            elapsed = time.perf_counter() - t0
    finally:
        backends.open_backend = real
        quiet_logging()
    if code != 0:
        raise BenchFailure(f"watcher caption exited {code}; see {log_file}")
    return elapsed, backend.busy - busy0


def bench_pipeline(args, work: Path) -> Result:
    from watcher.backends import load_backend, open_backend
    from watcher.config import Config, FolderConfig, ModelConfig

    n, T = args.n, args.max_tokens
    size = args.image_size
    base = work / "pipeline"
    if args.model == "tiny":
        model = tiny_model(work)
    else:
        log(f"pipeline: building the random-weight '{args.model}' model")
        model = build_random_llava(work / f"{args.model}-llava", args.model)
    cands = sorted(set(args.batches))
    backend = load_backend(
        ModelConfig(
            backend="transformers",
            path=str(model),
            revision=None,
            batch_size=max(cands),
            max_tokens=T,
            device="cpu",
        )
    )
    tasks = FolderConfig(path=Path("/")).tasks(T)
    cfg = Config()

    # Warm up every batch shape once, then pick the backend's best batch size.
    sweep_imgs = write_images(base / "sweep", range(10**6, 10**6 + 64), size)
    for bs in cands:
        bare_loop(backend, tasks, sweep_imgs[:bs], bs, cfg)
    sweep = {}
    for bs in cands:
        secs, _ = bare_loop(backend, tasks, sweep_imgs, bs, cfg)
        sweep[bs] = len(sweep_imgs) / secs
        log(f"pipeline: bare loop batch {bs}: {sweep[bs]:.1f} images/s")
    best = max(sweep, key=sweep.get)
    log(f"pipeline: best batch size {best}")
    # (c) runs the model as `watcher caption` does, in a model process of its own
    # (model.isolate), loaded once for every round.
    os.environ.update(THREAD_ENV)
    child = open_backend(
        ModelConfig(
            backend="transformers",
            path=str(model),
            revision=None,
            batch_size=best,
            max_tokens=T,
            device="cpu",
        )
    )
    timed = TimedBackend(child)
    timed.max_batch = best
    # Warm it as the bare loop's model and the daemon's are warmed (first calls allocate).
    for _ in range(2):
        bare_loop(child, tasks, sweep_imgs[:best], best, cfg)

    rounds = []
    daemon_root = base / "daemon"
    round_dirs = [daemon_root / f"round{r}" for r in range(args.rounds)]
    for d in [daemon_root / "warm", *round_dirs]:
        d.mkdir(parents=True, exist_ok=True)
    settle = args.pipeline_settle
    dcfg = write_config(
        base / "daemon.yaml",
        model=model,
        db=base / "daemon.db",
        folders=[{"path": str(daemon_root), "settle_seconds": settle}],
        batch=best,
        max_tokens=T,
    )
    daemon = DaemonProc(dcfg, base / "daemon.log").start()
    try:
        # Warm the daemon's model with a few batches (first calls allocate).
        warm = write_images(base / "stage-warm", range(2 * 10**6, 2 * 10**6 + 3 * best), size)
        drop(warm, daemon_root / "warm")
        wait_drained(daemon, daemon_root / "warm", len(warm), 300)
        # And `watcher caption`: its first run in this process pays one-time imports
        # (sqlite-utils, the CLI), start-up cost like the daemon's, not pipeline cost.
        cap_warm = base / "caption-warm"
        write_images(cap_warm, range(4 * 10**6, 4 * 10**6 + 3 * best), size)
        run_caption(
            write_config(
                base / "caption-warm.yaml",
                model=model,
                db=base / "caption-warm.db",
                folders=[],
                batch=best,
                max_tokens=T,
            ),
            cap_warm,
            timed,
            base / "caption.log",
        )

        for r in range(args.rounds):
            ids = range(r * n, (r + 1) * n)
            src = write_images(base / f"src{r}", ids, size)
            cap_dir = base / f"caption{r}"
            stage = base / f"stage{r}"
            for d in (cap_dir, stage):
                d.mkdir()
                for p in src:
                    shutil.copy2(p, d / p.name)
            cap_imgs = sorted(cap_dir.glob("*.jpg"))
            staged = sorted(stage.glob("*.jpg"))
            row: dict = {"round": r}

            def run_a(src=src, row=row):
                secs, _ = bare_loop(backend, tasks, src, 1, cfg)
                row["a"] = n / secs

            def run_b(src=src, row=row):
                cpu0 = cpu_self()
                secs, model_s = bare_loop(backend, tasks, src, best, cfg)
                row.setdefault("b_runs", []).append(n / secs)
                row.setdefault("b_shares", []).append(model_s / secs)
                row.setdefault("b_cpu", []).append(1000 * (cpu_self() - cpu0) / n)

            def run_c(r=r, cap_dir=cap_dir, cap_imgs=cap_imgs, row=row):
                db = base / f"caption{r}.db"
                ccfg = write_config(
                    base / f"caption{r}.yaml",
                    model=model,
                    db=db,
                    folders=[],
                    batch=best,
                    max_tokens=T,
                )
                calls = len(timed.sizes)
                cpu0 = cpu_self() + cpu_of(child.pid)
                with ThreadCpu() as stages:
                    secs, model_s = run_caption(ccfg, cap_dir, timed, base / "caption.log")
                row["c_cpu"] = 1000 * (cpu_self() + cpu_of(child.pid) - cpu0) / n
                row["c_stages"] = {k: 1000 * v / n for k, v in stages.by_stage().items()}
                check_sidecars(cap_imgs)
                check_rows(db, cap_imgs)
                row["c"] = n / secs
                row["c_model_share"] = model_s / secs
                row["c_batches"] = timed.sizes[calls:]

            def run_d(r=r, staged=staged, row=row):
                folder = round_dirs[r]
                cpu0 = cpu_tree(daemon.proc.pid)
                t0 = time.time()
                dropped = drop(staged, folder)
                got = wait_drained(daemon, folder, n, 600)
                row["d_cpu"] = 1000 * (cpu_tree(daemon.proc.pid) - cpu0) / n
                t_end = max(e["t"] for e in got)
                check_sidecars(dropped)
                check_rows(base / "daemon.db", dropped)
                wall = t_end - t0
                row["d_raw"] = n / wall
                row["d"] = n / max(1e-9, wall - settle)
                row["d_model_share"] = sum(e.get("ms", 0) for e in got) / 1000 / (wall - settle)
                row["d_batches"] = daemon_batches(got)

            # b runs before and after c and d, and the faster b is the reference (noise only
            # ever slows a run down: this makes the ratios conservative). The order of c and
            # d alternates between rounds; (a), slow, runs in the first round only.
            order = [run_b, run_c, run_d, run_b] if r % 2 == 0 else [run_b, run_d, run_c, run_b]
            if r == 0 and not args.skip_a:
                order.insert(0, run_a)
            for fn in order:
                fn()
            row["b"] = max(row["b_runs"])
            row["b_model_share"] = row["b_shares"][row["b_runs"].index(row["b"])]
            row["b_cpu"] = row["b_cpu"][row["b_runs"].index(row["b"])]
            row["c/b"] = row["c"] / row["b"]
            row["d/b"] = row["d"] / row["b"]
            # Model-thread time the pipeline costs per image, beyond the bare batched loop.
            row["c_overhead_ms"] = 1000 * (1 / row["c"] - 1 / row["b"])
            row["d_overhead_ms"] = 1000 * (1 / row["d"] - 1 / row["b"])
            log(
                f"pipeline round {r}: b {row['b']:.1f} (runs {row['b_runs'][0]:.1f}, "
                f"{row['b_runs'][1]:.1f})  c {row['c']:.1f}  d {row['d']:.1f} images/s  "
                f"c/b {row['c/b']:.3f}  d/b {row['d/b']:.3f}"
            )
            rounds.append(row)
        if daemon.errors():
            raise BenchFailure(f"daemon logged errors: {daemon.errors()[:3]}")
    finally:
        daemon.stop()
        child.close()

    med = {
        k: statistics.median(r[k] for r in rounds)
        for k in (
            "b",
            "c",
            "d",
            "d_raw",
            "c/b",
            "d/b",
            "b_model_share",
            "c_model_share",
            "d_model_share",
            "c_overhead_ms",
            "d_overhead_ms",
            "b_cpu",
            "c_cpu",
            "d_cpu",
        )
    }
    stage_names = sorted({k for r in rounds for k in r["c_stages"]})
    med_stages = {
        k: statistics.median(r["c_stages"].get(k, 0.0) for r in rounds) for k in stage_names
    }
    if "a" in rounds[0]:
        med["a"] = rounds[0]["a"]
    c_sizes = [b for r in rounds for b in r["c_batches"]]
    d_sizes = [b for r in rounds for b in r["d_batches"]]
    ok = med["c/b"] >= 0.95 and med["d/b"] >= 0.95

    def fmt(r: dict) -> list:
        return [
            f"{r['a']:.1f}" if "a" in r else "",
            f"{r['b']:.1f}",
            f"{r['c']:.1f}",
            f"{r['d']:.1f}",
            f"{r['d_raw']:.1f}",
            f"{r['c/b']:.3f}",
            f"{r['d/b']:.3f}",
            f"{r['c_overhead_ms']:.2f} / {r['d_overhead_ms']:.2f}",
            f"{r['b_model_share']:.0%} / {r['c_model_share']:.0%} / {r['d_model_share']:.0%}",
        ]

    lines = [
        f"N = {n} images ({size[0]}x{size[1]} JPEG) per round, "
        + (
            "tiny llava"
            if args.model == "tiny"
            else f"random-weight '{args.model}' llava ({_describe_dims(args.model)})"
        )
        + " on CPU "
        f"({args.torch_threads} torch thread), {T} generated tokens per image, {args.rounds} "
        "rounds, fresh images each round.",
        "Bare loop images/s by batch size (first 64 images): "
        + ", ".join(f"{bs}: {v:.1f}" for bs, v in sweep.items())
        + f" -> best batch {best}.",
        "b is the faster of two runs, one before and one after c and d; (d) is timed from "
        "the drop to the daemon's last `captioned` log line, minus settle_seconds = "
        f"{settle} ('d raw': with it).",
        "",
        *table(
            [
                "round",
                "a: loop, batch 1",
                f"b: loop, batch {best}",
                "c: watcher caption",
                "d: daemon",
                "d raw",
                "c/b",
                "d/b",
                "overhead ms/image c / d",
                "model busy b / c / d",
            ],
            [[r["round"], *fmt(r)] for r in rounds] + [["**median**", *fmt(med)]],
        ),
        "",
        "Model calls by images per call, all rounds (size x calls): `watcher caption` "
        f"{batch_histogram(c_sizes)}; daemon {batch_histogram(d_sizes)}. Full batches of "
        f"{best}: c {sum(1 for b in c_sizes if b == best)} of {len(c_sizes)} calls, "
        f"d {sum(1 for b in d_sizes if b == best)} of {len(d_sizes)}.",
        f"CPU per image (all threads, ms, median): b {med['b_cpu']:.2f}, c {med['c_cpu']:.2f}, "
        f"d {med['d_cpu']:.2f} (c and d: with their model process). `watcher caption` by "
        "thread (without the model process): "
        + ", ".join(
            f"{k} {v:.2f}"
            for k, v in sorted(med_stages.items(), key=lambda kv: -kv[1])
            if v >= 0.005
        )
        + ".",
        "Per CPU-second instead of per wall-second (b_cpu / c_cpu, b_cpu / d_cpu per round, "
        "median; the model is busy all the time in b, c and d, so on a machine shared with "
        "other work the wall-clock ratios measure how much CPU each phase was given as much "
        "as the pipeline): c/b "
        f"{statistics.median(r['b_cpu'] / r['c_cpu'] for r in rounds):.3f}, d/b "
        f"{statistics.median(r['b_cpu'] / r['d_cpu'] for r in rounds):.3f}.",
        f"Goal c/b >= 0.95 and d/b >= 0.95: {'met' if ok else 'NOT met'} "
        f"(median c/b {med['c/b']:.3f}, d/b {med['d/b']:.3f}). Every sidecar, index row and "
        "`done` job checked before each rate was taken.",
    ]
    return Result(
        "pipeline",
        lines,
        {
            "n": n,
            "max_tokens": T,
            "image_size": size,
            "sweep": sweep,
            "best_batch": best,
            "rounds": rounds,
            "median": med,
            "goal_met": ok,
        },
    )


def daemon_batches(captioned: list[dict]) -> list[int]:
    """The daemon's model calls, as images per call, from its `captioned` log lines: each
    line names the size of the call that captioned it, so a size s seen k times is k / s
    calls. (Reused copies say 0: no call.)"""
    seen = collections.Counter(e["batch"] for e in captioned if e.get("batch"))
    return sorted((size for size, k in seen.items() for _ in range(k // size)), reverse=True)


def batch_histogram(sizes: Sequence[int]) -> str:
    counts = collections.Counter(sizes)
    return ", ".join(f"{s} x {counts[s]}" for s in sorted(counts, reverse=True)) or "none"


def _describe_dims(size: str) -> str:
    d = MODEL_DIMS[size]
    v, t = d["vision"], d["text"]
    return (
        f"SigLIP {v['num_hidden_layers']} x {v['hidden_size']} at {v['image_size']} px, "
        f"Phi {t['num_hidden_layers']} x {t['hidden_size']}"
    )


# --- 2. latency -----------------------------------------------------------------------------


def bench_latency(args, work: Path) -> Result:
    model = tiny_model(work)
    base = work / "latency"
    folder = base / "watched"
    folder.mkdir(parents=True)
    settle = args.settle
    cfg = write_config(
        base / "daemon.yaml",
        model=model,
        db=base / "index.db",
        folders=[{"path": str(folder), "settle_seconds": settle}],
        batch=args.daemon_batch,
        max_tokens=args.max_tokens,
    )
    formats = (("jpg", "JPEG"), ("png", "PNG"))
    samples = []
    with DaemonProc(cfg, base / "daemon.log") as d:
        warmups = 4
        for i in range(warmups + args.drops):
            ext, fmt = formats[i % len(formats)]
            data = image_bytes(3 * 10**6 + i, args.image_size, fmt)
            path = folder / f"drop{i:04d}.{ext}"
            side = sidecar_of(path)
            # Written and closed once, as a camera, a copy or an export writes a file.
            with open(path, "wb") as f:
                f.write(data)
            t0 = time.time()  # the file is closed
            deadline = time.monotonic() + settle + 60
            while not side.exists():
                if time.monotonic() > deadline:
                    raise BenchFailure(f"no sidecar for {path} after {settle + 60}s:\n{d.tail()}")
                time.sleep(0.001)
            t1 = time.time()
            ev = d.wait(
                lambda path=path: d.find("captioned", path=str(path)), 30, f"log line for {path}"
            )[0]
            if not side.read_text().strip():
                raise BenchFailure(f"empty sidecar {side}")
            if i >= warmups:
                samples.append(
                    {
                        "path": str(path),
                        "format": fmt,
                        "t0": t0,
                        "latency": t1 - t0,
                        "model": ev.get("ms", 0) / 1000,
                    }
                )
            time.sleep(args.idle_gap)  # the daemon is idle when the next file arrives
        check_rows(base / "index.db", sorted(p for p in folder.iterdir() if p.suffix != ".txt"))
    # When each file was queued (the settle stage's end), from the jobs table.
    con = sqlite3.connect(f"file:{base / 'index.db'}?mode=ro", uri=True, timeout=60)
    enqueued = dict(con.execute("SELECT path, enqueued FROM jobs"))
    con.close()
    for s in samples:
        s["queued"] = enqueued[s["path"]] - s["t0"]
    res: dict = {"drops": len(samples), "settle_seconds": settle}
    ms = lambda v: f"{v * 1000:.0f} ms"  # noqa: E731
    rows = []
    ok = True
    for name, group in [(fmt, [s for s in samples if s["format"] == fmt]) for _, fmt in formats]:
        lat = [s["latency"] for s in group]
        mod = [s["model"] for s in group]
        beyond = [s["latency"] - s["model"] for s in group]
        queued = [s["queued"] for s in group]
        after = [s["latency"] - s["queued"] - s["model"] for s in group]
        r = {
            "n": len(group),
            "latency_p50": pct(lat, 50),
            "latency_p95": pct(lat, 95),
            "latency_max": max(lat),
            "model_p50": pct(mod, 50),
            "model_p95": pct(mod, 95),
            "beyond_model_p50": pct(beyond, 50),
            "beyond_model_p95": pct(beyond, 95),
            "beyond_model_max": max(beyond),
            "queued_p50": pct(queued, 50),
            "queued_p95": pct(queued, 95),
            "pipeline_p50": pct(after, 50),
            "pipeline_p95": pct(after, 95),
        }
        # Goals: p50 within 100 ms of the model's own time (no settle wait for a closed,
        # complete file); p95 of what is beyond the model under 250 ms.
        r["goal_met"] = r["beyond_model_p50"] < 0.1 and r["beyond_model_p95"] < 0.25
        ok = ok and r["goal_met"]
        res[name] = r
        rows += [
            [
                f"**{name}**: close -> sidecar",
                ms(r["latency_p50"]),
                ms(r["latency_p95"]),
                ms(r["latency_max"]),
            ],
            ["model's own time", ms(r["model_p50"]), ms(r["model_p95"]), ""],
            [
                "**close -> sidecar, beyond the model**",
                f"**{ms(r['beyond_model_p50'])}**",
                f"**{ms(r['beyond_model_p95'])}**",
                ms(r["beyond_model_max"]),
            ],
            ["... of which: close -> queued", ms(r["queued_p50"]), ms(r["queued_p95"]), ""],
            [
                "... of which: queued -> sidecar, beyond the model",
                ms(r["pipeline_p50"]),
                ms(r["pipeline_p95"]),
                "",
            ],
        ]
    lines = [
        f"{len(samples)} single images ({len(samples) // 2} JPEG, {len(samples) // 2} PNG, "
        f"{args.image_size[0]}x{args.image_size[1]}), each written and closed once into the "
        f"folder of an idle daemon (settle_seconds = {settle}, fast_close on: a closed file "
        "with its end marker is queued at once), each timed from the writer's close() to the "
        "sidecar's appearance (polled every 1 ms).",
        "",
        *table(["", "p50", "p95", "max"], rows),
        "",
        f"Goal, each format: close -> sidecar p50 within 100 ms of the model's own time, p95 "
        f"within 250 ms: {'met' if ok else 'NOT met'}.",
    ]
    res["goal_met"] = ok
    return Result("latency", lines, res)


# --- 3. scale -------------------------------------------------------------------------------


def make_indexed_tree(
    root: Path, db_path: Path, folders: int, per_folder: int, model_name: str, sidecars: bool = True
) -> int:
    """`folders` x `per_folder` tiny .jpg files (plus their sidecars), every one already in
    the index with its size and mtime_ns, and its job done: what a captioned library looks
    like to the catch-up scan (which only stats)."""
    from watcher.index import ImageRow, connect, transaction

    db = connect(db_path)
    cols = [f.name for f in dataclasses.fields(ImageRow)]
    sql = f"INSERT INTO images ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})"
    now = time.time()
    n = 0
    for f in range(folders):
        d = root if folders == 1 else root / f"{f // 100:02d}" / f"f{f:04d}"
        d.mkdir(parents=True, exist_ok=True)
        rows, jobs = [], []
        for i in range(per_folder):
            p = d / f"img{i:06d}.jpg"
            with open(p, "wb") as fh:
                fh.write(b"\xff\xd8\xff")  # the scan only stats; nothing is decoded
            st = os.stat(p)
            side = None
            if sidecars:
                side = p.with_suffix(".txt")
                side.write_text(f"caption {n}\n")
            rows.append(
                ImageRow(
                    path=str(p),
                    root=str(root),
                    sha256=f"{n:064x}",
                    size=st.st_size,
                    mtime_ns=st.st_mtime_ns,
                    width=1,
                    height=1,
                    caption=f"caption {n}",
                    task="short",
                    outputs={"short": f"caption {n}"},
                    model=model_name,
                    revision=None,
                    sidecar=str(side) if side else None,
                    sidecar_sha256=None,
                    sidecar_state="written",
                    sidecar_error=None,
                    created=now,
                    updated=now,
                ).to_row()
            )
            jobs.append((str(p), str(root), now, now))
            n += 1
        with transaction(db):
            db.conn.executemany(sql, rows)
            db.conn.executemany(
                "INSERT INTO jobs (path, root, state, gen, attempts, next_try, enqueued, "
                "updated) VALUES (?, ?, 'done', 0, 1, 0, ?, ?)",
                jobs,
            )
    db.conn.close()
    return n


def scale_run(args, work: Path, name: str, folders: int, per_folder: int) -> dict:
    model = tiny_model(work)
    base = work / "scale" / name
    root = base / "library"
    root.mkdir(parents=True)
    db = base / "index.db"
    t0 = time.perf_counter()
    files = make_indexed_tree(root, db, folders, per_folder, str(model)) if folders else 0
    if files:
        log(f"scale: built {name}: {files} indexed images in {time.perf_counter() - t0:.1f}s")
    # Cold-ish cache is not what we measure: the tree was just written (warm dentries), as
    # on a machine where the daemon restarts; `--drop-caches` is not attempted (needs root).
    cfg = write_config(
        base / "daemon.yaml",
        model=model,
        db=db,
        folders=[{"path": str(root)}],
        batch=args.daemon_batch,
        max_tokens=args.max_tokens,
    )
    with DaemonProc(cfg, base / "daemon.log", sample_every=0.05) as d:
        scan = d.wait(lambda: d.find("scan done"), 600, "scan done")[0]
        time.sleep(1.0)  # let anything the scan queued show up
        queued = d.find("queued")
        mem = d.memory()
        ready = d.find("model ready")
        watching = d.find("watching")[0]
        errors = d.errors()
    if errors:
        raise BenchFailure(f"scale {name}: daemon logged errors: {errors[:3]}")
    expect = {"new": 0, "changed": 0, "removed": 0, "up_to_date": files}
    got = {k: scan.get(k) for k in expect}
    if got != expect or queued:
        raise BenchFailure(
            f"scale {name}: scan found {got}, expected {expect} (queued: {queued[:1]})"
        )
    # The model is loaded before the watches are set up; watches are set up before `watching`.
    t_ready = max(e["t"] for e in ready) if ready else d.t_start
    out = {
        "files": files,
        "folders": folders,
        "scan_seconds": scan["seconds"],
        "files_per_s": files / scan["seconds"] if scan["seconds"] else None,
        "watch_setup_s": watching["t"] - t_ready,
        "start_to_scan_done_s": scan["t"] - d.t_start,
        "peak_rss": mem.get("VmHWM", max((r for _, r in d.rss), default=0)),
        "rss_after": mem.get("VmRSS", 0),
    }
    shutil.rmtree(root, ignore_errors=True)
    return out


def bench_scale(args, work: Path) -> Result:
    files = args.scale_files
    per = 100
    runs = {
        "empty folder (baseline)": scale_run(args, work, "empty", 0, 0),
        f"{files // per} folders x {per}": scale_run(args, work, "nested", files // per, per),
        f"1 folder x {files}": scale_run(args, work, "flat", 1, files),
    }
    base = runs["empty folder (baseline)"]
    nested = runs[f"{files // per} folders x {per}"]
    rows = []
    for label, r in runs.items():
        extra = r["peak_rss"] - base["peak_rss"]
        rows.append(
            [
                label,
                f"{r['files']:,}",
                f"{r['scan_seconds']:.2f} s",
                f"{r['files_per_s']:,.0f}" if r["files_per_s"] else "-",
                f"{r['watch_setup_s']:.2f} s",
                f"{mib(r['peak_rss'])} MiB",
                f"+{mib(extra)} MiB" if r is not base else "-",
                f"{extra / r['files']:.0f} B" if r["files"] else "-",
                f"{mib(r['rss_after'])} MiB",
            ]
        )
    ok = nested["scan_seconds"] < 10
    lines = [
        f"Already-indexed libraries (every image in the index with matching size and mtime, "
        f"its .txt sidecar beside it), scanned by the daemon at start on "
        f"{os.cpu_count()} cores. Scan time from the daemon's `scan done` log line; watch "
        "set-up = `model ready` -> `watching`; peak RSS = the kernel's VmHWM of the daemon "
        "process plus its model process's (model included: compare with the empty-folder "
        "baseline).",
        "",
        *table(
            [
                "library",
                "images",
                "catch-up scan",
                "files/s",
                "watch set-up",
                "peak RSS",
                "over baseline",
                "per image",
                "RSS after scan",
            ],
            rows,
        ),
        "",
        f"Goal scan < 10 s for {files:,} images: {'met' if ok else 'NOT met'} "
        f"({nested['scan_seconds']:.2f} s). Every scan checked: 0 new, 0 changed, 0 removed, "
        f"{files:,} up to date, nothing queued.",
    ]
    return Result("scale", lines, {"runs": runs, "goal_met": ok})


# --- 4. burst -------------------------------------------------------------------------------


def bench_burst(args, work: Path) -> Result:
    model = tiny_model(work)
    base = work / "burst"
    folder = base / "watched"
    folder.mkdir(parents=True)
    n = args.burst
    t0 = time.perf_counter()
    staged = write_images(base / "stage", range(4 * 10**6, 4 * 10**6 + n), args.burst_image_size)
    log(f"burst: {n} images written in {time.perf_counter() - t0:.1f}s")
    cfg = write_config(
        base / "daemon.yaml",
        model=model,
        db=base / "index.db",
        folders=[{"path": str(folder), "settle_seconds": args.settle}],
        batch=args.burst_batch,
        max_tokens=args.burst_tokens,
    )
    timeline = []
    with DaemonProc(cfg, base / "daemon.log", sample_every=0.1) as d:
        time.sleep(1.0)
        rss_idle = d.memory().get("VmRSS", 0)
        con = sqlite3.connect(f"file:{base / 'index.db'}?mode=ro", uri=True, timeout=60)
        t_drop = time.time()
        dropped = drop(staged, folder)
        t_dropped = time.time()
        deadline = time.monotonic() + args.burst_timeout
        while True:
            counts = dict(con.execute("SELECT state, count(*) FROM jobs GROUP BY state"))
            done = len({e["path"] for e in captioned_under(d, folder)})
            timeline.append(
                {
                    "t": round(time.time() - t_drop, 2),
                    **counts,
                    "sidecars": done,
                    "rss": d.rss[-1][1] if d.rss else 0,
                }
            )
            if done >= n:
                break
            if d.proc.poll() is not None:
                raise BenchFailure(f"daemon died during the burst:\n{d.tail()}")
            if time.monotonic() > deadline:
                raise BenchFailure(f"burst not drained after {args.burst_timeout}s: {done}/{n}")
            time.sleep(0.5)
        con.close()
        got = captioned_under(d, folder)
        mem = d.memory()
        errors = d.errors()
    if errors:
        raise BenchFailure(f"burst: daemon logged errors: {errors[:3]}")
    check_sidecars(dropped)
    check_rows(base / "index.db", dropped)
    first = min(e["t"] for e in got) - t_drop
    last = max(e["t"] for e in got) - t_drop
    model_s = sum(e.get("ms", 0) for e in got) / 1000
    max_running = max(s.get("running", 0) for s in timeline)
    max_pending = max(s.get("pending", 0) for s in timeline)
    res = {
        "images": n,
        "drop_seconds": t_dropped - t_drop,
        "first_sidecar_s": first,
        "drain_s": last,
        "images_per_s": n / last,
        "steady_images_per_s": (n - 1) / (last - first) if last > first else None,
        "model_busy": model_s / (last - first) if last > first else None,
        "max_running": max_running,
        "max_pending": max_pending,
        "rss_idle": rss_idle,
        "peak_rss": mem.get("VmHWM", 0),
        "rss_after": mem.get("VmRSS", 0),
        "timeline": timeline,
    }
    # A few points of the queue over time.
    pick = sorted(
        {0, len(timeline) // 4, len(timeline) // 2, 3 * len(timeline) // 4, len(timeline) - 1}
    )
    lines = [
        f"{n:,} new {args.burst_image_size[0]}x{args.burst_image_size[1]} JPEGs moved into the "
        f"watched folder of an idle daemon at once ({res['drop_seconds']:.2f} s to move them; "
        f"settle_seconds = {args.settle}; tiny llava, batch {args.burst_batch}, "
        f"{args.burst_tokens} tokens per image: the fastest model rate, the hardest on the "
        "rest of the pipeline).",
        "",
        *table(
            [
                "drain (drop -> last sidecar)",
                "images/s",
                "first sidecar",
                "model busy",
                "peak RSS",
                "RSS idle before",
                "RSS after",
                "max running jobs",
            ],
            [
                [
                    f"{last:.1f} s",
                    f"{res['images_per_s']:.1f}",
                    f"{first:.2f} s",
                    f"{res['model_busy']:.0%}" if res["model_busy"] else "-",
                    f"{mib(res['peak_rss'])} MiB",
                    f"{mib(rss_idle)} MiB",
                    f"{mib(res['rss_after'])} MiB",
                    max_running,
                ]
            ],
        ),
        "",
        "Queue over time (jobs table; `running` is bounded by the pipeline's in-flight limit):",
        "",
        *table(
            ["t", "pending", "running", "done", "sidecars", "RSS"],
            [
                [
                    f"{timeline[i]['t']:.1f} s",
                    timeline[i].get("pending", 0),
                    timeline[i].get("running", 0),
                    timeline[i].get("done", 0),
                    timeline[i]["sidecars"],
                    f"{mib(timeline[i]['rss'])} MiB",
                ]
                for i in pick
            ],
        ),
        "",
        f"Checked: {n:,} sidecars, {n:,} index rows `written`, {n:,} jobs `done`, no failures.",
    ]
    return Result("burst", lines, res)


# --- 5. GPU ---------------------------------------------------------------------------------

# Random-weight LLaVA-style models (SigLIP vision tower + Phi text model) by size.
MODEL_DIMS = {
    # Moondream2's size: SigLIP 27 x 1152 at 378 px / patch 14 (729 image tokens), Phi 24 x
    # 2048, vocab 51200.
    "moondream": {
        "vision": dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=378,
            patch_size=14,
        ),
        "text": dict(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32
        ),
        "vocab": 51200,
    },
    # Small enough for CPU benchmarks, big enough that its time goes to matrix kernels (which
    # release the GIL) rather than to Python, like a real model's.
    "small": {
        "vision": dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=112,
            patch_size=16,
        ),
        "text": dict(
            hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8
        ),
        "vocab": None,
    },  # the tokenizer's own size
    # A code check of the GPU benchmark on CPU.
    "smoke": {
        "vision": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=56,
            patch_size=14,
        ),
        "text": dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        ),
        "vocab": 51200,
    },
}


def build_random_llava(
    out_dir: Path, size: str, *, device: str = "cpu", dtype: str = "float32"
) -> Path:
    """A random-weight LlavaForConditionalGeneration of MODEL_DIMS[size] with the tiny
    models' word tokenizer and chat template (generation only ever produces content words and
    never stops early, so every image costs exactly max_tokens tokens)."""
    if (out_dir / "config.json").exists():
        return out_dir
    import torch
    from tiny_models import (
        _IMAGE_TOKEN,
        LLAVA_CHAT_TEMPLATE,
        _generation_config,
        _word_tokenizer,
    )
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PhiConfig,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    dims = MODEL_DIMS[size]
    torch.manual_seed(0)
    tok, suppressed = _word_tokenizer()
    vocab = dims["vocab"] or len(tok)
    # Ids past the tokenizer's words exist in the model only: never generate them.
    suppressed = sorted(set(suppressed) | set(range(len(tok), vocab)))
    vis = dims["vision"]
    tcfg = PhiConfig(
        vocab_size=vocab,
        max_position_embeddings=4096,
        partial_rotary_factor=0.5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **dims["text"],
    )
    image_tokens = (vis["image_size"] // vis["patch_size"]) ** 2
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(**vis),
        text_config=tcfg,
        image_token_index=tok.convert_tokens_to_ids(_IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=image_tokens,
    )
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        dtype
    ]
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(torch_dtype).eval()
    model.generation_config = _generation_config(tok, suppressed)
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessor(
            size={"height": vis["image_size"], "width": vis["image_size"]}
        ),
        tokenizer=tok,
        patch_size=vis["patch_size"],
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=_IMAGE_TOKEN,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    del model
    return out_dir


class GpuSampler:
    """nvidia-smi utilisation and memory every 100 ms, into a list."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (time, util %, MiB used)
        self.proc = None

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
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
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


def bench_gpu(args, work: Path) -> Result:
    import torch

    from watcher.backends import load_backend
    from watcher.config import FolderConfig, ModelConfig

    smoke = args.gpu_smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        return Result(
            "gpu",
            [
                "Not run: no CUDA device on this machine. On a GPU machine: "
                "`.venv/bin/python bench/run.py gpu`."
            ],
            {"skipped": True},
            ok=True,
        )
    dtype = "float32" if smoke else "bfloat16"
    base = work / "gpu"
    t0 = time.perf_counter()
    model = build_random_llava(
        base / "model", "smoke" if smoke else "moondream", device=device, dtype=dtype
    )
    if device == "cuda":
        torch.cuda.empty_cache()
    log(
        f"gpu: built the {'small smoke-test' if smoke else 'Moondream2-sized'} model in "
        f"{time.perf_counter() - t0:.0f}s"
    )
    T = args.gpu_tokens
    batches = sorted(set(args.gpu_batches))
    backend = load_backend(
        ModelConfig(
            backend="transformers",
            path=str(model),
            revision=None,
            batch_size=max(batches),
            max_tokens=T,
            device=device,
            dtype=dtype,
        )
    )
    params = sum(p.numel() for p in backend._model.parameters())
    tasks = FolderConfig(path=Path("/")).tasks(T)
    from PIL import Image

    n_img = args.gpu_images
    imgs = [
        Image.open(io.BytesIO(image_bytes(5 * 10**6 + i, (640, 480)))).convert("RGB")
        for i in range(n_img)
    ]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sweep = {}
    for bs in batches:
        backend.max_batch = bs
        backend.describe(imgs[:bs], tasks)  # warm-up at this shape
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        outs = 0
        t0 = time.perf_counter()
        for s in range(0, n_img, bs):
            out = backend.describe(imgs[s : s + bs], tasks)
            outs += sum(1 for o in out if o[0].strip())
        sync()
        secs = time.perf_counter() - t0
        if outs != n_img:
            raise BenchFailure(f"gpu: {outs} captions for {n_img} images at batch {bs}")
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
        sweep[bs] = {"images_per_s": n_img / secs, "peak_mem": peak}
        log(f"gpu: batch {bs}: {n_img / secs:.2f} images/s, peak {mib(peak)} MiB")
    best = max(sweep, key=lambda b: sweep[b]["images_per_s"])
    backend.close()
    del backend
    if device == "cuda":
        torch.cuda.empty_cache()

    # The daemon draining a queue on the same model: how busy is the GPU?
    folder = base / "watched"
    folder.mkdir()
    n = args.gpu_queue
    staged = write_images(base / "stage", range(6 * 10**6, 6 * 10**6 + n), (640, 480))
    cfg = write_config(
        base / "daemon.yaml",
        model=model,
        db=base / "index.db",
        folders=[{"path": str(folder), "settle_seconds": args.pipeline_settle}],
        batch=best,
        max_tokens=T,
        device=device,
        dtype=dtype,
    )
    sampler = GpuSampler().start()
    try:
        with DaemonProc(cfg, base / "daemon.log") as d:
            t_drop = time.time()
            dropped = drop(staged, folder)
            got = wait_drained(d, folder, n, 3600)
            errors = d.errors()
        t_first = min(e["t"] for e in got)
        t_last = max(e["t"] for e in got)
    finally:
        sampler.stop()
    if errors:
        raise BenchFailure(f"gpu daemon logged errors: {errors[:3]}")
    check_sidecars(dropped)
    check_rows(base / "index.db", dropped)
    # Utilisation from the first batch's start (first sidecar minus one batch's model time)
    # to the last sidecar.
    first_ms = min(got, key=lambda e: e["t"]).get("ms", 0) * best / 1000
    win = sampler.window(t_first - first_ms, t_last)
    util = statistics.mean(s[1] for s in win) if win else None
    mem = max((s[2] for s in win), default=None)
    drain_rate = n / (t_last - t_drop)
    seq = sweep[min(batches)]["images_per_s"]
    speedup = sweep[best]["images_per_s"] / seq
    ok = (util is not None and util >= 90) and speedup >= 3
    lines = [
        f"Random-weight model of Moondream2's size ({params / 1e9:.2f} B parameters: SigLIP "
        f"27 x 1152 at 378 px / patch 14, Phi 24 x 2048, vocab 51200), {dtype}, {T} generated "
        f"tokens per image, {n_img} images per batch size."
        if not smoke
        else f"SMOKE TEST on CPU with a shrunken model ({params / 1e6:.1f} M parameters): checks "
        "the code path only; the figures mean nothing.",
        "",
        *table(
            ["batch", "images/s", "vs batch 1", "peak GPU memory"],
            [
                [
                    bs,
                    f"{v['images_per_s']:.2f}",
                    f"{v['images_per_s'] / seq:.2f}x",
                    f"{mib(v['peak_mem'])} MiB",
                ]
                for bs, v in sweep.items()
            ],
        ),
        "",
        f"Daemon draining {n} images at batch {best}: {drain_rate:.2f} images/s from the drop, "
        f"GPU utilisation {util:.0f}% (mean of nvidia-smi samples from the first batch to the "
        f"last sidecar), {mem:.0f} MiB GPU memory in use."
        if util is not None
        else f"Daemon draining {n} images at batch {best}: {drain_rate:.2f} images/s "
        "(no nvidia-smi: utilisation not sampled).",
        "",
        f"Goals >= 90% busy and batched >= 3x sequential ({speedup:.1f}x): "
        f"{'met' if ok else 'NOT met'}.",
    ]
    return Result(
        "gpu",
        lines,
        {
            "smoke": smoke,
            "params": params,
            "sweep": sweep,
            "best_batch": best,
            "queue": n,
            "drain_images_per_s": drain_rate,
            "gpu_util_mean": util,
            "gpu_mem_mib": mem,
            "speedup": speedup,
            "goal_met": ok,
        },
    )


# --- driver ---------------------------------------------------------------------------------


def size_arg(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "benchmarks",
        nargs="*",
        metavar="BENCHMARK",
        help=f"any of {', '.join(ALL_BENCHMARKS)}, or all (default: the CPU ones; "
        "gpu too when CUDA is there)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: n 64, 1 round, 10 drops, 10k files, 1k burst",
    )
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--note", default="", help="a line to record with the results")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch CPU threads for the tiny model, here and in the daemons "
        "(default 1: its ops are too small to split, and a second OpenMP "
        "thread makes timings erratic on a busy 2-core machine; 0: torch's "
        "default)",
    )
    g = p.add_argument_group("pipeline")
    g.add_argument("--n", type=int, default=200, help="images per round (default 200)")
    g.add_argument(
        "--model",
        choices=("tiny", "small"),
        default="tiny",
        help="tiny: the tests' tiny llava (default; its time is Python overhead, "
        "which holds the GIL); small: a random-weight model whose time goes "
        "to matrix kernels, as a real model's does",
    )
    g.add_argument("--rounds", type=int, default=3)
    g.add_argument(
        "--skip-a",
        action="store_true",
        help="skip (a), the bare loop at batch 1 (slow on --model small)",
    )
    g.add_argument(
        "--batches",
        type=ints,
        default=[1, 4, 8, 16, 32],
        help="batch sizes tried for the best one (default 1,4,8,16,32)",
    )
    g.add_argument(
        "--max-tokens",
        type=int,
        default=120,
        help="tokens generated per image (default 120, the config's max_tokens; "
        "the tiny model always generates exactly this many)",
    )
    g.add_argument("--image-size", type=size_arg, default=(320, 240))
    g.add_argument(
        "--pipeline-settle",
        type=float,
        default=0.25,
        help="settle_seconds for the throughput daemons (default 0.25)",
    )
    g = p.add_argument_group("latency, burst")
    g.add_argument("--drops", type=int, default=50)
    g.add_argument(
        "--settle", type=float, default=1.0, help="settle_seconds (default 1.0, the config default)"
    )
    g.add_argument("--idle-gap", type=float, default=0.3)
    g.add_argument("--daemon-batch", type=int, default=8)
    g.add_argument("--burst", type=int, default=10_000)
    g.add_argument("--burst-image-size", type=size_arg, default=(96, 72))
    g.add_argument("--burst-batch", type=int, default=32)
    g.add_argument("--burst-tokens", type=int, default=20)
    g.add_argument("--burst-timeout", type=float, default=1800)
    g = p.add_argument_group("scale")
    g.add_argument("--scale-files", type=int, default=100_000)
    g = p.add_argument_group("gpu")
    g.add_argument("--gpu-batches", type=ints, default=[1, 4, 8, 16])
    g.add_argument("--gpu-tokens", type=int, default=32)
    g.add_argument("--gpu-images", type=int, default=64)
    g.add_argument("--gpu-queue", type=int, default=500)
    g.add_argument(
        "--gpu-smoke",
        action="store_true",
        help="run the gpu benchmark on CPU with a shrunken model (a code check)",
    )
    args = p.parse_args(argv)
    unknown = [b for b in args.benchmarks if b not in (*ALL_BENCHMARKS, "all")]
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(ALL_BENCHMARKS)}, all")
    if args.quick:
        defaults = {
            "n": 64,
            "rounds": 1,
            "drops": 10,
            "scale_files": 10_000,
            "burst": 1000,
            "gpu_images": 16,
            "gpu_queue": 32,
        }
        for k, v in defaults.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    if not args.benchmarks:
        args.benchmarks = list(CPU_BENCHMARKS)
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                args.benchmarks.append("gpu")
    elif "all" in args.benchmarks:
        args.benchmarks = list(ALL_BENCHMARKS)
    return args


def record(
    results: list[Result], info: dict, commit: str, command: str, started: float, note: str
) -> str:
    when = dt.datetime.fromtimestamp(started, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    gpu = f", {info['gpu']}" if info.get("gpu") else ""
    lines = [
        f"## {when} — commit {commit}",
        "",
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM{gpu}; "
        f"{info['os']}; Python {info['python']}, torch {info.get('torch')}, transformers "
        f"{info.get('transformers')}; load average at start {info.get('load_avg_at_start')}",
        f"- Command: `{command}`",
        f"- Took {time.time() - started:.0f} s",
    ]
    if note:
        lines.append(f"- Note: {note}")
    for r in results:
        lines += ["", f"### {r.name}" + ("" if r.ok else " — FAILED"), "", *r.lines]
    return "\n".join(lines) + "\n"


def _load() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    command = " ".join(
        shlex.quote(a)
        for a in [
            ".venv/bin/python"
            if Path(sys.executable).parent.parent == ROOT / ".venv"
            else sys.executable,
            "bench/run.py",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    quiet_logging()
    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)
        THREAD_ENV.update(
            {"OMP_NUM_THREADS": str(args.torch_threads), "MKL_NUM_THREADS": str(args.torch_threads)}
        )
    info = machine()
    commit = git_commit()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="watcher-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"scratch folder {work}")
    fns = {
        "pipeline": bench_pipeline,
        "latency": bench_latency,
        "scale": bench_scale,
        "burst": bench_burst,
        "gpu": bench_gpu,
    }
    results: list[Result] = []
    try:
        for name in args.benchmarks:
            log(f"--- {name}")
            load0 = _load()
            t0 = time.perf_counter()
            try:
                res = fns[name](args, work)
            except BenchFailure as e:
                res = Result(
                    name, [f"FAILED (no speed reported): {e}"], {"error": str(e)}, ok=False
                )
            res.data["seconds"] = round(time.perf_counter() - t0, 1)
            load1 = _load()
            res.data["load_avg"] = [load0, load1]
            res.lines.append(
                f"Machine load (1-minute average, other users included): {load0:.2f} "
                f"at the start, {load1:.2f} at the end, on {os.cpu_count()} cores."
            )
            results.append(res)
            print(f"\n### {res.name}\n\n" + "\n".join(res.lines) + "\n", flush=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = record(results, info, commit, command, started, args.note)
    OUT_DIR.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    (OUT_DIR / f"results-{stamp}.json").write_text(
        json.dumps(
            {
                "machine": info,
                "commit": commit,
                "command": command,
                "results": {r.name: {"ok": r.ok, **r.data} for r in results},
            },
            indent=1,
            default=str,
        )
    )
    if not args.no_record:
        if not RESULTS_MD.exists():
            RESULTS_MD.write_text(
                "# Benchmark results\n\nAppended by `bench/run.py` "
                "(see bench/README.md); newest last.\n"
            )
        with open(RESULTS_MD, "a") as f:
            f.write("\n" + text)
        log(f"appended to {RESULTS_MD.relative_to(ROOT)}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
