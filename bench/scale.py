"""Scale: the daemon's catch-up scan of an already-indexed library, its watch set-up and its
memory, for many small folders and for one huge one."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from pathlib import Path

from bench import log
from bench.checks import BenchFailure
from bench.daemon import BenchDaemon, daemon_config, thread_env
from bench.models import tiny_model
from bench.report import Result, mib, table
from watcher.paths import encode


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
            jobs.append((encode(p), encode(root), now, now))
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


def scale_run(
    args: argparse.Namespace, work: Path, name: str, folders: int, per_folder: int
) -> dict:
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
    cfg = daemon_config(
        base / "daemon.yaml",
        model=model,
        db=db,
        folders=[{"path": str(root)}],
        batch=args.daemon_batch,
        max_tokens=args.max_tokens,
    )
    with BenchDaemon(cfg, base, env=thread_env(args.torch_threads), sample_every=0.05) as d:
        scan = d.wait(lambda: d.logged("scan done"), 600, "scan done")[0]
        time.sleep(1.0)  # let anything the scan queued show up
        queued = d.logged("queued")
        mem = d.memory()
        ready = d.logged("model ready")
        watching = d.logged("watching")[0]
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


def run(args: argparse.Namespace, work: Path) -> Result:
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
