"""Export: `watcher export` of 100k and 1M indexed rows per format, peak RSS flat or not."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import log
from bench.checks import BenchFailure
from bench.report import Result, table
from watcher.paths import encode

FOLDERS = 10  # the rows are spread over this many folders: one folder is a tenth of them

# Runs the export in a child and prints its peak RSS (KiB, the kernel's ru_maxrss): a fresh
# wrapper per run, so each figure is that run's own peak.
_MEASURE = (
    "import resource, subprocess, sys, time;"
    "t = time.perf_counter();"
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode;"
    "print(code, time.perf_counter() - t,"
    " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def build_index(db_path: Path, root: Path, rows: int) -> float:
    """An index of `rows` captioned images (no files: export reads only the index), spread
    over FOLDERS folders under `root`. Returns the seconds it took."""
    from watcher.index import connect

    t0 = time.perf_counter()
    db = connect(db_path)
    per = rows // FOLDERS
    now = time.time()
    caption = 'a red bicycle, leaning on a brick wall, "golden hour", {}'
    sql = (
        "INSERT INTO images (path, root, sha256, size, mtime_ns, width, height, caption, task, "
        "outputs, model, revision, sidecar, sidecar_sha256, sidecar_state, created, updated, "
        "model_caption) VALUES (?, ?, ?, 1, 1, 640, 480, ?, 'prompt', ?, 'moondream', "
        "'2025-06-21', ?, NULL, 'written', ?, ?, ?)"
    )
    db.conn.execute("BEGIN")
    for f in range(FOLDERS):
        folder = root / f"f{f:02d}"
        batch = []
        for i in range(per):
            p = folder / "sub" / f"img{i:07d}.jpg"
            text = caption.format(f * per + i)
            batch.append(
                (
                    encode(p),
                    encode(root),
                    f"{f * per + i:064x}",
                    text,
                    json.dumps({"prompt": text}),
                    encode(p.with_suffix(".txt")),
                    now,
                    now,
                    text,
                )
            )
            if len(batch) == 10_000:
                db.conn.executemany(sql, batch)
                batch.clear()
        db.conn.executemany(sql, batch)
    db.conn.execute("COMMIT")
    db.conn.close()
    return time.perf_counter() - t0


def export_once(db: Path, fmt: str, folder: Path | None, out: Path) -> dict:
    """`watcher export` in a child process: its time, peak RSS and what it wrote."""
    argv = [sys.executable, "-m", "watcher", "--db", str(db), "export", "--format", fmt]
    if folder is not None:
        argv += ["--folder", str(folder)]
    out.mkdir(parents=True, exist_ok=True)
    if fmt in ("csv", "jsonl"):
        argv += ["-o", str(out / f"export.{fmt}")]
    else:
        argv += ["--out", str(out)]
    res = subprocess.run(
        [sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, check=True
    )
    code, seconds, rss_kib = res.stdout.split()
    if code != "0":
        raise BenchFailure(f"watcher export --format {fmt} exited {code}")
    return {"seconds": float(seconds), "peak_rss_mib": int(rss_kib) / 1024}


def check(fmt: str, out: Path, rows: int) -> None:
    """The export holds every row (counted by reading it back, not trusted)."""
    if fmt == "csv":
        with (out / "export.csv").open(encoding="utf-8-sig", newline="") as f:
            n = sum(1 for _ in csv.reader(f)) - 1
    elif fmt == "jsonl":
        with (out / "export.jsonl").open(encoding="utf-8") as f:
            n = sum(1 for _ in f)
    elif fmt == "hf":
        with (out / "metadata.jsonl").open(encoding="utf-8") as f:
            n = sum(1 for _ in f)
    else:
        with (out / "metadata.json").open(encoding="utf-8") as f:
            n = len(json.load(f))
    if n != rows:
        raise BenchFailure(f"--format {fmt}: {n} rows exported, expected {rows}")


def run(args: argparse.Namespace, work: Path) -> Result:
    rows = args.export_rows
    formats = args.export_formats
    root = work / "export-library"
    db = work / "export-index.db"
    if db.exists():
        db.unlink()
    log(f"building an index of {rows:,} rows")
    built = build_index(db, root, rows)
    log(f"built in {built:.0f} s")
    runs: dict[str, dict] = {}
    table_rows = []
    for fmt in formats:
        for label, folder, n in (
            (f"{rows // FOLDERS:,} (one folder)", root / "f00", rows // FOLDERS),
            (f"{rows:,} (all)", None, rows),
        ):
            out = work / f"export-{fmt}-{n}"
            # hf writes its metadata.jsonl at the dataset root: the library itself.
            target = (folder or root) if fmt == "hf" else out
            log(f"export {fmt}, {n:,} rows")
            r = export_once(db, fmt, folder, target)
            check(fmt, target, n)
            r["rows"] = n
            runs[f"{fmt}-{n}"] = r
            table_rows.append(
                [
                    fmt,
                    label,
                    f"{r['seconds']:.1f} s",
                    f"{n / r['seconds']:,.0f}",
                    f"{r['peak_rss_mib']:.0f} MiB",
                ]
            )
    ratios = [
        runs[f"{fmt}-{rows}"]["peak_rss_mib"] / runs[f"{fmt}-{rows // FOLDERS}"]["peak_rss_mib"]
        for fmt in formats
    ]
    ok = max(ratios) < 1.2
    lines = [
        f"`watcher export` of an index of {rows:,} rows ({FOLDERS} folders; prompt captions "
        "of about 70 characters with commas and quotes), each run in a fresh process; peak "
        "RSS is the kernel's ru_maxrss of that process (the Python interpreter included). "
        f"Index built in {built:.0f} s. Every export read back and its rows counted.",
        "",
        *table(["format", "rows", "time", "rows/s", "peak RSS"], table_rows),
        "",
        "Peak RSS, all rows / one folder: "
        + ", ".join(f"{f} {x:.2f}" for f, x in zip(formats, ratios, strict=True))
        + f" (goal: flat, < 1.2x for 10x the rows): {'met' if ok else 'NOT met'}.",
    ]
    return Result("export", lines, {"runs": runs, "build_s": built, "goal_met": ok})


def main() -> None:  # python -m bench.export: a quick run without the report machinery
    p = argparse.ArgumentParser()
    p.add_argument("--export-rows", type=int, default=1_000_000)
    p.add_argument("--export-formats", default="csv,jsonl,hf,kohya")
    p.add_argument("--work", type=Path, required=True)
    a = p.parse_args()
    a.export_formats = a.export_formats.split(",")
    a.work.mkdir(parents=True, exist_ok=True)
    print("\n".join(run(a, a.work).lines))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
