"""The `watcher` command: a thin layer over the library; every subcommand wires stages."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
from pathlib import Path
from typing import TextIO

from watcher.config import Config, ConfigError, default_config_path, load_config
from watcher.status import shown

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="watcher", description=(
        "Caption images with a local vision-language model: sidecar .txt files and a "
        "searchable index."))
    p.add_argument("--config", type=Path, help=f"config file (default {default_config_path()})")
    p.add_argument("--db", type=Path, help="index database (default from the config)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("caption", help="caption every image under folders, then exit")
    c.add_argument("folders", nargs="+", type=Path)
    c.add_argument("--task", choices=("prompt", "short", "normal", "long", "query"))
    c.add_argument("--question", help="the question for --task query")

    r = sub.add_parser("run", help="the daemon: watch folders and caption what arrives")
    r.add_argument("folders", nargs="*", type=Path)

    s = sub.add_parser("search", help="full-text search of the captions, best first")
    s.add_argument("query")
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--json", action="store_true")

    st = sub.add_parser("status", help="what is indexed, queued and failed")
    st.add_argument("--json", action="store_true")

    rt = sub.add_parser("retry", help="re-queue failed images and write pending sidecars")
    rt.add_argument("paths", nargs="*", type=Path)
    rt.add_argument("--all", action="store_true")

    sub.add_parser("reload", help="tell the running daemon to re-read its config (SIGHUP)")

    m = sub.add_parser("model", help="download or inspect the model")
    msub = m.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    f = msub.add_parser("fetch", help="download the model and its tokenizer into the HF cache")
    f.add_argument("--revision")
    msub.add_parser("info", help="what is cached, which revision, size on disk")

    sv = sub.add_parser("service", help="install the systemd / launchd service")
    svsub = sv.add_subparsers(dest="service_command", required=True, metavar="ACTION")
    i = svsub.add_parser("install")
    i.add_argument("--now", action="store_true", help="also enable and start it")
    svsub.add_parser("uninstall")
    svsub.add_parser("status")
    return p


def main(argv: list[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: usage errors exit 2, --help exits 0
        return int(e.code or 0)
    try:
        cfg = load_config(args.config)
        if args.db:
            cfg = dataclasses.replace(cfg, database=args.db.expanduser().absolute())
    except ConfigError as e:
        print(f"watcher: config error: {e}", file=err)
        return EXIT_USAGE
    from watcher.log import configure_logging

    configure_logging(cfg.log, stream=err)
    handler = globals()["cmd_" + args.command]
    try:
        return _with_database_errors(handler, args, cfg, out, err)
    except ConfigError as e:
        print(f"watcher: config error: {e}", file=err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("watcher: interrupted", file=err)
        return 130


def _with_database_errors(handler, args, cfg: Config, out: TextIO, err: TextIO) -> int:
    """Run `handler`; a database that cannot be used (a folder or another program's file given
    as the database, a read-only folder for a command that writes, a newer schema, a lock
    file that is a link) is one line on stderr and exit 2, never a traceback."""
    import sqlite3

    from watcher.index import DatabaseError, NoDatabase

    try:
        return handler(args, cfg, out, err)
    except NoDatabase as e:  # nothing to read yet: as `watcher search` says without a file
        print(f"watcher: {e}", file=err)
        return EXIT_FAILED
    except DatabaseError as e:
        print(f"watcher: database error: {e}", file=err)
        return EXIT_USAGE
    except sqlite3.Error as e:  # anything else SQLite says on the way (I/O error, locked)
        print(f"watcher: database error: {cfg.database}: {e}", file=err)
        return EXIT_USAGE


# -- caption ---------------------------------------------------------------------------

def _folders_for(cfg: Config, dirs: list[Path], args: argparse.Namespace) -> Config:
    """The config's folders plus one (with the defaults) for each dir not inside them."""
    overrides = {}
    if getattr(args, "task", None):
        overrides["task"] = args.task
    if getattr(args, "question", None):
        overrides["question"] = args.question
    if overrides.get("task") == "query" and not (overrides.get("question")
                                                 or cfg.defaults.get("question")):
        raise ConfigError("--task query needs --question")
    extra = [d for d in dirs if cfg.folder_for(d) is None]
    folders = cfg.folders + cfg.with_folders(extra).folders
    if overrides:
        folders = tuple(dataclasses.replace(f, **overrides) if any(
            d == f.path or f.path in d.parents or d in f.path.parents for d in dirs) else f
            for f in folders)
    return dataclasses.replace(cfg, folders=folders)


class Progress:
    """A progress bar on a terminal, one plain line per image otherwise."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.done = 0
        self.stream = stream
        self.tty = stream.isatty()
        self.lock = threading.Lock()

    def __call__(self, outcome) -> None:
        if outcome.state in ("retry", "requeued"):
            return
        with self.lock:
            self.done += 1
            if self.tty:
                width = 30
                filled = int(width * self.done / max(1, self.total))
                self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] "
                                  f"{self.done}/{self.total}")
                if self.done >= self.total:
                    self.stream.write("\n")
            else:
                detail = outcome.sidecar if outcome.state == "done" else outcome.reason
                detail = shown(detail) if detail else detail
                self.stream.write(f"[{self.done}/{self.total}] {outcome.state}: "
                                  f"{shown(outcome.path)} ({detail})\n")
            self.stream.flush()


def cmd_caption(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.backends import ModelUnavailable, open_backend
    from watcher.index import Index, connect, transaction
    from watcher.lock import AlreadyRunning, DatabaseLock
    from watcher.observer import Filter, PassedOver, scan
    from watcher.pipeline import Pipeline
    from watcher.queue import JobQueue

    dirs = []
    for d in args.folders:
        p = Path(os.path.abspath(d.expanduser()))
        if not p.is_dir():
            print(f"watcher: {shown(str(d))}: not a folder", file=err)
            return EXIT_USAGE
        dirs.append(p)
    cfg = _folders_for(cfg, dirs, args)
    lock = DatabaseLock(cfg.database)
    try:
        lock.acquire("caption")
    except AlreadyRunning as e:
        print(f"watcher: {e}", file=err)
        return EXIT_USAGE
    try:
        db = connect(cfg.database)
        index, jobs = Index(db), JobQueue(db)
        jobs.recover()
        todo, up_to_date = 0, 0
        skipped: list[tuple[Path, str]] = []
        passed = PassedOver()
        for d in dirs:
            folder = cfg.folder_for(d)
            assert folder is not None
            result = scan(Filter(folder), index.stats_under(str(d)), jobs.failed_under(d),
                          retry_failed=True, top=d)
            with transaction(db):
                for gone in result.removed:
                    index.delete(gone)
                    jobs.forget(gone)
                jobs.set_skipped(d, folder.path, result.skipped)
            todo += jobs.enqueue_many((p, folder.path) for p in result.queue)
            up_to_date += result.up_to_date
            skipped += result.skipped
            passed.merge(result.passed_over)
        roots = tuple(dirs)
        pending = _open_jobs(jobs, roots)
        if pending == 0:
            print(f"0 new, {up_to_date} up to date" + _skipped_count(skipped), file=out)
            _print_skipped(skipped, out)
            _print_passed_over(passed, dirs, out)
            return EXIT_OK
        try:
            backend = open_backend(cfg.model, cfg.log)
        except ModelUnavailable as e:
            print(f"watcher: {e}", file=err)
            return EXIT_USAGE
        outcomes = []
        progress = Progress(pending, out)

        def record(o) -> None:
            outcomes.append(o)
            progress(o)

        pipeline = Pipeline(cfg, backend, roots=roots, on_outcome=record)
        pipeline.start()
        try:
            pipeline.wait_until(lambda: _open_jobs(jobs, roots) == 0)
        finally:
            pipeline.stop()
            backend.close()
        done = [o for o in outcomes if o.state == "done"]
        failed = jobs.failures(limit=10_000)
        failed = [f for f in failed if any(f.path.startswith(str(d) + "/") for d in dirs)]
        reused = sum(1 for o in done if o.reused)
        kept = sum(1 for o in done if o.sidecar_state == "kept")
        blocked = [o for o in done if o.sidecar_state == "pending"]
        line = f"{len(done)} new, {up_to_date} up to date"
        if reused:
            line += f" ({reused} copies of identical images, no model work)"
        if kept:
            line += f", {kept} existing sidecars left alone"
        line += f", {len(failed)} failed" + _skipped_count(skipped)
        print(line, file=out)
        for o in blocked:
            print(f"sidecar pending: {shown(o.path)}: {o.reason or 'not writable'}", file=out)
        _print_kept([o for o in done if o.sidecar_state == "kept"], out)
        # Images whose folder became a link while the model ran: skipped, like the scan's.
        skipped += [(Path(o.path), o.reason or "") for o in outcomes if o.state == "skipped"]
        for f in failed:
            print(f"failed: {shown(f.path)}: {f.error}", file=out)
        _print_skipped(skipped, out)
        _print_passed_over(passed, dirs, out)
        return EXIT_FAILED if failed else EXIT_OK
    finally:
        lock.release()


def _skipped_count(skipped: list[tuple[Path, str]]) -> str:
    return f", {len(skipped)} skipped" if skipped else ""


def _print_skipped(skipped: list[tuple[Path, str]], out: TextIO) -> None:
    # Not failures (the exit code ignores them): names we will not open, and why.
    for path, reason in sorted(skipped):
        print(f"skipped: {shown(str(path))}: {reason}", file=out)


def _print_passed_over(passed, dirs: list[Path], out: TextIO) -> None:
    # Files not captioned because of their name (no extension, not an image extension,
    # AVIF this Pillow cannot read): a count and a few names per reason.
    from watcher.status import passed_over_lines

    root = str(dirs[0]) if len(dirs) == 1 else None
    for line in passed_over_lines(passed.to_json(), root):
        print(line, file=out)


def _print_kept(kept: list, out: TextIO) -> None:
    # Sidecars left alone (edited by the user, their own, overwrite: never), named so the
    # user knows which files still say what they wrote, not the model.
    for o in kept[:20]:
        print(f"sidecar kept: {shown(o.sidecar or o.path)}: {o.reason}", file=out)
    if len(kept) > 20:
        print(f"sidecar kept: ... and {len(kept) - 20} more (`watcher status`)", file=out)


def _open_jobs(jobs, roots) -> int:
    total = 0
    for r in roots:
        counts = jobs.counts(r)
        total += counts["pending"] + counts["running"]
    return total


# -- search / status / retry -----------------------------------------------------------

def cmd_search(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.index import Index, connect

    # No database yet: NoDatabase, "no index yet" and exit 1 (_with_database_errors).
    hits = Index(connect(cfg.database, readonly=True)).search(args.query, limit=args.limit)
    if args.json:
        json.dump([{"path": r.path, "caption": r.caption, "sidecar": r.sidecar,
                    "score": s} for r, s in hits], out, indent=2)
        out.write("\n")
    else:
        for row, _ in hits:
            print(shown(row.path), file=out)
            print(f"    {row.caption}", file=out)
        if not hits:
            print("no matches", file=err)
    return EXIT_OK if hits else EXIT_FAILED


def cmd_status(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.status import collect, render

    report = collect(cfg.database)
    if args.json:
        json.dump(report, out, indent=2)
        out.write("\n")
    else:
        out.write(render(report))
    return EXIT_OK


def cmd_retry(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.index import connect
    from watcher.queue import JobQueue
    from watcher.writer import write_pending_sidecars

    if not args.all and not args.paths:
        print("watcher: retry needs --all or one or more paths", file=err)
        return EXIT_USAGE
    db = connect(cfg.database)
    paths = None if args.all else [os.path.abspath(p) for p in args.paths]
    n = JobQueue(db).retry(paths)
    written, still = write_pending_sidecars(db, cfg, paths)
    print(f"{n} failed images queued again; {written} pending sidecars written", file=out)
    for path, reason in still:
        print(f"sidecar still pending: {shown(path)}: {reason}", file=out)
    _signal_daemon(cfg, None)
    return EXIT_OK if not still else EXIT_FAILED


def cmd_reload(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    import signal

    pid = _signal_daemon(cfg, signal.SIGHUP)
    if pid is None:
        print("watcher: no daemon is running on " + str(cfg.database), file=err)
        return EXIT_FAILED
    print(f"asked the daemon (pid {pid}) to reload its config", file=out)
    return EXIT_OK


def _signal_daemon(cfg: Config, sig) -> int | None:
    """The running daemon's pid (from the database), signalled with `sig` if given."""
    from watcher.status import daemon_pid

    pid = daemon_pid(cfg.database)
    if pid is not None and sig is not None:
        os.kill(pid, sig)
    return pid


# -- run / model / service -------------------------------------------------------------

def cmd_run(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.daemon import run_daemon, with_command_line

    # Folders given here are watched besides the config's, and stay watched across reloads.
    dirs = [Path(os.path.abspath(d.expanduser())) for d in args.folders]
    if not with_command_line(cfg, dirs).folders:
        print("watcher: no folders to watch: give them on the command line or under "
              f"`folders:` in {cfg.source or default_config_path()}", file=err)
        return EXIT_USAGE
    return run_daemon(cfg, args.config, err, dirs)


def cmd_model(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher import models

    if args.model_command == "fetch":
        return models.cmd_fetch(cfg.model, args.revision, out)
    return models.cmd_info(cfg.model, out)


def cmd_service(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher import service

    config_path = (args.config or default_config_path()).expanduser().absolute()
    if args.service_command == "install":
        return service.install(cfg, config_path, now=args.now, out=out)
    if args.service_command == "uninstall":
        return service.uninstall(out=out)
    return service.status(out=out)
