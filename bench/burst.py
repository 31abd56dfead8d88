"""Burst: 10,000 new images moved at once into an idle daemon's folder: drain time, memory,
and the job queue over time."""

from __future__ import annotations

import argparse
import sqlite3
import time
from pathlib import Path

from bench import log
from bench.checks import BenchFailure, check_rows, check_sidecars
from bench.daemon import BenchDaemon, captioned_under, daemon_config, thread_env
from bench.models import tiny_model
from bench.report import Result, mib, table
from bench.workload import drop, write_images


def run(args: argparse.Namespace, work: Path) -> Result:
    model = tiny_model(work)
    base = work / "burst"
    folder = base / "watched"
    folder.mkdir(parents=True)
    n = args.burst
    t0 = time.perf_counter()
    staged = write_images(base / "stage", range(4 * 10**6, 4 * 10**6 + n), args.burst_image_size)
    log(f"burst: {n} images written in {time.perf_counter() - t0:.1f}s")
    cfg = daemon_config(
        base / "daemon.yaml",
        model=model,
        db=base / "index.db",
        folders=[{"path": str(folder), "settle_seconds": args.settle}],
        batch=args.burst_batch,
        max_tokens=args.burst_tokens,
    )
    timeline = []
    with BenchDaemon(cfg, base, env=thread_env(args.torch_threads), sample_every=0.1) as d:
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
            if d.proc is None or d.proc.poll() is not None:
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
