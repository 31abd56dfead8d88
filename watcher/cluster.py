"""`watcher caption --ray`: the same caption run, its model work spread over a Ray cluster.

The driver (this process) does what `watcher caption` does before and after the model: it
takes the database lock, scans the folders against the index (`plan_caption`: the same
skip-what-is-done rules), queues the work (`apply_plan`), claims the jobs, and at the end
commits every result. Between, Ray Data runs the work:

- **read + decode** (`decode_batch`): Ray tasks on CPUs, each image read once from the
  shared file system, hashed and decoded exactly as the local pipeline does (`prepare`);
- **caption + sidecar** (`CaptionActor`): an actor pool, one model per GPU (`num_gpus=1`;
  CPU actors on a cluster without GPUs). Each actor runs the local model worker's batching
  (copies of identical bytes run once, OOM splits, one-by-one retry on errors) and writes
  the sidecars next to the images with the writer's own confined, atomic code;
- **index** (`_Committer`): the driver is the only SQLite writer. It commits the actors'
  rows and job states in batches, one transaction each, with the writer's own code.

Idempotent: a caption is deterministic and a sidecar that already holds exactly the text is
left alone (`decide_hash` says "same"), so a batch that Ray runs again after an actor died
writes nothing twice; the driver takes one result per job. Temp files of an actor killed
mid-write are removed at the end of the run, as the next scan would.

The actors answer the writer's questions about the index (is this sidecar ours? who owns
this name?) from a snapshot the driver sends with each job: SQLite is never opened on a
worker (nor over a network file system).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import queue
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from watcher.captioning import (
    CaptionError,
    CaptionReport,
    ProgressCallback,
    StartCallback,
    Summary,
    _Counter,
    _default_logging,
    _folders,
    _planned,
    apply_plan,
    failures_under,
    open_jobs,
    plan_caption,
    with_overrides,
)
from watcher.config import Config
from watcher.index import ImageRow, Index
from watcher.jobs import JobQueue
from watcher.messages import Captioned, Failed, Job, Outcome, Prepared, Work
from watcher.outputs.sidecar import fsync_dir, is_temp, render

if TYPE_CHECKING:
    import sqlite_utils

log = structlog.get_logger("watcher.cluster")

INSTALL_HINT = "install it with: pip install 'moondream-watcher[ray]'"
DECODE_CPUS = 0.5  # Ray's CPU count per decode task (reading and decoding: mostly waiting)


@dataclass(frozen=True)
class Ticket:
    """A claimed job and what the actor needs to know of the index to write its sidecar."""

    job: Job
    existing: ImageRow | None  # the image's row now (our sidecar's hash, its name)
    owners: tuple[tuple[str, str | None], ...]  # (sidecar name, image owning it)


@dataclass(frozen=True)
class Result:
    """What an actor did with one job: the index row to commit (or a Failed / Outcome),
    and the Captioned it came from (for the driver's log line and counts)."""

    job: Job
    written: ImageRow | Outcome | Failed
    item: Captioned | None = None
    # The writer's outcome log lines for it (kept, pending, changed meanwhile), said by the
    # driver once it has committed the row (watcher.pipeline.writer: _say).
    said: tuple[tuple[str, str, dict[str, Any]], ...] = ()


class _Snapshot:
    """The index, as far as a batch of tickets tells: what the writer asks of it."""

    def __init__(self, tickets: Iterable[Ticket]) -> None:
        self.rows = {str(t.job.path): t.existing for t in tickets}
        self.owners = {name: owner for t in tickets for name, owner in t.owners}

    def get(self, path: str) -> ImageRow | None:
        return self.rows.get(path)

    def sidecar_owner(self, sidecar: str) -> str | None:
        return self.owners.get(sidecar)

    def by_hash(self, sha256: str) -> None:  # the model worker's copy reuse: none across runs
        return None


# -- on the workers ---------------------------------------------------------------------------


def _pickled(column: Any) -> list[Any]:
    return [pickle.loads(b) for b in column]


def decode_batch(batch: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A Ray task: read and decode each ticket's image (`Work`, or `Failed` with why)."""
    from watcher.pipeline.decode import DecodeError, prepare
    from watcher.pipeline.stages import _identity

    out = []
    for ticket in _pickled(batch["ticket"]):
        job = ticket.job
        folder = cfg.folder_for(job.path) or cfg.with_folders([job.root]).folders[0]
        try:
            p = prepare(job, max_pixels=cfg.max_pixels, max_side=cfg.max_side)
            item: Any = Work(p, folder.tasks(cfg.model.max_tokens))
        except DecodeError as e:
            item = Failed(job, e.reason, e.transient, e.vanished, _identity(job))
        except Exception as e:  # one bad file must not fail the block
            item = Failed(job, f"unexpected error: {type(e).__name__}: {e}", False)
        out.append(pickle.dumps((ticket, item)))
    return {"work": out}


class CaptionActor:
    """One model (on one GPU, when the cluster has them): captions a batch of decoded
    images and writes their sidecars; returns what the driver commits."""

    def __init__(self, cfg: Config) -> None:
        from watcher.backends import load_backend
        from watcher.log import configure_logging

        configure_logging(cfg.log)
        self.cfg = cfg
        self.backend = load_backend(cfg.model)  # in this process: the actor is the isolation
        self.pid = os.getpid()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from watcher.pipeline.model_worker import ModelWorker
        from watcher.pipeline.writer import Writer

        pairs = _pickled(batch["work"])
        snapshot = _Snapshot(t for t, _ in pairs)
        tickets = {t.job.id: t for t, _ in pairs}
        results: list[Result] = [Result(i.job, i) for _, i in pairs if isinstance(i, Failed)]
        outbox: queue.Queue = queue.Queue()
        worker = ModelWorker(self.backend, queue.Queue(), outbox, Path(os.devnull))
        worker.index = snapshot  # type: ignore[assignment]  # read by its copy reuse only
        worker._process([w for _, w in pairs if isinstance(w, Work)])
        writer = Writer(self.cfg, queue.Queue(), Path(os.devnull), lambda o: None, lambda: None)
        writer.index = snapshot  # type: ignore[assignment]
        while not outbox.empty():
            item = outbox.get_nowait()
            if isinstance(item, Failed):
                results.append(Result(item.job, item))
                continue
            job = item.prepared.job
            try:
                written: Any = writer._sidecar(item)
            except OSError as e:  # disk full and the like: retried later, as locally
                from watcher.outputs.pending import error_reason

                written = Failed(job, error_reason("writing sidecar", e), transient=True)
            light = dataclasses.replace(item, prepared=_without_pixels(item.prepared))
            said, writer._said = tuple(writer._said), []
            results.append(Result(job, written, light, said))
        for folder, root in writer._dirty.items():  # renames durable before the driver commits
            try:
                fsync_dir(folder, root)
            except OSError as e:
                log.warning("cannot sync folder", folder=str(folder), error=str(e))
        assert {r.job.id for r in results} == set(tickets), "a job got no result"
        return {"result": [pickle.dumps(r) for r in results], "pid": [self.pid] * len(results)}


_NO_PIXELS: Any = None


def _without_pixels(p: Prepared) -> Prepared:
    """The Prepared without its image: the driver needs its identity, not its pixels."""
    global _NO_PIXELS
    if _NO_PIXELS is None:
        from PIL import Image

        _NO_PIXELS = Image.new("RGB", (1, 1))
    return dataclasses.replace(p, image=_NO_PIXELS)


# -- on the driver ----------------------------------------------------------------------------


def _committer(cfg: Config, db: sqlite_utils.Database, on_outcome: Any) -> Any:
    """The pipeline's writer, with the sidecar step already done by the actors: it commits
    their rows and job states in one transaction per batch, logs, and reports outcomes."""
    from watcher.pipeline.writer import Writer

    class _Committer(Writer):
        def __init__(self) -> None:
            super().__init__(cfg, queue.Queue(), cfg.database, on_outcome, lambda: None)
            self.db = db
            self.index = Index(db)
            self.jobs = JobQueue(db)
            self.done: dict[int, tuple[ImageRow | Outcome | Failed, tuple]] = {}

        def _sidecar(self, item: Captioned) -> ImageRow | Outcome | Failed:
            written, said = self.done.pop(item.prepared.job.id)
            self._said += said  # the actor's lines, said after this batch commits
            return written

        def commit(self, results: Sequence[Result]) -> None:
            items: list[Any] = []
            for r in results:
                if r.item is None:
                    items.append(r.written)
                else:
                    self.done[r.job.id] = (r.written, r.said)
                    items.append(r.item)
            if items:
                self._write(items, last_chance=True)

    return _Committer()


def _tickets(db: sqlite_utils.Database, cfg: Config, jobs: list[Job]) -> list[Ticket]:
    index = Index(db)
    out = []
    for job in jobs:
        folder = cfg.folder_for(job.path) or cfg.with_folders([job.root]).folders[0]
        names = []
        try:
            names = [str(render(folder.sidecar, job.path))]
        except Exception:  # a pattern the writer refuses: it says so itself
            names = []
        out.append(
            Ticket(job, index.get(str(job.path)), tuple((n, index.sidecar_owner(n)) for n in names))
        )
    return out


def _remove_temp_files(folders: Iterable[Path]) -> None:
    """Temp files an actor killed mid-write left: removed as the next scan would (only
    ours, and only once their writer is gone or they are old)."""
    from watcher.intake.scan import _remove_stale_temp

    for folder in folders:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if is_temp(name):
                _remove_stale_temp(folder / name)


def _connect(address: str | None, ray_module: Any) -> bool:
    """Join the cluster at `address` (None: start a local one) unless this process already
    has; True if this call started the connection (and so ends it)."""
    if ray_module.is_initialized():
        return False
    ray_module.init(address=address, log_to_driver=False, configure_logging=False)
    return True


def _actors(ray_module: Any, actors: int | None) -> tuple[int, dict[str, float]]:
    """(pool size, resources per actor): one actor per GPU; CPU actors without GPUs.

    CPU actors share what the decode tasks leave (DECODE_CPUS each): actors
    that took every CPU would starve the reading and wait for images forever."""
    resources = ray_module.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    if gpus:
        return (actors or gpus), {"num_gpus": 1, "num_cpus": min(1.0, cpus / (2 * gpus))}
    size = actors or max(1, int(cpus) // 2)
    return size, {"num_cpus": min(1.0, max(0.1, (cpus - DECODE_CPUS) / size))}


def caption_on_ray(
    config: Config,
    folders: Iterable[Path | str],
    *,
    address: str | None = None,
    actors: int | None = None,
    force: bool = False,
    task: str | None = None,
    question: str | None = None,
    overwrite: str | None = None,
    on_start: StartCallback | None = None,
    on_progress: ProgressCallback | None = None,
) -> CaptionReport:
    """Caption every image under `folders` once, as `caption_folders` does, with the model
    work on the Ray cluster at `address` (None: this process's Ray, or a new local one;
    "auto": the cluster this machine belongs to). `actors`: how many models (default: one
    per GPU; half the CPUs on a cluster without GPUs). `task`, `question`, `overwrite`
    override the config for these folders. The folders must be at the same paths on every
    node (a shared file system). Raises CaptionError (no Ray, the database
    in use), ConfigError, index.DatabaseError."""
    from watcher.index import connect
    from watcher.service.lock import AlreadyRunning, DatabaseLock

    try:
        import ray
        import ray.data
    except ImportError as e:
        raise CaptionError(f"--ray needs Ray Data ({e}); {INSTALL_HINT}") from None
    from watcher.config import ConfigError

    _default_logging(config)
    dirs = _folders(folders)
    given = {"task": task, "question": question, "overwrite": overwrite}
    given = {k: v for k, v in given.items() if v is not None}
    if task == "query" and not (question or config.defaults.get("question")):
        raise ConfigError("--task query needs --question")
    cfg = with_overrides(config, dirs, **given)
    lock = DatabaseLock(cfg.database)
    try:
        lock.acquire("caption")
    except AlreadyRunning as e:
        raise CaptionError(
            f"{e}; --ray writes the index itself: stop `watcher run` (or the other "
            "`watcher caption`) first"
        ) from None
    try:
        db = connect(cfg.database)
        jobs = JobQueue(db)
        jobs.recover()
        plan = plan_caption(db, cfg, dirs, force=force)
        _, restored = apply_plan(db, cfg, plan, force=force)
        pending = open_jobs(jobs, plan.roots)
        if pending == 0:
            return _planned(plan, restored=restored)
        from watcher.backends.registry import get_backend

        if get_backend(cfg.model.backend).checks_weights:
            # The model's files, checked here before any actor spends a minute finding
            # them missing (the nodes need them too: a shared or pre-filled HF cache).
            from watcher.backends.weights import ensure_available

            ensure_available(cfg.model)
        started = _connect(address, ray)
        try:
            summary = _run(cfg, db, jobs, plan.roots, pending, ray, actors, on_start, on_progress)
        except ray.exceptions.RayError as e:
            jobs.recover()  # the claimed jobs are queued again for the next run
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise CaptionError(f"the Ray run failed: {first}") from None
        finally:
            if started:
                ray.shutdown()
        return _planned(plan, restored=restored, summary=summary)
    finally:
        lock.release()


def _run(
    cfg: Config,
    db: sqlite_utils.Database,
    jobs: JobQueue,
    roots: tuple[Path, ...],
    pending: int,
    ray: Any,
    actors: int | None,
    on_start: StartCallback | None,
    on_progress: ProgressCallback | None,
) -> Summary:
    outcomes: list[Outcome] = []
    counter = _Counter(pending, on_progress)

    def record(o: Outcome) -> None:
        outcomes.append(o)
        counter(o)

    committer = _committer(cfg, db, record)
    size, per_actor = _actors(ray, actors)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours is on the terminal
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its INFO lines would break it
    if on_start is not None:
        on_start(pending, None)
    folders: set[Path] = set()
    log.info("backfill on ray", images=pending, actors=size, **per_actor)
    while open_jobs(jobs, roots):
        due = jobs.next_due()
        if due is not None and due > time.time():  # transient failures wait their backoff
            time.sleep(min(60.0, due - time.time()))  # a scheduled wait, nothing to signal it
        claimed = jobs.claim(1_000_000, roots)
        if not claimed:
            continue
        folders.update(j.path.parent for j in claimed)
        for results in _dataset(cfg, _tickets(db, cfg, claimed), size, per_actor, ray):
            committer.commit(results)
    _remove_temp_files(folders)
    return Summary(
        tuple(o for o in outcomes if o.state == "done"),
        tuple(failures_under(jobs, roots)),
        tuple((Path(o.path), o.reason or "") for o in outcomes if o.state == "skipped"),
    )


def _dataset(
    cfg: Config, tickets: list[Ticket], size: int, per_actor: dict[str, float], ray: Any
) -> Iterator[list[Result]]:
    """Run the tickets through Ray Data; yield the results in commit-sized batches, each
    job once (a block Ray ran again after an actor died yields nothing twice)."""
    # One block per model batch: the blocks stream through decode and the actors, and the
    # driver commits (and shows progress) as each one comes back.
    per_block = max(1, cfg.model.batch_size)
    ds = ray.data.from_items(
        [{"ticket": pickle.dumps(t)} for t in tickets],
        override_num_blocks=max(1, -(-len(tickets) // per_block)),
    )
    ds = ds.map_batches(
        decode_batch, fn_kwargs={"cfg": cfg}, batch_size=per_block, num_cpus=DECODE_CPUS
    )
    # Ray Data restarts a dead actor and runs its batch again (max_restarts and
    # max_task_retries are -1 for actor pools): that is what makes a killed actor harmless.
    ds = ds.map_batches(
        CaptionActor,
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=max(1, cfg.model.batch_size),
        compute=ray.data.ActorPoolStrategy(size=size),
        **per_actor,
    )
    seen: set[int] = set()
    # Block by block, as the actors finish them: the progress moves with the work, and
    # each commit is one model batch (a transaction per batch is far below SQLite's rate;
    # see bench/scaleout.py).
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        fresh = []
        for r in _pickled(batch["result"]):
            if r.job.id not in seen:
                seen.add(r.job.id)
                fresh.append(r)
        yield fresh
