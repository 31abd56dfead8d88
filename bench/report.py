"""What a benchmark reports and where it goes: figures, tables, batch sizes, RESULTS.md."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import ROOT

RESULTS_MD = ROOT / "bench" / "RESULTS.md"
OUT_DIR = ROOT / "bench" / "out"


@dataclasses.dataclass(frozen=True)
class Result:
    """One benchmark's report: its lines for RESULTS.md, its figures for the JSON."""

    name: str
    lines: list[str]
    data: dict[str, Any]
    ok: bool = True


# --- figures --------------------------------------------------------------------------------


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
    """A Markdown table, as lines."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return out


def daemon_batches(captioned: list[dict]) -> list[int]:
    """The daemon's model calls, as images per call, from its `captioned` log lines: each
    line names the size of the call that captioned it, so a size s seen k times is k / s
    calls. (Reused copies say 0: no call.)"""
    seen = collections.Counter(e["batch"] for e in captioned if e.get("batch"))
    return sorted((size for size, k in seen.items() for _ in range(k // size)), reverse=True)


def batch_histogram(sizes: Sequence[int]) -> str:
    """Model calls by their number of images, largest first: "32 x 18, 8 x 3"."""
    counts = collections.Counter(sizes)
    return ", ".join(f"{s} x {counts[s]}" for s in sorted(counts, reverse=True)) or "none"


# --- the machine, the commit, the load ------------------------------------------------------


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
    cores: int | None
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


def load_avg() -> float:
    """The machine's 1-minute load average (other users included)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


# --- where the report goes ------------------------------------------------------------------


def render(
    results: list[Result], info: dict, commit: str, command: str, started: float, note: str
) -> str:
    """One RESULTS.md entry: date, commit, machine, command, then each benchmark's lines."""
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


def write_json(
    out_dir: Path, results: list[Result], info: dict, commit: str, command: str, started: float
) -> Path:
    """Every figure, as `out_dir/results-<UTC time>.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    path = out_dir / f"results-{stamp}.json"
    path.write_text(
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
    return path


def append_results(results_md: Path, text: str) -> None:
    """Append one entry to RESULTS.md (newest last), starting the file if there is none."""
    if not results_md.exists():
        results_md.write_text(
            "# Benchmark results\n\nAppended by `bench/run.py` "
            "(see bench/README.md); newest last.\n"
        )
    with open(results_md, "a") as f:
        f.write("\n" + text)
