"""The benchmarks cannot rot silently: the smallest pipeline run end to end, and its report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a package at the repository root, not installed

from bench.report import batch_histogram, daemon_batches  # noqa: E402


def bench(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "bench/run.py", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def calls(histogram: str) -> list[tuple[int, int]]:
    """ "32 x 18, 8 x 3" -> [(32, 18), (8, 3)]."""
    return [(int(s), int(k)) for s, k in re.findall(r"(\d+) x (\d+)", histogram)]


def test_daemon_batches_counts_calls_from_captioned_lines():
    # A call of 4 images logs 4 `captioned` lines naming batch 4; reused copies say 0.
    lines = [{"batch": 4}] * 8 + [{"batch": 3}] * 3 + [{"batch": 0}] * 2 + [{}]
    assert daemon_batches(lines) == [4, 4, 3]
    assert batch_histogram([4, 4, 3]) == "4 x 2, 3 x 1"
    assert batch_histogram([]) == "none"


@pytest.mark.parametrize("entry", [["bench/run.py"], ["-m", "bench"]])
def test_both_entry_points_take_the_documented_command_line(entry):
    r = subprocess.run(
        [sys.executable, *entry, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    for option in ("--quick", "--no-record", "--model {tiny,small}", "--gpu-smoke"):
        assert option in r.stdout
    r = subprocess.run(
        [sys.executable, *entry, "pipline"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert "unknown benchmark 'pipline'; choose from pipeline, latency, scale, burst" in r.stderr


@pytest.mark.slow  # two model processes start (about 40 s on 2 quiet cores)
def test_smallest_pipeline_run_reports_ratios_and_batch_sizes(tmp_path):
    results_md = ROOT / "bench" / "RESULTS.md"
    before = results_md.read_bytes()
    n = 8
    r = bench(
        "pipeline",
        "--n",
        str(n),
        "--rounds",
        "1",
        "--batches",
        "4",
        "--max-tokens",
        "4",
        "--skip-a",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out"),
        "--results",
        str(tmp_path / "RESULTS.md"),
        timeout=500,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert results_md.read_bytes() == before  # a test run is never recorded as a result

    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("# Benchmark results\n")
    assert "### pipeline\n" in text and "FAILED" not in text
    assert "- Command: `" in text and "bench/run.py pipeline --n 8" in text
    header = next(line for line in text.splitlines() if line.startswith("| round |"))
    assert "| b: loop, batch 4 | c: watcher caption | c to exit | d: daemon |" in header
    assert "| c/b | d/b |" in header
    median = next(line for line in text.splitlines() if line.startswith("| **median** |"))
    assert len(re.findall(r"\| \d+\.\d{3} ", median)) == 2  # c/b and d/b
    m = re.search(r"`watcher caption` ([\dx, ]+); daemon ([\dx, ]+)\. Full batches of 4", text)
    assert m, text
    # Every image is in exactly one model call, in c and in d.
    for histogram in m.groups():
        assert sum(size * k for size, k in calls(histogram)) == n, histogram
    assert re.search(r"Goal c/b >= 0\.95 and d/b >= 0\.95: (met|NOT met)", text)
    # c and d embed every caption for search, as a default install does (the bench checks
    # every vector before it reports a rate).
    assert "c and d embed every caption for search" in text
    assert re.search(r"The last search vector came after the last caption by \(per round\) c", text)

    (report,) = (tmp_path / "out").glob("results-*.json")
    pipeline = json.loads(report.read_text())["results"]["pipeline"]
    assert pipeline["ok"] is True and pipeline["best_batch"] == 4
    assert pipeline["median"]["c/b"] > 0 and pipeline["median"]["d/b"] > 0
    (rnd,) = pipeline["rounds"]
    assert sum(rnd["c_batches"]) == n and sum(rnd["d_batches"]) == n
    assert max(rnd["c_batches"] + rnd["d_batches"]) <= 4
    # c is timed to its last caption; its exit, after the vectors, is reported beside it.
    assert 0 < rnd["c_exit"] <= rnd["c"] and rnd["c_vectors_lag_s"] >= 0
