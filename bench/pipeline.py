"""Pipeline efficiency: (a) bare loop at batch 1, (b) at the best batch, (c) `watcher caption`,
(d) the daemon, on the same fresh images; c/b, d/b and the batch sizes of c and d."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from daemon_harness import run_cli

from bench import log, quiet_logging
from bench.checks import (
    BenchFailure,
    check_rows,
    check_sidecars,
    check_vectors,
    last_finished,
    wait_vectors,
)
from bench.daemon import BenchDaemon, daemon_config, thread_env, wait_drained
from bench.measure import ThreadCpu, cpu_of, cpu_self, cpu_tree
from bench.models import (
    TimedBackend,
    build_random_llava,
    describe_dims,
    embedding_model_path,
    load_model,
    tiny_model,
)
from bench.report import Result, batch_histogram, daemon_batches, table
from bench.workload import drop, write_images


def bare_loop(
    backend: Any, tasks: Any, paths: Sequence[Path], batch: int, cfg: Any
) -> tuple[float, float]:
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
) -> tuple[float, float, float]:
    """`watcher caption FOLDER` in this process, on the already-loaded model (a model process,
    as `watcher caption` runs it). (start, end as epoch seconds, model seconds)"""
    import watcher.backends as backends

    real = backends.open_backend
    backends.open_backend = lambda cfg, log_cfg=None: backend
    busy0 = backend.busy
    try:
        t0 = time.time()
        code, _, err = run_cli("--config", str(cfg_path), "caption", str(folder))
        t_end = time.time()
    finally:
        backends.open_backend = real
        quiet_logging()
    with open(log_file, "a") as f:
        f.write(err)
    if code != 0:
        raise BenchFailure(f"watcher caption exited {code}; see {log_file}")
    return t0, t_end, backend.busy - busy0


def run(args: argparse.Namespace, work: Path) -> Result:
    from watcher.config import Config, FolderConfig

    n, T = args.n, args.max_tokens
    size = args.image_size
    base = work / "pipeline"
    if args.model == "tiny":
        model = tiny_model(work)
    else:
        log(f"pipeline: building the random-weight '{args.model}' model")
        model = build_random_llava(work / f"{args.model}-llava", args.model)
    cands = sorted(set(args.batches))
    backend = load_model(model, batch_size=max(cands), max_tokens=T, isolated=False)
    tasks = FolderConfig(path=Path("/")).tasks(T)
    cfg = Config()
    # c and d embed every caption for search as a default install does (the writer thread,
    # on the other core), unless --no-embedding; the bare loop b never does.
    embed = not args.no_embedding
    search = {"embedding_model": str(embedding_model_path()) if embed else None}

    # Warm up every batch shape once, then pick the backend's best batch size.
    sweep_imgs = write_images(base / "sweep", range(10**6, 10**6 + 64), size)
    for bs in cands:
        bare_loop(backend, tasks, sweep_imgs[:bs], bs, cfg)
    sweep = {}
    for bs in cands:
        secs, _ = bare_loop(backend, tasks, sweep_imgs, bs, cfg)
        sweep[bs] = len(sweep_imgs) / secs
        log(f"pipeline: bare loop batch {bs}: {sweep[bs]:.1f} images/s")
    best = max(sweep, key=lambda bs: sweep[bs])
    log(f"pipeline: best batch size {best}")
    # (c) runs the model as `watcher caption` does, in a model process of its own
    # (model.isolate), loaded once for every round.
    env = thread_env(args.torch_threads)
    os.environ.update(env)
    rounds = []
    with contextlib.closing(
        load_model(model, batch_size=best, max_tokens=T, isolated=True)
    ) as child:
        timed = TimedBackend(child)
        timed.max_batch = best
        # Warm it as the bare loop's model and the daemon's are warmed (first calls allocate).
        for _ in range(2):
            bare_loop(child, tasks, sweep_imgs[:best], best, cfg)

        daemon_root = base / "daemon"
        round_dirs = [daemon_root / f"round{r}" for r in range(args.rounds)]
        for d in [daemon_root / "warm", *round_dirs]:
            d.mkdir(parents=True, exist_ok=True)
        settle = args.pipeline_settle
        dcfg = daemon_config(
            base / "daemon.yaml",
            model=model,
            db=base / "daemon.db",
            folders=[{"path": str(daemon_root), "settle_seconds": settle}],
            batch=best,
            max_tokens=T,
            search=search,
        )
        with BenchDaemon(dcfg, base, env=env) as daemon:
            # Warm the daemon's model with a few batches (first calls allocate).
            warm = write_images(base / "stage-warm", range(2 * 10**6, 2 * 10**6 + 3 * best), size)
            drop(warm, daemon_root / "warm")
            wait_drained(daemon, daemon_root / "warm", len(warm), 300)
            # And `watcher caption`: its first run in this process pays one-time imports
            # (sqlite-utils, the CLI), start-up cost like the daemon's, not pipeline cost.
            cap_warm = base / "caption-warm"
            write_images(cap_warm, range(4 * 10**6, 4 * 10**6 + 3 * best), size)
            run_caption(
                daemon_config(
                    base / "caption-warm.yaml",
                    model=model,
                    db=base / "caption-warm.db",
                    folders=[],
                    batch=best,
                    max_tokens=T,
                    search=search,
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
                    ccfg = daemon_config(
                        base / f"caption{r}.yaml",
                        model=model,
                        db=db,
                        folders=[],
                        batch=best,
                        max_tokens=T,
                        search=search,
                    )
                    calls = len(timed.sizes)
                    self0, child0 = cpu_self(), cpu_of(child.pid)
                    with ThreadCpu() as stages:
                        t0, t_end, model_s = run_caption(ccfg, cap_dir, timed, base / "caption.log")
                    row["c_cpu_model"] = 1000 * (cpu_of(child.pid) - child0) / n
                    row["c_cpu"] = 1000 * (cpu_self() - self0) / n + row["c_cpu_model"]
                    row["c_stages"] = {k: 1000 * v / n for k, v in stages.by_stage().items()}
                    row["c_sampler_cpu"] = 1000 * stages.own / n  # inside c_cpu
                    check_sidecars(cap_imgs)
                    check_rows(db, cap_imgs)
                    if embed:  # all in before the command exits
                        check_vectors(db, cap_imgs)
                    # To the commit of the last caption, like d; the search vectors it left
                    # for after the captions come before it exits (c_exit, c_vectors_lag_s).
                    secs = last_finished(db, cap_imgs) - t0
                    row["c"] = n / secs
                    row["c_exit"] = n / (t_end - t0)
                    row["c_vectors_lag_s"] = t_end - t0 - secs
                    row["c_model_share"] = model_s / secs
                    row["c_batches"] = timed.sizes[calls:]

                def run_d(r=r, staged=staged, row=row):
                    folder = round_dirs[r]
                    assert daemon.proc is not None
                    cpu0, own0 = cpu_tree(daemon.proc.pid), cpu_of(daemon.proc.pid)
                    t0 = time.time()
                    dropped = drop(staged, folder)
                    got = wait_drained(daemon, folder, n, 600)
                    row["d_cpu"] = 1000 * (cpu_tree(daemon.proc.pid) - cpu0) / n
                    row["d_cpu_model"] = row["d_cpu"] - 1000 * (cpu_of(daemon.proc.pid) - own0) / n
                    t_end = max(e["t"] for e in got)
                    check_sidecars(dropped)
                    check_rows(base / "daemon.db", dropped)
                    if embed:  # those left to the backfill come after the burst
                        done = wait_vectors(base / "daemon.db", dropped, 600)
                        row["d_vectors_lag_s"] = max(0.0, done - t_end)
                    wall = t_end - t0
                    row["d_raw"] = n / wall
                    row["d"] = n / max(1e-9, wall - settle)
                    row["d_model_share"] = sum(e.get("ms", 0) for e in got) / 1000 / (wall - settle)
                    row["d_batches"] = daemon_batches(got)

                # b runs before and after c and d, and the faster b is the reference (noise
                # only ever slows a run down: this makes the ratios conservative). The order of
                # c and d alternates between rounds; (a), slow, runs in the first round only.
                order: list[Callable[[], None]] = (
                    [run_b, run_c, run_d, run_b] if r % 2 == 0 else [run_b, run_d, run_c, run_b]
                )
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
    return report(args, sweep, best, rounds)


MEDIAN_KEYS = (
    "b",
    "c",
    "c_exit",
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
    "c_cpu_model",
    "d_cpu_model",
    "c_sampler_cpu",
)


def report(args: argparse.Namespace, sweep: dict, best: int, rounds: list[dict]) -> Result:
    """The rounds' figures, their medians and the model calls' sizes, as RESULTS.md lines."""
    n, T, size, settle = args.n, args.max_tokens, args.image_size, args.pipeline_settle
    model_name = args.model
    med = {k: statistics.median(r[k] for r in rounds) for k in MEDIAN_KEYS}
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
            f"{r['c_exit']:.1f}",
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
            if model_name == "tiny"
            else f"random-weight '{model_name}' llava ({describe_dims(model_name)})"
        )
        + " on CPU "
        f"({args.torch_threads} torch thread), {T} generated tokens per image, {args.rounds} "
        "rounds, fresh images each round. "
        + (
            "c and d embed every caption for search (all-MiniLM-L6-v2, real weights), as a "
            "default install does; every vector checked; b does not."
            if not args.no_embedding
            else "c and d without search vectors (--no-embedding)."
        ),
        "Bare loop images/s by batch size (first 64 images): "
        + ", ".join(f"{bs}: {v:.1f}" for bs, v in sweep.items())
        + f" -> best batch {best}.",
        "b is the faster of two runs, one before and one after c and d; c is timed from the "
        "command's start to the commit of its last caption ('c to exit': to its exit, which "
        "waits for the search vectors it left for after the captions); d from the drop to the "
        "daemon's last `captioned` log line, minus settle_seconds = "
        f"{settle} ('d raw': with it).",
        "",
        *table(
            [
                "round",
                "a: loop, batch 1",
                f"b: loop, batch {best}",
                "c: watcher caption",
                "c to exit",
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
        f"d {sum(1 for b in d_sizes if b == best)} of {len(d_sizes)}."
        + (
            " The last search vector came after the last caption by (per round) c "
            + ", ".join(f"{r['c_vectors_lag_s']:.2f}" for r in rounds)
            + " s, d "
            + ", ".join(f"{r['d_vectors_lag_s']:.2f}" for r in rounds)
            + " s (a burst's vectors come after its captions, on this CPU model)."
            if all("d_vectors_lag_s" in r for r in rounds)
            else ""
        ),
        f"CPU per image (all threads, ms, median): b {med['b_cpu']:.2f}, c {med['c_cpu']:.2f}, "
        f"d {med['d_cpu']:.2f} (c and d: with their model process; the model process alone: "
        f"c {med['c_cpu_model']:.2f}, d {med['d_cpu_model']:.2f}). `watcher caption` by "
        "thread (without the model process): "
        + ", ".join(
            f"{k} {v:.2f}"
            for k, v in sorted(med_stages.items(), key=lambda kv: -kv[1])
            if v >= 0.005
        )
        + f" (the benchmark's own per-thread sampler: {med['c_sampler_cpu']:.2f}, counted in c).",
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
