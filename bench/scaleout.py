"""Scaling out (issue 17): `watcher caption --ray` with 1 and 2 CPU actors against one
process, the Ray driver's index-write rate, and `backend: openai` against the same model
run locally."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

from bench.checks import BenchFailure, check_rows, check_sidecars
from bench.models import tiny_model
from bench.report import Result, table
from bench.workload import write_images

# Images per second of one GPU for a Moondream2-class model on short captions: an
# assumption (no GPU with real weights here), to turn the driver's rate into GPUs.
ASSUMED_PER_GPU = 50.0


def _config(work: Path, model: Path, name: str, args: argparse.Namespace, **model_keys):
    from watcher.config import parse_config

    data = {
        "model": {
            "backend": "transformers",
            "path": str(model),
            "batch_size": args.scaleout_batch,
            "max_tokens": args.scaleout_tokens,
            "isolate": False,
            **model_keys,
        },
        "database": str(work / f"{name}.db"),
        "log": {"level": "warning"},
    }
    return parse_config(data, name)


def _timed_caption(run, folder: Path, images: list[Path], db: Path) -> tuple[float, float]:
    """(wall seconds of the whole call, images/s from the first image done to the last:
    the steady rate, without start-up and model load)."""
    done: list[float] = []
    t0 = time.perf_counter()
    report = run(on_progress=lambda o, i, n: done.append(time.perf_counter()))
    seconds = time.perf_counter() - t0
    if not report.ok or len(report.captioned) != len(images):
        raise BenchFailure(f"{folder}: {len(report.captioned)} captioned, failed {report.failed}")
    check_sidecars(images)
    check_rows(db, images)
    steady = (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 and done[-1] > done[0] else 0
    return seconds, steady


def _copy(src: Path, dest: Path) -> list[Path]:
    shutil.copytree(src, dest)
    return sorted(p for p in dest.iterdir() if p.suffix == ".jpg")


def _commit_rate(work: Path, rows: int, block: int) -> float:
    """Rows per second the driver commits (the actors' results, one transaction per block
    of `block`, through the writer's code), with no model and no Ray in the way."""
    from watcher.cluster import Result as Done
    from watcher.cluster import _committer
    from watcher.config import Config
    from watcher.index import ImageRow, connect
    from watcher.jobs import JobQueue
    from watcher.messages import Captioned, Prepared, SidecarState
    from watcher.tasks import Task

    root = work / "commit"
    root.mkdir()
    cfg = Config(database=work / "commit.db").with_folders([root])
    db = connect(cfg.database)
    jobs = JobQueue(db)
    jobs.enqueue_many([(root / f"img{i:07d}.jpg", root) for i in range(rows)])
    claimed = jobs.claim(rows)
    committer = _committer(cfg, db, lambda o: None)
    from PIL import Image

    pixel = Image.new("RGB", (1, 1))
    results = []
    for job in claimed:
        now = time.time()
        text = f"a photo number {job.id} of a red bicycle against a brick wall"
        row = ImageRow(
            path=str(job.path),
            root=str(root),
            sha256=f"{job.id:064x}",
            size=12345,
            mtime_ns=1,
            width=640,
            height=480,
            caption=text,
            task="short",
            outputs={"short": text},
            model="tiny",
            revision=None,
            sidecar=str(job.path.with_suffix(".txt")),
            sidecar_sha256=f"{job.id:064x}",
            sidecar_state=SidecarState.WRITTEN,
            sidecar_error=None,
            created=now,
            updated=now,
            model_caption=text,
        )
        prepared = Prepared(job, pixel, row.sha256, 12345, 1, 640, 480)
        item = Captioned(prepared, (Task("short"),), (text,), "tiny", None, False, 1.0, block)
        results.append(Done(job, row, item))
    t0 = time.perf_counter()
    for start in range(0, len(results), block):
        committer.commit(results[start : start + block])
    seconds = time.perf_counter() - t0
    n = db.conn.execute("SELECT count(*) FROM images").fetchone()[0]
    db.conn.close()
    if n != rows:
        raise BenchFailure(f"driver committed {n} rows of {rows}")
    return rows / seconds


def run(args: argparse.Namespace, work: Path) -> Result:
    import ray
    from openai_server import ChatServer

    from watcher.captioning import caption_folders
    from watcher.cluster import caption_on_ray

    model = tiny_model(work)
    base = work / "scaleout"
    src = base / "src"
    n = args.scaleout_n
    write_images(src, list(range(9_000_000, 9_000_000 + n)), args.burst_image_size)
    res: dict = {"n": n, "batch": args.scaleout_batch, "max_tokens": args.scaleout_tokens}

    # (a) one process: `watcher caption` (model in this process, as the tests run it).
    images = _copy(src, base / "single")
    cfg = _config(base, model, "single", args)
    res["single_s"], res["single_steady"] = _timed_caption(
        lambda **kw: caption_folders(cfg, [base / "single"], **kw),
        base / "single",
        images,
        cfg.database,
    )

    # (b) Ray, a local cluster of 2 CPUs, 1 then 2 CPU actors (each loads the model).
    ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)
    try:
        for actors in (1, 2):
            name = f"ray{actors}"
            images = _copy(src, base / name)
            cfg = _config(base, model, name, args)
            res[f"{name}_s"], res[f"{name}_steady"] = _timed_caption(
                lambda cfg=cfg, name=name, actors=actors, **kw: caption_on_ray(
                    cfg, [base / name], actors=actors, **kw
                ),
                base / name,
                images,
                cfg.database,
            )
    finally:
        ray.shutdown()

    # (c) the driver's index writes: rows/s, one transaction per model batch.
    res["commit_block"] = args.scaleout_batch
    res["commit_rows_per_s"] = _commit_rate(base, args.scaleout_rows, args.scaleout_batch)
    res["gpus_per_driver"] = int(res["commit_rows_per_s"] // ASSUMED_PER_GPU)

    # (d) backend openai through the pipeline (HTTP to a server running the same tiny
    # model) against the model run locally: the cost of the hop.
    with ChatServer(model, max_tokens=args.scaleout_tokens) as server:
        from PIL import Image

        server.answer(Image.new("RGB", (8, 8)), "warm-up", 1)
        images = _copy(src, base / "openai")
        cfg = _config(
            base,
            model,
            "openai",
            args,
            backend="openai",
            base_url=server.base_url,
            id="tiny-llava",
            concurrency=args.scaleout_batch,
        )
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=None))
        res["openai_s"], res["openai_steady"] = _timed_caption(
            lambda **kw: caption_folders(cfg, [base / "openai"], **kw),
            base / "openai",
            images,
            cfg.database,
        )
        res["openai_requests"] = len(server.seen)

    def rate(key: str) -> float:
        return n / res[key]

    for key in ("single_s", "ray1_s", "ray2_s", "openai_s"):
        res[key.replace("_s", "_images_per_s")] = round(rate(key), 2)
    names = {
        "single": "`watcher caption`, one process",
        "ray1": "`--ray`, 1 CPU actor",
        "ray2": "`--ray`, 2 CPU actors",
        "openai": "`backend: openai` (HTTP, same model served)",
    }
    rows = [
        [
            title,
            f"{res[k + '_s']:.1f}",
            f"{rate(k + '_s'):.2f}",
            f"{res[k + '_steady']:.2f}",
            f"{res[k + '_steady'] / res['single_steady']:.2f}x" if res["single_steady"] else "",
        ]
        for k, title in names.items()
    ]
    lines = [
        f"{n} images ({args.burst_image_size[0]}x{args.burst_image_size[1]} JPEG), the tests' "
        f"tiny llava, batch {args.scaleout_batch}, {args.scaleout_tokens} tokens; each run "
        "on a fresh copy of the folder and database, wall time of the whole call (Ray: a "
        "local cluster of 2 CPUs started before; actor start-up and model load included).",
        "",
        *table(
            ["run", "wall s", "images/s (wall)", "images/s (steady)", "steady vs one process"],
            rows,
        ),
        "",
        "Steady: from the first image done to the last (no start-up, no model load).",
        "",
        f"Driver index writes: {res['commit_rows_per_s']:.0f} rows/s ({args.scaleout_rows} "
        f"rows, one transaction per {args.scaleout_batch}, through the writer's code). At "
        f"an assumed {ASSUMED_PER_GPU:.0f} images/s per GPU (Moondream2-class, short "
        f"captions; not measured here), one driver keeps up with {res['gpus_per_driver']} GPUs.",
        f"`backend: openai`: {res['openai_requests']} requests for {n} images "
        "(one per image and task).",
    ]
    return Result("scaleout", lines, res)
