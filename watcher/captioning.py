"""What `watcher caption`, `retry`, `recaption`, `show` and `prune` do, as library calls."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from watcher.backends.registry import get_backend
from watcher.config import Config, FolderConfig, ModelConfig
from watcher.index import ImageRow, Index, prefix_range, transaction
from watcher.intake.filter import PassedOver
from watcher.intake.scan import Expected, scan_folder
from watcher.jobs import JobQueue
from watcher.paths import decode, encode, shown

if TYPE_CHECKING:
    import sqlite_utils
    from PIL import Image

    from watcher.backends import Backend
    from watcher.messages import Outcome
    from watcher.tasks import Task

log = structlog.get_logger("watcher.captioning")

# -- what the index expects ---------------------------------------------------------------


def model_name(model: ModelConfig) -> str:
    """The name a loaded backend records in the index for this model config."""
    return get_backend(model.backend).model_name(model)


def model_revision(model: ModelConfig) -> str | None:
    """The revision a loaded backend records, as far as the config and the disk tell
    (a local copy that is a cache snapshot is its commit)."""
    return get_backend(model.backend).model_revision(model)


def compose(text: str, prefix: str, suffix: str) -> str:
    """The sidecar caption from the model's cleaned text, as the writer builds it
    (tasks.clean_caption on text already clean)."""
    if not (prefix or suffix):
        return text.strip()
    return ", ".join(p for p in (prefix.strip(), text.strip(), suffix.strip()) if p)


def expected_under(
    db: sqlite_utils.Database, under: Path, folder: FolderConfig, model: ModelConfig
) -> dict[str, Expected]:
    """For the catch-up scan (in place of Index.stats_under): each indexed image's size,
    mtime, sidecar, and whether it was written with
    the folder's present settings: its task, every index task, the model, and the
    prefix/suffix (recomputed from the model's text in the index, so nothing more needs
    storing). SQLite reads the JSON (this runs for every indexed image of a scan); a task
    key with a double quote in it (a query's question) is looked up in Python instead.

    The comparison is with the model's caption (`model_caption`, schema 2), not `caption`:
    for a kept sidecar `caption` is the user's text, which no settings ever reproduce, and
    comparing with it would re-caption that image on every run."""
    tasks = folder.tasks(model.max_tokens)
    names = (model_name(model), model.source)
    plain = [t.key for t in tasks if '"' not in t.key]
    quoted = [t.key for t in tasks if '"' in t.key]
    has_all = " AND ".join(["json_type(outputs, ?) IS NOT NULL"] * len(plain)) or "1"
    cur = db.conn.execute(
        f"""SELECT path, size, mtime_ns, coalesce(model_caption, caption), task, outputs,
                   CASE WHEN instr(task, '"') = 0
                        THEN json_extract(outputs, '$."' || task || '"') END,
                   ({has_all}), model, sidecar, sidecar_state
            FROM images WHERE path >= ? AND path < ?""",
        (*['$."' + k + '"' for k in plain], *prefix_range(under)),
    )
    want_task = tasks[0].key
    out: dict[str, Expected] = {}
    for path, size, mtime_ns, caption, task, outputs, text, complete, model_, sidecar, state in cur:
        if '"' in task or quoted:
            parsed = json.loads(outputs or "{}")
            text = parsed.get(task)
            complete = complete and all(k in parsed for k in quoted)
        current = bool(
            task == want_task
            and complete
            and model_ in names
            and isinstance(text, str)
            and compose(text, folder.prefix, folder.suffix) == caption
        )
        # A sidecar that could not be written is `pending` (retry's business), not missing.
        out[decode(path)] = Expected(
            size,
            mtime_ns,
            decode(sidecar) if sidecar is not None and state in ("written", "kept") else None,
            current,
        )
    return out


# -- sidecars from the index ----------------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    """Sidecars written again from the index (no model work), and those that could not be."""

    written: tuple[str, ...] = ()
    pending: tuple[tuple[str, str], ...] = ()  # (image path, reason)


def missing_sidecars(db: sqlite_utils.Database, paths: Iterable[str] | None = None) -> list[str]:
    """Images in the index (all, or these) whose sidecar is recorded as there but is not,
    while the image still is."""
    if paths is None:
        rows = db.conn.execute(
            "SELECT path, sidecar FROM images WHERE sidecar IS NOT NULL "
            "AND sidecar_state IN ('written', 'kept')"
        ).fetchall()
    else:
        rows = []
        for p in paths:
            rows += db.conn.execute(
                "SELECT path, sidecar FROM images WHERE path = ? AND sidecar IS NOT NULL "
                "AND sidecar_state IN ('written', 'kept')",
                (encode(p),),
            ).fetchall()
    found = [(decode(p), decode(s)) for p, s in rows]
    return [p for p, s in found if not os.path.lexists(s) and os.path.lexists(p)]


def restore_sidecars(db: sqlite_utils.Database, cfg: Config, paths: Iterable[str]) -> Restored:
    """Write the missing sidecars of `paths` again from their index rows (no model work).
    They go through the writer's confined path (outputs.pending.write_pending_sidecars): the folder
    opened without following links below the watched root, the name checked against image
    names, and the overwrite policy asked again, so a file that appeared meanwhile, or a
    folder swapped for a link, is not written over. What is written is ours (the model's
    caption), also for a sidecar of the user's that was deleted. A sidecar that cannot be
    written stays `pending`, as in the writer."""
    from watcher.outputs.pending import write_pending_sidecars

    index = Index(db)
    todo = []
    for path in paths:
        row = index.get(path)
        if row is None or not row.sidecar or os.path.lexists(row.sidecar):
            continue
        todo.append(path)
    if not todo:
        return Restored()
    with transaction(db):
        db.conn.executemany(
            "UPDATE images SET sidecar_state = 'pending' WHERE path = ?",
            [(encode(p),) for p in todo],
        )
    _, still = write_pending_sidecars(db, cfg, todo)
    written = []
    for path in todo:
        row = index.get(path)
        if row is not None and row.sidecar_state == "written":
            log.info(
                "missing sidecar written again from the index",
                path=shown(path),
                sidecar=shown(row.sidecar or ""),
            )
            written.append(path)
    return Restored(tuple(written), tuple(still))


# -- failures of files that are gone ----------------------------------------------------------


def vanished_failures(db: sqlite_utils.Database) -> list[str]:
    """Failed images that no longer exist (read only: `watcher status` uses it too)."""
    rows = db.conn.execute("SELECT path FROM jobs WHERE state = 'failed'").fetchall()
    return [p for p in (decode(r) for (r,) in rows) if not os.path.lexists(p)]


def forget_vanished_failures(db: sqlite_utils.Database) -> int:
    """Failed images that no longer exist are forgotten: never listed, never retried."""
    gone = vanished_failures(db)
    if gone:
        with transaction(db):
            db.conn.executemany(
                "DELETE FROM jobs WHERE path = ? AND state = 'failed'", [(encode(p),) for p in gone]
            )
    return len(gone)


def forget_outputs(db: sqlite_utils.Database, paths: Sequence[str]) -> None:
    """Before a forced re-caption: the stored model texts of these images are dropped so
    the model runs again instead of reusing them (the caption stays searchable; an
    interrupted run re-queues them, as their outputs no longer match the settings)."""
    with transaction(db):
        db.conn.executemany(
            "UPDATE images SET outputs = '{}' WHERE path = ?", [(encode(p),) for p in paths]
        )


# -- prune ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pruned:
    """What `prune` found (and removed unless a dry run): index rows and jobs of images
    that no longer exist."""

    images: tuple[str, ...]
    jobs: tuple[str, ...]


def missing_rows(db: sqlite_utils.Database) -> Pruned:
    """Index rows and jobs of images that no longer exist (one lstat each)."""
    images = [
        p
        for p in (decode(r) for (r,) in db.conn.execute("SELECT path FROM images"))
        if not os.path.lexists(p)
    ]
    jobs = [
        p
        for p in (
            decode(r) for (r,) in db.conn.execute("SELECT path FROM jobs WHERE state != 'running'")
        )
        if not os.path.lexists(p)
    ]
    return Pruned(tuple(images), tuple(jobs))


def prune(db: sqlite_utils.Database, *, dry_run: bool = False) -> Pruned:
    """Remove index rows and jobs of images that no longer exist (`dry_run`: only say)."""
    found = missing_rows(db)
    if not dry_run:
        with transaction(db):
            db.conn.executemany(
                "DELETE FROM images WHERE path = ?", [(encode(p),) for p in found.images]
            )
            db.conn.executemany(
                "DELETE FROM jobs WHERE path = ? AND state != 'running'",
                [(encode(p),) for p in found.jobs],
            )
    return found


# -- show -------------------------------------------------------------------------------------


def show(db: sqlite_utils.Database, path: str) -> dict[str, Any] | None:
    """What is known of one image: index row, sidecar text on disk, job state."""
    row: ImageRow | None = Index(db).get(path)
    job = JobQueue(db).state_of(path)
    if row is None and job is None:
        return None
    out: dict[str, Any] = {"path": path, "exists": os.path.lexists(path)}
    if job is not None:
        out["job"] = {"state": job[0], "reason": job[1]}
    if row is not None:
        sidecar_text = _read_sidecar(row.sidecar) if row.sidecar else None
        out.update(
            {
                "caption": row.caption,
                "model_caption": row.ours,
                "task": row.task,
                "outputs": row.outputs,
                "model": row.model,
                "revision": row.revision,
                "sidecar": row.sidecar,
                "sidecar_state": row.sidecar_state,
                "sidecar_error": row.sidecar_error,
                "sidecar_text": sidecar_text,
                "width": row.width,
                "height": row.height,
                "sha256": row.sha256,
                "created": row.created,
                "updated": row.updated,
                "output_records": _output_records(db, path),
            }
        )
    return out


def _output_records(db: sqlite_utils.Database, path: str) -> list[dict[str, Any]]:
    """The image's xmp/embed outputs as last written (image_outputs): which, where, in
    what state and why, and when."""
    cur = db.conn.execute(
        """SELECT o.output, o.target, o.state, o.error, o.updated FROM image_outputs o
           JOIN images i ON i.rowid = o.image WHERE i.path = ? ORDER BY o.output""",
        (encode(path),),
    )
    return [
        {
            "output": name,
            "target": decode(target) if target is not None else None,
            "state": state,
            "reason": error,
            "updated": updated,
        }
        for name, target, state, error, updated in cur
    ]


def _read_sidecar(path: str, limit: int = 1 << 20) -> str | None:
    """The sidecar's text, or None. Only a regular file is opened, without following a
    link or blocking on a pipe: the name is in a folder anyone may have written to."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        fd = os.open(
            path,
            os.O_RDONLY
            | getattr(os, "O_NOFOLLOW", 0)
            | getattr(os, "O_NONBLOCK", 0)
            | getattr(os, "O_CLOEXEC", 0),
        )
    except OSError:
        return None
    with open(fd, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


# -- the caption run ----------------------------------------------------------------------------


@dataclass
class Plan:
    """What a caption run found to do, before any model work."""

    roots: tuple[Path, ...]
    queued: list[tuple[Path, Path]] = field(default_factory=list)  # (image, folder root)
    new: int = 0
    changed: int = 0
    outdated: list[str] = field(default_factory=list)  # queued: other settings than now
    retried: int = 0  # failed before, tried again
    up_to_date: int = 0
    restore: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    # Files not captioned because of their name (no extension, not an image), per reason.
    passed_over: PassedOver = field(default_factory=PassedOver)


def plan_caption(
    db: sqlite_utils.Database,
    cfg: Config,
    dirs: Sequence[Path],
    *,
    force: bool = False,
    only: Callable[[str], bool] | None = None,
) -> Plan:
    """Scan `dirs` against the index: what is new, changed, written with other settings,
    missing its sidecar, gone. Records nothing (see apply_plan). `force`: every image is
    queued again. `only`: restrict the work to these paths (recaption)."""
    plan = Plan(tuple(dirs))
    for d in dirs:
        folder = cfg.folder_for(d)
        assert folder is not None
        result = scan_folder(db, folder, cfg.model, top=d, retry_failed=True, force=force)
        queue = [p for p in result.queue if only is None or only(str(p))]
        plan.queued += [(p, folder.path) for p in queue]
        plan.retried += sum(1 for p in queue if str(p) in result.retried)
        plan.new += result.new
        plan.changed += result.changed
        plan.outdated += [str(p) for p in result.outdated if only is None or only(str(p))]
        plan.up_to_date += result.up_to_date + (len(result.queue) - len(queue))
        plan.restore += [p for p in result.restore if only is None or only(p)]
        plan.removed += result.removed
        # Queued (say by `retry`) and deleted since: nothing to run.
        plan.removed += [
            q
            for q in (
                decode(r)
                for (r,) in db.conn.execute(
                    "SELECT path FROM jobs WHERE state = 'pending' AND path >= ? AND path < ?",
                    prefix_range(d),
                )
            )
            if not os.path.lexists(q)
        ]
        plan.skipped += result.skipped
        plan.passed_over.merge(result.passed_over)
    return plan


def apply_plan(
    db: sqlite_utils.Database, cfg: Config, plan: Plan, *, force: bool = False
) -> tuple[int, Restored]:
    """Record the plan: forget what is gone, note skipped names, write missing sidecars
    from the index, queue the rest. Returns (jobs queued, sidecars restored)."""
    index, jobs = Index(db), JobQueue(db)
    with transaction(db):
        for gone in plan.removed:
            index.delete(gone)
            jobs.forget(gone)
        for d in plan.roots:
            folder = cfg.folder_for(d)
            assert folder is not None
            jobs.set_skipped(
                d,
                folder.path,
                [s for s in plan.skipped if str(s[0]).startswith(str(d).rstrip("/") + "/")],
            )
    restored = restore_sidecars(db, cfg, plan.restore)
    if force:
        forget_outputs(db, [str(p) for p, _ in plan.queued])
    return jobs.enqueue_many(plan.queued), restored


def open_jobs(jobs: JobQueue, roots: Iterable[Path]) -> int:
    total = 0
    for r in roots:
        counts = jobs.counts(r)
        total += counts["pending"] + counts["running"]
    return total


def failures_under(jobs: JobQueue, roots: Iterable[Path]) -> list:
    prefixes = [str(d).rstrip("/") + "/" for d in roots]
    return [f for f in jobs.failures(limit=10_000) if any(f.path.startswith(p) for p in prefixes)]


class LazyBackend:
    """A backend that loads the model on the first batch that needs it: a run whose work
    is all copies of captioned images (or failures found while decoding) never loads it.
    Before loading, `name` and `revision` are what the config says they will be (the worker
    compares them with the index to reuse captions of identical bytes)."""

    def __init__(self, model: ModelConfig, opener: Callable[[], Backend]) -> None:
        self._opener = opener
        self._backend: Backend | None = None
        self._lock = threading.Lock()
        self._name = model_name(model)
        self._revision = model_revision(model)
        self.max_batch = max(1, model.batch_size)
        self.loaded = threading.Event()

    @property
    def name(self) -> str:
        return self._backend.name if self._backend is not None else self._name

    @property
    def revision(self) -> str | None:
        return self._backend.revision if self._backend is not None else self._revision

    @property
    def device(self) -> str | None:
        """Where the loaded model computes (None before it loads, or where it does not say)."""
        from watcher.backends import device_of

        return device_of(self._backend) if self._backend is not None else None

    def describe(self, images: Sequence[Image.Image], tasks: Sequence[Task]) -> list[list[str]]:
        with self._lock:
            if self._backend is None:
                self._backend = self._opener()
                self.loaded.set()
        return self._backend.describe(images, tasks)

    def close(self) -> None:
        with self._lock:
            if self._backend is not None:
                self._backend.close()


@dataclass(frozen=True)
class Summary:
    """What one pipeline run did (caption_folders turns it into the CaptionReport)."""

    done: tuple[Outcome, ...]
    failed: tuple[Any, ...]  # queue.Failure rows under the run's folders
    # Images skipped while the run went on (their folder became a link): (path, reason).
    skipped: tuple[tuple[Path, str], ...] = ()


def run_pipeline(
    cfg: Config,
    roots: tuple[Path, ...],
    backend: Backend,
    jobs: JobQueue,
    on_outcome: Callable[[Outcome], None],
) -> Summary:
    """Drain the queued jobs under `roots` through the pipeline in this process."""
    from watcher.backends import runs_on_cpu
    from watcher.embedding import caption_embedder
    from watcher.pipeline.backfill import Backfill
    from watcher.pipeline.stages import Pipeline

    outcomes: list[Outcome] = []

    def record(o: Outcome) -> None:
        outcomes.append(o)
        on_outcome(o)

    # Under a burst the captions' search vectors come after them, as in the daemon: the
    # embedder never holds the vision model back. On a CPU model they are embedded once the
    # captions are done (the embedder takes 7-45 ms of CPU a caption: 4x the tiny model's
    # own time); beside a GPU or a server, alongside. The command ends when they are in.
    backfill = None
    if cfg.search.backfill and caption_embedder(cfg) is not None:
        backfill = Backfill(
            cfg,
            scoped=True,
            busy=lambda: runs_on_cpu(backend) and pipeline.in_flight > 0,
        )
    pipeline = Pipeline(
        cfg,
        backend,
        roots=roots,
        on_outcome=record,
        defer_embedding=backfill is not None,
        on_deferred=backfill.poke if backfill is not None else None,
    )
    if backfill is not None:
        backfill.start()
    pipeline.start()
    drained = False
    try:
        pipeline.wait_until(lambda: open_jobs(jobs, roots) == 0)
        drained = True
    finally:
        pipeline.stop()
        backend.close()
        if backfill is not None:
            if drained:
                t0 = time.monotonic()
                n = backfill.drain(threads=os.cpu_count())
                if n:
                    log.info(
                        "search vectors embedded after the captions",
                        captions=n,
                        seconds=round(time.monotonic() - t0, 2),
                    )
            else:  # interrupted: what is left is the daemon's backfill's
                backfill.stop()
    return Summary(
        tuple(o for o in outcomes if o.state == "done"),
        tuple(failures_under(jobs, roots)),
        tuple((Path(o.path), o.reason or "") for o in outcomes if o.state == "skipped"),
    )


def follow_daemon(
    db: sqlite_utils.Database,
    roots: tuple[Path, ...],
    paths: Sequence[str],
    on_outcome: Callable[[Outcome], None],
    *,
    alive: Callable[[], bool],
    poll: float = 0.2,
) -> Summary | None:
    """Follow jobs the running daemon drains, from the jobs table, until each queued path
    is done or failed (or forgotten: deleted meanwhile). Returns None if the daemon stops
    first (the jobs stay queued for its next start)."""
    from watcher.messages import Outcome, OutcomeState, SidecarState

    waiting = set(paths)
    index, jobs = Index(db), JobQueue(db)
    done: list[Outcome] = []
    while waiting:
        finished = []
        for p in list(waiting):
            row = jobs.state_of(p)
            if row is None:
                o = Outcome(p, OutcomeState.GONE, "image deleted meanwhile")
            elif row[0] == "done":
                r = index.get(p)
                o = Outcome(
                    p,
                    OutcomeState.DONE,
                    r.sidecar_error if r else None,
                    r.caption if r else None,
                    r.sidecar if r else None,
                    SidecarState(r.sidecar_state) if r else None,
                )
                done.append(o)
            elif row[0] == "failed":
                o = Outcome(p, OutcomeState.FAILED, row[1])
            else:
                continue
            finished.append(p)
            on_outcome(o)
        waiting.difference_update(finished)
        if waiting:
            if not alive():
                return None
            time.sleep(poll)  # polling another process's table: no event to wait on
    return Summary(tuple(done), tuple(failures_under(jobs, roots)))


def with_overrides(cfg: Config, dirs: Sequence[Path], **overrides: Any) -> Config:
    """The config's folders plus one (with the defaults) for each dir not inside them; the
    overrides (task, question, overwrite) apply to the folders covering `dirs`."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    extra = [d for d in dirs if cfg.folder_for(d) is None]
    folders = cfg.folders + cfg.with_folders(extra).folders
    if overrides:
        folders = tuple(
            dataclasses.replace(f, **overrides)
            if any(d == f.path or f.path in d.parents or d in f.path.parents for d in dirs)
            else f
            for f in folders
        )
    return dataclasses.replace(cfg, folders=folders)


# -- the library's caption run: what `watcher caption` and `watcher recaption` do -------------


class CaptionError(Exception):
    """A caption run that cannot start as asked (a path that is not a folder or not an image,
    the database held by another `watcher caption`, settings given while the daemon
    captions): the message says why. Nothing was changed."""


class NoMatches(LookupError):
    """`recaption(query=...)` found no image whose caption matches."""


# on_start(total, daemon): the number of images the run waits for and, when they were handed
# to the running daemon, its pid (None: this process captions them).
StartCallback = Callable[[int, "int | None"], None]
# on_progress(outcome, done, total): one call per image that is finished (captioned, failed,
# skipped or gone), in the writer's thread (or the caller's, when following the daemon).
ProgressCallback = Callable[["Outcome", int, int], None]


@dataclass(frozen=True)
class CaptionReport:
    """What a caption run found and did: what `watcher caption` prints, as data.

    The plan (found by the scan, before any model work): `queued` images to caption (new,
    changed, written with other settings or `force`, failed before), of which `new`,
    `changed`, `retried` (failed before) counts and `outdated` (other settings) lists;
    `up_to_date`; `missing_sidecars` (sidecars of ours that are gone: written again from the
    index, no model work); `forgotten` (deleted images dropped from the index); `skipped`
    (names never opened, with why); `passed_over` (files that are not images, per reason).

    The run: `captioned` (one Outcome per image done: its sidecar written, kept or pending),
    `failed` (each with its `error`), `restored` (missing sidecars written again) and
    `restore_pending` (those that could not be, with why). `ran` is False when there was no
    model work to do; `daemon` is the pid of the running `watcher run` the work was handed
    to; `unfinished` says the daemon stopped before finishing (the images stay queued).
    `dry_run`: only the plan, nothing changed. `ok` / `exit_code`: as `watcher caption`."""

    folders: tuple[Path, ...]
    dry_run: bool = False
    queued: tuple[str, ...] = ()
    new: int = 0
    changed: int = 0
    outdated: tuple[str, ...] = ()
    retried: int = 0
    up_to_date: int = 0
    missing_sidecars: tuple[str, ...] = ()
    forgotten: tuple[str, ...] = ()
    skipped: tuple[tuple[Path, str], ...] = ()
    passed_over: PassedOver = field(default_factory=PassedOver)
    ran: bool = False
    captioned: tuple[Outcome, ...] = ()
    failed: tuple[Any, ...] = ()  # jobs.Failure: path, error, attempts, updated
    restored: tuple[str, ...] = ()
    restore_pending: tuple[tuple[str, str], ...] = ()  # (image path, reason)
    daemon: int | None = None
    unfinished: bool = False

    @property
    def captioned_again(self) -> list[Outcome]:
        """Images captioned that had a sidecar written with other settings (or `force`)."""
        outdated = set(self.outdated)
        return [o for o in self.captioned if o.path in outdated]

    @property
    def kept(self) -> list[Outcome]:
        """Captioned images whose existing sidecar was left alone (not ours, or edited)."""
        return [o for o in self.captioned if o.sidecar_state == "kept"]

    @property
    def sidecars_pending(self) -> list[Outcome]:
        """Captioned images whose sidecar could not be written (`watcher retry` tries again)."""
        return [o for o in self.captioned if o.sidecar_state == "pending"]

    @property
    def reused(self) -> int:
        """Captions copied from an identical image already captioned (no model work)."""
        return sum(1 for o in self.captioned if o.reused)

    @property
    def ok(self) -> bool:
        """No image failed, every missing sidecar was written, and the run finished."""
        return not (self.failed or self.restore_pending or self.unfinished)

    @property
    def exit_code(self) -> int:
        """`watcher caption`'s exit code for this report: 0 ok, 1 some images failed."""
        return 0 if self.ok else 1


def _planned(plan: Plan, **run: Any) -> CaptionReport:
    summary: Summary | None = run.pop("summary", None)
    restored: Restored = run.pop("restored", Restored())
    skipped = list(plan.skipped) + list(summary.skipped if summary else ())
    return CaptionReport(
        folders=plan.roots,
        queued=tuple(str(p) for p, _ in plan.queued),
        new=plan.new,
        changed=plan.changed,
        outdated=tuple(plan.outdated),
        retried=plan.retried,
        up_to_date=plan.up_to_date,
        missing_sidecars=tuple(plan.restore),
        forgotten=tuple(plan.removed),
        skipped=tuple(skipped),
        passed_over=plan.passed_over,
        captioned=summary.done if summary else (),
        failed=summary.failed if summary else (),
        ran=summary is not None,
        restored=restored.written,
        restore_pending=restored.pending,
        **run,
    )


def _default_logging(cfg: Config) -> None:
    """A program that has not configured structlog gets the config's log on stderr, as the
    CLI sets it up; structlog's own default would print every event on stdout."""
    if not structlog.is_configured():
        from watcher.log import configure_logging

        configure_logging(cfg.log)


def _folders(folders: Iterable[Path | str]) -> list[Path]:
    dirs = []
    for d in folders:
        p = Path(os.path.abspath(Path(d).expanduser()))
        if not p.is_dir():
            raise CaptionError(f"{shown(str(d))}: not a folder")
        dirs.append(p)
    return dirs


def caption_folders(
    config: Config,
    folders: Iterable[Path | str],
    *,
    force: bool = False,
    dry_run: bool = False,
    task: str | None = None,
    question: str | None = None,
    overwrite: str | None = None,
    on_start: StartCallback | None = None,
    on_progress: ProgressCallback | None = None,
) -> CaptionReport:
    """Caption every image under `folders` once, as `watcher caption FOLDER...` does: new and
    changed images, images whose sidecar was written with other settings (or every image,
    `force`), images that failed before; missing sidecars of ours are written again from the
    index; deleted images are forgotten. The model loads only for the first batch that
    needs it. While `watcher run` uses the same database the work is handed to it and
    followed (`task`, `question` and `overwrite` are refused then: it captions with its
    own settings).

    `task`, `question`, `overwrite` override the config for the folders given. `dry_run`:
    only scan and report the plan. `on_start(total, daemon_pid)` is called once before
    the work, `on_progress(outcome, done, total)` once per image finished.

    Raises CaptionError (a folder that is not one, the database in use), ConfigError
    (`task="query"` without a question), backends.ModelUnavailable (no model), and
    index.DatabaseError (a database that cannot be used). Logs go where structlog is
    configured to send them; if it is not, to stderr as the config's `log:` says."""
    _default_logging(config)
    dirs = _folders(folders)
    return _caption_run(
        config,
        dirs,
        force=force,
        dry_run=dry_run,
        overrides={"task": task, "question": question, "overwrite": overwrite},
        on_start=on_start,
        on_progress=on_progress,
    )


def recaption(
    config: Config,
    images: Iterable[Path | str] = (),
    *,
    folders: Iterable[Path | str] = (),
    query: str | None = None,
    dry_run: bool = False,
    task: str | None = None,
    question: str | None = None,
    overwrite: str | None = None,
    on_start: StartCallback | None = None,
    on_progress: ProgressCallback | None = None,
) -> CaptionReport:
    """Run the model again on chosen images, as `watcher recaption` does: the `images`
    given, every image under `folders`, and every indexed image whose caption matches
    `query`; their sidecars are replaced under the overwrite policy. Raises as
    caption_folders does, plus index.NoDatabase (a query without an index) and NoMatches
    (a query that matches nothing)."""
    from watcher.index import NoDatabase, connect

    _default_logging(config)
    wanted: set[str] = set()
    dirs: list[Path] = []
    for p in images:
        path = Path(os.path.abspath(Path(p).expanduser()))
        if not path.is_file():
            raise CaptionError(f"{shown(str(p))}: not an image file")
        wanted.add(str(path))
        dirs.append(path.parent)
    chosen = _folders(folders)
    dirs += chosen
    if query:
        if not config.database.exists():
            raise NoDatabase(f"no index yet at {config.database}")
        db = connect(config.database)
        hits = Index(db).search(query, limit=1_000_000)
        db.conn.close()
        if not hits:
            raise NoMatches(query)
        for row, _ in hits:
            if os.path.isfile(row.path):
                wanted.add(row.path)
                dirs.append(Path(row.path).parent)
    if not dirs:
        raise CaptionError("recaption needs images, --folder DIR or --query TEXT")
    # Only the deepest distinct folders, so nothing is scanned twice.
    unique = sorted(set(dirs))
    dirs = [d for d in unique if not any(o != d and o in d.parents for o in unique)]

    def only(path: str) -> bool:
        return path in wanted or any(path.startswith(str(f) + "/") for f in chosen)

    return _caption_run(
        config,
        dirs,
        force=True,
        dry_run=dry_run,
        only=only,
        overrides={"task": task, "question": question, "overwrite": overwrite},
        on_start=on_start,
        on_progress=on_progress,
    )


class _Counter:
    """Passes finished images to on_progress with how many are done (retries and jobs put
    back are not finished images)."""

    def __init__(self, total: int, on_progress: ProgressCallback | None) -> None:
        self.total = total
        self.done = 0
        self._on_progress = on_progress
        self._lock = threading.Lock()

    def __call__(self, outcome: Outcome) -> None:
        if outcome.state in ("retry", "requeued"):
            return
        with self._lock:
            self.done += 1
            if self._on_progress is not None:
                self._on_progress(outcome, self.done, self.total)


def _caption_run(
    cfg: Config,
    dirs: list[Path],
    *,
    force: bool,
    dry_run: bool,
    overrides: dict[str, str | None],
    on_start: StartCallback | None,
    on_progress: ProgressCallback | None,
    only: Callable[[str], bool] | None = None,
) -> CaptionReport:
    from watcher.config import ConfigError
    from watcher.index import connect
    from watcher.service.lock import AlreadyRunning, DatabaseLock
    from watcher.service.status import daemon_pid

    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("task") == "query" and not (given.get("question") or cfg.defaults.get("question")):
        raise ConfigError("--task query needs --question")
    cfg = with_overrides(cfg, dirs, **given)
    lock = DatabaseLock(cfg.database)
    daemon: int | None = None
    if not dry_run:
        try:
            lock.acquire("caption")
        except AlreadyRunning as e:
            daemon = daemon_pid(cfg.database)
            if daemon is None:
                raise CaptionError(str(e)) from None
            if given:
                raise CaptionError(
                    f"watcher run (pid {daemon}) is using {cfg.database} and "
                    f"captions with its own settings; stop it to caption with "
                    f"{', '.join('--' + k for k in given)}"
                ) from None
    try:
        db = connect(cfg.database)
        jobs = JobQueue(db)
        if daemon is None and not dry_run:
            jobs.recover()
        plan = plan_caption(db, cfg, dirs, force=force, only=only)
        if dry_run:
            return _planned(plan, dry_run=True)
        _, restored = apply_plan(db, cfg, plan, force=force)
        if daemon is not None and plan.queued:
            return _by_daemon(cfg, plan, restored, daemon, db, on_start, on_progress)
        pending = 0 if daemon is not None else open_jobs(jobs, plan.roots)
        if pending == 0:
            return _planned(plan, restored=restored)
        return _here(cfg, plan, restored, pending, jobs, on_start, on_progress)
    finally:
        lock.release()


def _here(
    cfg: Config,
    plan: Plan,
    restored: Restored,
    pending: int,
    jobs: JobQueue,
    on_start: StartCallback | None,
    on_progress: ProgressCallback | None,
) -> CaptionReport:
    """The queued jobs under the plan's folders, captioned in this process."""
    from watcher.backends import ModelUnavailable, open_backend
    from watcher.backends.registry import get_backend

    if get_backend(cfg.model.backend).checks_weights:
        # A quick check of the disk now, so a missing model fails before any work; the
        # model itself loads only for the first batch that needs it.
        from watcher.backends.weights import ensure_available

        ensure_available(cfg.model)
    load_error: list[ModelUnavailable] = []

    def opener() -> Backend:
        try:
            return open_backend(cfg.model, cfg.log)
        except ModelUnavailable as e:
            load_error.append(e)
            raise

    backend = LazyBackend(cfg.model, opener)
    if on_start is not None:
        on_start(pending, None)
    # cast: LazyBackend's name and revision are read-only properties where the Backend
    # protocol declares plain attributes; the pipeline only reads them.
    summary = run_pipeline(cfg, plan.roots, backend, jobs, _Counter(pending, on_progress))
    if load_error:
        raise load_error[0]
    return _planned(plan, restored=restored, summary=summary)


def _by_daemon(
    cfg: Config,
    plan: Plan,
    restored: Restored,
    pid: int,
    db: sqlite_utils.Database,
    on_start: StartCallback | None,
    on_progress: ProgressCallback | None,
) -> CaptionReport:
    """The queued jobs, captioned by the running daemon and followed here."""
    from watcher.service.status import daemon_pid

    paths = [str(p) for p, _ in plan.queued]
    if on_start is not None:
        on_start(len(paths), pid)
    summary = follow_daemon(
        db,
        plan.roots,
        paths,
        _Counter(len(paths), on_progress),
        alive=lambda: daemon_pid(cfg.database) == pid,
    )
    if summary is None:
        return _planned(plan, restored=restored, daemon=pid, unfinished=True)
    return _planned(plan, restored=restored, summary=summary, daemon=pid)


# -- retry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryReport:
    """What `retry` found and did: failed images queued again (`failed`, `requeued` of them),
    failures of deleted images forgotten (`forgotten`), sidecars that were pending
    (`pending`: `written` of them written) or missing (`missing`: `restored` of them written
    again), and those still pending with why (`still_pending`). `dry_run`: nothing changed."""

    dry_run: bool
    failed: tuple[str, ...] = ()
    forgotten: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    requeued: int = 0
    written: int = 0
    restored: tuple[str, ...] = ()
    still_pending: tuple[tuple[str, str], ...] = ()  # (image path, reason)

    @property
    def ok(self) -> bool:
        """Every sidecar that was tried is written."""
        return not self.still_pending

    @property
    def exit_code(self) -> int:
        """`watcher retry`'s exit code: 0 ok, 1 sidecars still pending."""
        return 0 if self.ok else 1


def retry(
    config: Config, paths: Iterable[Path | str] | None = None, *, dry_run: bool = False
) -> RetryReport:
    """Re-queue failed images (all, or these `paths`) whose files still exist, forget the
    failures of deleted ones, and write sidecars that were pending or have gone missing,
    from the index (no model work), as `watcher retry` does. The queued images are
    captioned by the next caption run or the daemon."""
    from watcher.index import connect
    from watcher.outputs.pending import write_pending_sidecars

    _default_logging(config)
    db = connect(config.database)
    jobs = JobQueue(db)
    wanted = None if paths is None else [os.path.abspath(p) for p in paths]
    failed, gone = jobs.failed_existing(wanted)
    pending = [
        p
        for p in (
            decode(r)
            for (r,) in db.conn.execute("SELECT path FROM images WHERE sidecar_state = 'pending'")
        )
        if wanted is None or p in wanted
    ]
    missing = missing_sidecars(db, wanted)
    found = RetryReport(dry_run, tuple(failed), tuple(gone), tuple(pending), tuple(missing))
    if dry_run:
        return found
    jobs.forget_failed(gone)
    requeued = jobs.retry(failed)
    written, still = write_pending_sidecars(db, config, wanted)
    restored = restore_sidecars(db, config, missing)
    return dataclasses.replace(
        found,
        requeued=requeued,
        written=written,
        restored=restored.written,
        still_pending=(*still, *restored.pending),
    )
