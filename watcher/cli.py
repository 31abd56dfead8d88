"""The `watcher` command: a thin layer over the library; every subcommand wires stages."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from watcher import __version__
from watcher.config import Config, ConfigError, ModelConfig, default_config_path, load_config
from watcher.paths import shown

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# What a process killed by SIGPIPE reports to its shell (128 + 13): `watcher search x |
# head -1` ends as `cat` or `grep` would, quietly.
EXIT_PIPE = 141


def plural(n: int, one: str, many: str | None = None) -> str:
    """`1 image`, `2 images` (`many` for irregular plurals: copy/copies)."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


# -- the parser --------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks (the epilog)."""


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _global_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the subcommand (`watcher status --db X`); after it they
    # only override when given (SUPPRESS), so the value given before is not reset.
    default = None if top else argparse.SUPPRESS
    p.add_argument(
        "--config",
        type=Path,
        default=default,
        metavar="PATH",
        help=f"config file (default {default_config_path()}, or $WATCHER_CONFIG)",
    )
    p.add_argument(
        "--db",
        type=Path,
        default=default,
        metavar="PATH",
        help="index database (default from the config, or $WATCHER_DB)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="watcher",
        formatter_class=_Formatter,
        description="Caption images with a local vision-language model: sidecar .txt files "
        "and a searchable index.",
        epilog=_examples(
            "watcher caption ~/Pictures/shoot",
            "watcher run ~/Pictures/inbox",
            'watcher search "red bicycle"',
            "watcher status",
            "watcher COMMAND --help   (each command's options and examples)",
        ),
    )
    p.add_argument("--version", action="version", version=f"watcher {__version__}")
    _global_options(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str, *examples: str) -> argparse.ArgumentParser:
        c = sub.add_parser(
            name,
            help=help,
            description=description,
            epilog=_examples(*examples),
            formatter_class=_Formatter,
        )
        _global_options(c, top=False)
        return c

    c = command(
        "caption",
        "caption every image under folders, then exit",
        "Caption every image under the folders once: new and changed images, images "
        "whose sidecar was written with other settings (task, prefix, suffix, "
        "model), and images whose sidecar of ours is missing (written again from the "
        "index). Exit 0 when all succeeded, 1 when some failed, 2 on a usage error. "
        "While `watcher run` uses the same database, the work is handed to it.",
        "watcher caption ~/Pictures/shoot",
        "watcher caption --task prompt ~/datasets/lora",
        "watcher caption --force --overwrite always ~/datasets/lora",
        "watcher caption --dry-run ~/Pictures",
    )
    c.add_argument(
        "folders", nargs="+", type=Path, metavar="FOLDER", help="folders to caption (recursively)"
    )
    _caption_options(c)
    c.add_argument(
        "--force",
        action="store_true",
        help="caption every image again with the model, even up-to-date ones "
        "(sidecars still obey the overwrite policy)",
    )

    rc = command(
        "recaption",
        "caption chosen images again with the model",
        "Run the model again on the images given (files, a folder, or the hits of "
        "a search), replacing their sidecars under the overwrite policy "
        "(`--overwrite always` replaces hand-edited ones too).",
        "watcher recaption ~/Pictures/a.jpg ~/Pictures/b.jpg",
        "watcher recaption --folder ~/datasets/lora --task prompt",
        'watcher recaption --query "blurry" --overwrite always',
    )
    rc.add_argument("paths", nargs="*", type=Path, metavar="IMAGE", help="images to recaption")
    rc.add_argument(
        "--folder",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="every image under DIR (may be repeated)",
    )
    rc.add_argument("--query", metavar="TEXT", help="every image whose caption matches TEXT")
    _caption_options(rc)

    r = command(
        "run",
        "the daemon: watch folders and caption what arrives",
        "Watch folders (from the config, and/or given here) and caption every image "
        "that arrives or changes. Stops on SIGTERM/Ctrl-C; SIGHUP re-reads the config.",
        "watcher run ~/Pictures/inbox",
        "watcher --config ~/watcher.yaml run",
    )
    r.add_argument(
        "folders",
        nargs="*",
        type=Path,
        metavar="FOLDER",
        help="folders to watch besides the configured ones",
    )

    s = command(
        "search",
        "full-text search of the captions, best first",
        "Full-text search of captions and extra outputs (all words must match). "
        "Exit 1 when nothing matches. --json scores grow with relevance.",
        'watcher search "red bicycle"',
        "watcher search sky --json --limit 5",
    )
    s.add_argument("query", metavar="TEXT", help="words to find")
    s.add_argument("--limit", type=int, default=20, help="at most this many hits (default 20)")
    s.add_argument("--json", action="store_true", help="JSON: path, caption, sidecar, score")

    st = command(
        "status",
        "what is indexed, queued and failed",
        "Indexed images, the queue, failures with reasons, pending sidecars, skipped "
        "names, the daemon and its folders. Works while the daemon runs.",
        "watcher status",
        "watcher status --json --db ~/other.db",
    )
    st.add_argument("--json", action="store_true", help="the report as JSON")

    rt = command(
        "retry",
        "re-queue failed images and write missing or pending sidecars",
        "Re-queue failed images (their files must still exist; failures of deleted "
        "files are forgotten), write sidecars that were pending or have gone "
        "missing, from the index (no model work).",
        "watcher retry --all",
        "watcher retry ~/Pictures/a.jpg",
        "watcher retry --all --dry-run",
    )
    rt.add_argument("paths", nargs="*", type=Path, metavar="IMAGE", help="images to retry")
    rt.add_argument("--all", action="store_true", help="every failed image and sidecar")
    rt.add_argument("--dry-run", action="store_true", help="say what would happen; change nothing")

    sh = command(
        "show",
        "everything known about one image",
        "The sidecar's text, the model's text, extra outputs, state, model and "
        "revision, and when, for one image. Exit 1 when the image is not known.",
        "watcher show ~/Pictures/a.jpg",
        "watcher show ~/Pictures/a.jpg --json",
    )
    sh.add_argument("path", type=Path, metavar="IMAGE")
    sh.add_argument("--json", action="store_true", help="as JSON")

    pr = command(
        "prune",
        "remove index rows of images that no longer exist",
        "Remove the index rows and jobs of images that no longer exist (folders "
        "moved, deleted, unmounted). Sidecars are not touched.",
        "watcher prune --dry-run",
        "watcher prune",
    )
    pr.add_argument("--dry-run", action="store_true", help="list them; remove nothing")

    ini = command(
        "init",
        "write a commented config file with the defaults",
        "Write a config file (at --config, else the default place) with every key "
        "at its default and commented, watching the folders given.",
        "watcher init ~/Pictures/inbox",
        "watcher --config ./watcher.yaml init .",
    )
    ini.add_argument("folders", nargs="*", type=Path, metavar="FOLDER")
    ini.add_argument("--force", action="store_true", help="replace an existing config file")

    command(
        "reload",
        "tell the running daemon to re-read its config (SIGHUP)",
        "Send SIGHUP to the daemon using this database: it re-reads its config.",
        "watcher reload",
    )

    m = command(
        "model",
        "download or inspect the model",
        "Download the configured model into the Hugging Face cache, or show what is cached.",
        "watcher model fetch",
        "watcher model info",
    )
    msub = m.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    f = msub.add_parser(
        "fetch",
        help="download the model and its tokenizer into the HF cache",
        description="Download the model and its tokenizer into the Hugging "
        "Face cache, then test-load it. Needs the network once.",
        epilog=_examples("watcher model fetch", "watcher model fetch --revision 2025-06-21"),
        formatter_class=_Formatter,
    )
    f.add_argument("--revision", help="a tag or commit of the model (default from the config)")
    msub.add_parser(
        "info",
        help="what is cached, which revision, size on disk",
        description="What is cached, at which revisions, and how big.",
        epilog=_examples("watcher model info"),
        formatter_class=_Formatter,
    )

    sv = command(
        "service",
        "install the systemd / launchd service",
        "Install, remove or inspect the user service (systemd on Linux, launchd on "
        "macOS) that runs `watcher run`.",
        "watcher service install --now",
        "watcher service status",
    )
    svsub = sv.add_subparsers(dest="service_command", required=True, metavar="ACTION")
    i = svsub.add_parser(
        "install",
        help="write the unit/agent (and start it with --now)",
        description="Write the systemd user unit or launchd agent.",
        epilog=_examples("watcher service install --now"),
        formatter_class=_Formatter,
    )
    i.add_argument("--now", action="store_true", help="also enable and start it")
    svsub.add_parser(
        "uninstall",
        help="stop and remove it",
        description="Stop and remove the service.",
        epilog=_examples("watcher service uninstall"),
        formatter_class=_Formatter,
    )
    svsub.add_parser(
        "status",
        help="whether it is installed and running",
        description="Whether the service is installed and running.",
        epilog=_examples("watcher service status"),
        formatter_class=_Formatter,
    )

    for group in (msub, svsub):  # `watcher model info --config X` works too
        for action_parser in group.choices.values():
            _global_options(action_parser, top=False)

    comp = command(
        "completion",
        "print the shell completion script",
        "Print a completion script for bash or zsh (needs the optional argcomplete "
        "package: pip install 'moondream-watcher[completion]').",
        "watcher completion bash > ~/.local/share/bash-completion/completions/watcher",
        'eval "$(watcher completion zsh)"   # in ~/.zshrc',
    )
    comp.add_argument(
        "shell", choices=("bash", "zsh"), nargs="?", default="bash", help="the shell (default bash)"
    )
    return p


def _caption_options(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "--task",
        choices=("prompt", "short", "normal", "long", "query"),
        help="what the sidecars hold (default from the config: short)",
    )
    c.add_argument("--question", help="the question for --task query")
    c.add_argument(
        "--overwrite",
        choices=("never", "ours", "always"),
        help="replace existing sidecars: never, ours (only ours, unchanged since; "
        "the default) or always",
    )
    c.add_argument("--dry-run", action="store_true", help="say what would happen; change nothing")


# -- main --------------------------------------------------------------------------------


def main(
    argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    real = out is None
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        return _main(argv, out, err)
    except BrokenPipeError:
        # The reader went away (`| head -1`): stop quietly. Point stdout at /dev/null so
        # the interpreter's final flush does not complain again.
        if real:
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):
                pass
        return EXIT_PIPE


def _main(argv: list[str] | None, out: TextIO, err: TextIO) -> int:
    parser = build_parser()
    try:  # tab completion when the optional argcomplete is installed and asked for
        import argcomplete

        argcomplete.autocomplete(parser)
    except ImportError:
        pass
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: usage errors exit 2, --help exits 0
        return int(e.code or 0)
    if args.command == "completion":
        return cmd_completion(args, out, err)
    if args.command == "init":
        return cmd_init(args, out, err)
    try:
        cfg = load_config(args.config)
        if args.db:
            import dataclasses

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


# -- progress ------------------------------------------------------------------------------


class Progress:
    """On a terminal: a tqdm bar (count, rate, ETA) with log lines written above it. Else
    one plain line per image."""

    def __init__(self, total: int, out: TextIO, err: TextIO, cfg: Config) -> None:
        self.total = total
        self.done = 0
        self.out = out
        self.lock = threading.Lock()
        self.broken = False
        self.bar: Any = None
        if _isatty(out):
            from tqdm import tqdm

            from watcher.log import configure_logging

            # rate_noinv: always "N images/s", never tqdm's inverse "s/ images".
            self.bar = tqdm(
                total=total,
                file=out,
                unit=" images",
                dynamic_ncols=True,
                desc="captioning",
                leave=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                "[{elapsed}<{remaining}, {rate_noinv_fmt}]",
            )
            # Log lines go through tqdm.write: they appear above the bar, never inside it.
            configure_logging(cfg.log, stream=_AboveBar(err))
            self._err, self._cfg = err, cfg

    def __call__(self, outcome) -> None:
        if outcome.state in ("retry", "requeued"):
            return
        with self.lock:
            self.done += 1
            if self.bar is not None:
                self.bar.update(1)
                return
            state, detail = outcome.state, outcome.reason
            if state == "done":
                state = {"kept": "kept", "pending": "sidecar pending"}.get(
                    outcome.sidecar_state or "", "done"
                )
                if state == "kept":
                    detail = f"existing sidecar left alone: {shown(outcome.sidecar or '')}"
                elif state == "done":
                    detail = shown(outcome.sidecar or "")
            if self.broken:
                return
            try:
                self.out.write(
                    f"[{self.done}/{self.total}] {state}: {shown(outcome.path)} ({detail})\n"
                )
                self.out.flush()
            except BrokenPipeError:
                # `watcher caption DIR | head`: the reader left. The work goes on (this runs
                # in the writer's thread); the summary's print ends the command quietly.
                self.broken = True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            from watcher.log import configure_logging

            configure_logging(self._cfg.log, stream=self._err)


class _AboveBar:
    """A text stream for the log that hands whole lines to tqdm.write."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._buf = ""

    def isatty(self) -> bool:
        return _isatty(self.stream)

    def write(self, text: str) -> int:
        from tqdm import tqdm

        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            tqdm.write(line, file=self.stream)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


# -- caption / recaption ---------------------------------------------------------------------


def _dirs(paths: list[Path], err: TextIO) -> list[Path] | None:
    dirs = []
    for d in paths:
        p = Path(os.path.abspath(d.expanduser()))
        if not p.is_dir():
            print(f"watcher: {shown(str(d))}: not a folder", file=err)
            return None
        dirs.append(p)
    return dirs


def _overrides(args, cfg: Config) -> dict[str, Any]:
    o = {
        "task": getattr(args, "task", None),
        "question": getattr(args, "question", None),
        "overwrite": getattr(args, "overwrite", None),
    }
    if o["task"] == "query" and not (o["question"] or cfg.defaults.get("question")):
        raise ConfigError("--task query needs --question")
    return {k: v for k, v in o.items() if v is not None}


def cmd_caption(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    dirs = _dirs(args.folders, err)
    if dirs is None:
        return EXIT_USAGE
    return _caption(args, cfg, dirs, out, err, force=args.force)


def cmd_recaption(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.index import Index, connect

    wanted: set[str] = set()
    dirs: list[Path] = []
    for p in args.paths:
        path = Path(os.path.abspath(p.expanduser()))
        if not path.is_file():
            print(f"watcher: {shown(str(p))}: not an image file", file=err)
            return EXIT_USAGE
        wanted.add(str(path))
        dirs.append(path.parent)
    folders = _dirs(args.folder, err)
    if folders is None:
        return EXIT_USAGE
    dirs += folders
    if args.query:
        if not cfg.database.exists():
            print(f"watcher: no index yet at {cfg.database}", file=err)
            return EXIT_FAILED
        db = connect(cfg.database)
        hits = Index(db).search(args.query, limit=1_000_000)
        db.conn.close()
        for row, _ in hits:
            if os.path.isfile(row.path):
                wanted.add(row.path)
                dirs.append(Path(row.path).parent)
        if not hits:
            print("no matches", file=err)
            return EXIT_FAILED
    if not dirs:
        print("watcher: recaption needs images, --folder DIR or --query TEXT", file=err)
        return EXIT_USAGE
    # Only the deepest distinct folders, so nothing is scanned twice.
    unique = sorted(set(dirs))
    dirs = [d for d in unique if not any(o != d and o in d.parents for o in unique)]

    def only(path: str) -> bool:
        return path in wanted or any(path.startswith(str(f) + "/") for f in folders)

    return _caption(args, cfg, dirs, out, err, force=True, only=only)


def _caption(
    args, cfg: Config, dirs: list[Path], out: TextIO, err: TextIO, *, force: bool, only=None
) -> int:
    from watcher.captioning import apply_plan, plan_caption, with_overrides
    from watcher.index import connect
    from watcher.jobs import JobQueue
    from watcher.service.lock import AlreadyRunning, DatabaseLock
    from watcher.service.status import daemon_pid

    overrides = _overrides(args, cfg)
    cfg = with_overrides(cfg, dirs, **overrides)
    lock = DatabaseLock(cfg.database)
    daemon: int | None = None
    if not args.dry_run:
        try:
            lock.acquire("caption")
        except AlreadyRunning as e:
            daemon = daemon_pid(cfg.database)
            if daemon is None:
                print(f"watcher: {e}", file=err)
                return EXIT_USAGE
            if overrides:
                print(
                    f"watcher: watcher run (pid {daemon}) is using {cfg.database} and "
                    f"captions with its own settings; stop it to caption with "
                    f"{', '.join('--' + k for k in overrides)}",
                    file=err,
                )
                return EXIT_USAGE
    try:
        db = connect(cfg.database)
        jobs = JobQueue(db)
        if daemon is None and not args.dry_run:
            jobs.recover()
        plan = plan_caption(db, cfg, dirs, force=force, only=only)
        if args.dry_run:
            return _print_plan(plan, out)
        queued, restored = apply_plan(db, cfg, plan, force=force)
        from watcher.captioning import open_jobs

        if daemon is not None and plan.queued:
            return _caption_by_daemon(cfg, plan, daemon, db, jobs, out, err)
        pending = 0 if daemon is not None else open_jobs(jobs, plan.roots)
        if pending == 0:
            line = f"0 new, {plan.up_to_date} up to date" + _restored_clause(restored)
            print(line + _skipped_count(plan.skipped), file=out)
            _print_restored(restored, out)
            _print_skipped(plan.skipped, out)
            _print_passed_over(plan.passed_over, dirs, out)
            return EXIT_FAILED if restored.pending else EXIT_OK
        return _run_here(cfg, plan, restored, pending, jobs, out, err)
    finally:
        lock.release()


def _run_here(cfg: Config, plan, restored, pending: int, jobs, out: TextIO, err: TextIO) -> int:
    from watcher.backends import ModelUnavailable, open_backend
    from watcher.backends.registry import get_backend
    from watcher.captioning import LazyBackend, run_pipeline

    if get_backend(cfg.model.backend).checks_weights:
        # A quick check of the disk now, so a missing model fails before any work; the
        # model itself loads only for the first batch that needs it.
        from watcher.backends.weights import ensure_available

        try:
            ensure_available(cfg.model)
        except ModelUnavailable as e:
            print(f"watcher: {e}", file=err)
            return EXIT_USAGE
    load_error: list[BaseException] = []

    def opener():
        try:
            return open_backend(cfg.model, cfg.log)
        except ModelUnavailable as e:
            load_error.append(e)
            raise

    backend = LazyBackend(cfg.model, opener)
    progress = Progress(pending, out, err, cfg)
    try:
        summary = run_pipeline(cfg, plan.roots, backend, jobs, progress)
    finally:
        progress.close()
    if load_error:
        print(f"watcher: {load_error[0]}", file=err)
        return EXIT_USAGE
    return _print_summary(plan, restored, summary, out)


def _caption_by_daemon(cfg: Config, plan, pid: int, db, jobs, out: TextIO, err: TextIO) -> int:
    from watcher.captioning import Restored, follow_daemon
    from watcher.service.status import daemon_pid

    paths = [str(p) for p, _ in plan.queued]
    print(
        f"watcher run (pid {pid}) is using {cfg.database}: handing it "
        f"{plural(len(paths), 'image')} and following its progress",
        file=err,
    )
    progress = Progress(len(paths), out, err, cfg)
    try:
        summary = follow_daemon(
            db, plan.roots, paths, progress, alive=lambda: daemon_pid(cfg.database) == pid
        )
    finally:
        progress.close()
    if summary is None:
        print(
            "watcher: the daemon stopped before finishing; the images stay queued for its "
            "next start",
            file=err,
        )
        return EXIT_FAILED
    return _print_summary(plan, Restored(), summary, out)


def _restored_clause(restored) -> str:
    if not restored.written:
        return ""
    return f", {plural(len(restored.written), 'missing sidecar')} written again from the index"


def _print_restored(restored, out: TextIO) -> None:
    for path, reason in restored.pending:
        print(f"sidecar pending: {shown(path)}: {reason}", file=out)


def _print_summary(plan, restored, summary, out: TextIO) -> int:
    outdated = set(plan.outdated)
    again = sum(1 for o in summary.done if o.path in outdated)
    line = f"{len(summary.done) - again} new"
    if again:
        line += f", {again} captioned again (other settings or --force)"
    line += f", {plan.up_to_date} up to date"
    if summary.reused:
        copies = plural(summary.reused, "copy of an identical image", "copies of identical images")
        line += f" ({copies}, no model work)"
    if summary.kept:
        line += f", {plural(len(summary.kept), 'existing sidecar')} left alone"
    line += _restored_clause(restored)
    line += f", {len(summary.failed)} failed" + _skipped_count(plan.skipped + list(summary.skipped))
    print(line, file=out)
    for o in summary.pending:
        print(f"sidecar pending: {shown(o.path)}: {o.reason or 'not writable'}", file=out)
    _print_kept(summary.kept, out)
    _print_restored(restored, out)
    for f in summary.failed:
        print(f"failed: {shown(f.path)}: {f.error}", file=out)
    # Images whose folder became a link while the model ran: skipped, like the scan's.
    _print_skipped(plan.skipped + list(summary.skipped), out)
    _print_passed_over(plan.passed_over, list(plan.roots), out)
    return EXIT_FAILED if summary.failed or restored.pending else EXIT_OK


def _print_plan(plan, out: TextIO) -> int:
    """--dry-run: what a caption run would do."""
    outdated = set(plan.outdated)
    print(
        f"would caption {plural(len(plan.queued), 'image')} ({plan.new} new, "
        f"{plan.changed} changed, {len(outdated)} with other settings, "
        f"{plan.retried} failed before), write {plural(len(plan.restore), 'missing sidecar')}"
        f" from the index, forget {plural(len(plan.removed), 'deleted image')}; "
        f"{plan.up_to_date} up to date" + _skipped_count(plan.skipped),
        file=out,
    )
    for p, _ in plan.queued:
        print(f"would caption: {shown(str(p))}", file=out)
    for p in plan.restore:
        print(f"would write the missing sidecar of: {shown(p)}", file=out)
    for p in plan.removed:
        print(f"would forget (deleted): {shown(p)}", file=out)
    _print_skipped(plan.skipped, out)
    _print_passed_over(plan.passed_over, list(plan.roots), out)
    return EXIT_OK


def _skipped_count(skipped: list[tuple[Path, str]]) -> str:
    return f", {len(skipped)} skipped" if skipped else ""


def _print_skipped(skipped: list[tuple[Path, str]], out: TextIO) -> None:
    # Not failures (the exit code ignores them): names we will not open, and why.
    for path, reason in sorted(skipped):
        print(f"skipped: {shown(str(path))}: {reason}", file=out)


def _print_passed_over(passed, dirs: list[Path], out: TextIO) -> None:
    # Files not captioned because of their name (no extension, not an image extension,
    # AVIF this Pillow cannot read): a count and a few names per reason.
    from watcher.service.status import passed_over_lines

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
    if kept:
        print("(`--overwrite always` replaces kept sidecars)", file=out)


# -- search / status / retry / show / prune --------------------------------------------------


def cmd_search(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.index import Index, connect

    try:
        args.query.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 in argv (surrogate-escaped)
        print("watcher: the search text is not valid UTF-8; captions are UTF-8 text", file=err)
        return EXIT_USAGE
    # No database yet: NoDatabase, "no index yet" and exit 1 (_with_database_errors).
    hits = Index(connect(cfg.database, readonly=True)).search(args.query, limit=args.limit)
    if args.json:
        # bm25 is lower-is-better (negative); users read a score as higher-is-better.
        json.dump(
            [
                {"path": r.path, "caption": r.caption, "sidecar": r.sidecar, "score": round(-s, 6)}
                for r, s in hits
            ],
            out,
            indent=2,
        )
        out.write("\n")
    else:
        for row, _ in hits:
            print(shown(row.path), file=out)
            print(f"    {row.caption}", file=out)
        if not hits:
            print("no matches", file=err)
    return EXIT_OK if hits else EXIT_FAILED


def cmd_status(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.service.status import collect, render

    report = collect(cfg.database)
    if args.json:
        json.dump(report, out, indent=2)
        out.write("\n")
    else:
        out.write(render(report))
    return EXIT_OK


def cmd_retry(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.captioning import missing_sidecars, restore_sidecars
    from watcher.index import connect
    from watcher.jobs import JobQueue
    from watcher.outputs.pending import write_pending_sidecars
    from watcher.paths import decode

    if not args.all and not args.paths:
        print("watcher: retry needs --all or one or more paths", file=err)
        return EXIT_USAGE
    db = connect(cfg.database)
    jobs = JobQueue(db)
    paths = None if args.all else [os.path.abspath(p) for p in args.paths]
    failed, gone = jobs.failed_existing(paths)
    pending = [
        p
        for p in (
            decode(r)
            for (r,) in db.conn.execute("SELECT path FROM images WHERE sidecar_state = 'pending'")
        )
        if paths is None or p in paths
    ]
    missing = missing_sidecars(db, paths)
    if args.dry_run:
        print(
            f"would queue {plural(len(failed), 'failed image')} again, try "
            f"{plural(len(pending), 'pending sidecar')}, write "
            f"{plural(len(missing), 'missing sidecar')} from the index, forget "
            f"{plural(len(gone), 'failure')} of deleted images",
            file=out,
        )
        for p in failed:
            print(f"would retry: {shown(p)}", file=out)
        for p in pending:
            print(f"would write the pending sidecar of: {shown(p)}", file=out)
        for p in missing:
            print(f"would write the missing sidecar of: {shown(p)}", file=out)
        for p in gone:
            print(f"would forget (deleted): {shown(p)}", file=out)
        return EXIT_OK
    jobs.forget_failed(gone)
    n = jobs.retry(failed)
    written, still = write_pending_sidecars(db, cfg, paths)
    restored = restore_sidecars(db, cfg, missing)
    line = f"{plural(n, 'failed image')} queued again; {plural(written, 'pending sidecar')} written"
    if restored.written:
        line += f"; {plural(len(restored.written), 'missing sidecar')} written again"
    if gone:
        line += f"; {plural(len(gone), 'failure')} of deleted images forgotten"
    print(line, file=out)
    for path, reason in [*still, *restored.pending]:
        print(f"sidecar still pending: {shown(path)}: {reason}", file=out)
    return EXIT_OK if not (still or restored.pending) else EXIT_FAILED


def cmd_show(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.captioning import show
    from watcher.index import connect

    path = os.path.abspath(args.path.expanduser())
    # Read-only, like status and search: show changes nothing and works in a read-only folder.
    info = show(connect(cfg.database, readonly=True), path) if cfg.database.exists() else None
    if info is None:
        print(f"watcher: {shown(path)} is not in the index ({cfg.database})", file=err)
        return EXIT_FAILED
    if args.json:
        json.dump(info, out, indent=2, ensure_ascii=False)
        out.write("\n")
        return EXIT_OK
    out.write(render_show(info))
    return EXIT_OK


def render_show(info: dict[str, Any]) -> str:
    import datetime

    lines = [shown(info["path"]) + ("" if info["exists"] else "  (file no longer exists)")]
    job = info.get("job")
    if "caption" not in info:
        state = job["state"] if job else "unknown"
        lines.append(f"  state: {state}" + (f": {job['reason']}" if job and job["reason"] else ""))
        return "\n".join(lines) + "\n"
    state = {
        "written": "captioned",
        "kept": "captioned; the sidecar is not ours, left alone",
        "pending": "captioned; sidecar pending",
    }.get(info["sidecar_state"], info["sidecar_state"])
    if job and job["state"] in ("pending", "running", "failed"):
        state += f"; job {job['state']}" + (f": {job['reason']}" if job["reason"] else "")
    lines.append(f"  state: {state}")
    if info["sidecar_error"]:
        lines.append(f"  sidecar error: {info['sidecar_error']}")
    side = info["sidecar_text"]
    lines.append(
        f"  sidecar: {shown(info['sidecar'] or '')}"
        + ("" if side is not None else "  (missing, or not a regular file)")
    )
    if side is not None:
        lines.append(f"  sidecar text: {shown(side.rstrip(chr(10)))}")
    lines.append(f"  caption (index): {shown(info['caption'])}")
    # The sidecar kept (the user's text): the model's caption is in the index beside it.
    lines.append(f"  model's caption: {shown(info['model_caption'])}")
    lines.append(
        f"  model: {info['model']}"
        + (f" at revision {info['revision']}" if info["revision"] else "")
        + f", task {info['task']}"
    )
    for key, text in sorted(info["outputs"].items()):
        if key != info["task"]:
            lines.append(f"  output {key}: {shown(text)}")
    when = datetime.datetime.fromtimestamp(info["updated"], datetime.timezone.utc)
    lines.append(f"  captioned: {when.strftime('%Y-%m-%d %H:%M:%S')} UTC")
    lines.append(f"  size: {info['width']}x{info['height']}, sha256 {info['sha256'][:16]}")
    return "\n".join(lines) + "\n"


def cmd_prune(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.captioning import prune
    from watcher.index import connect

    if not cfg.database.exists():
        print(f"watcher: no index yet at {cfg.database}", file=err)
        return EXIT_FAILED
    found = prune(connect(cfg.database), dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"{verb} {plural(len(found.images), 'index row')} and {plural(len(found.jobs), 'job')}"
        " of images that no longer exist",
        file=out,
    )
    for p in sorted(set(found.images) | set(found.jobs)):
        print(f"  {shown(p)}", file=out)
    return EXIT_OK


def cmd_init(args, out: TextIO, err: TextIO) -> int:
    from watcher.config_template import render_config

    path = (args.config or default_config_path()).expanduser().absolute()
    if path.exists() and not args.force:
        print(f"watcher: {path} exists; not replaced (--force replaces it)", file=err)
        return EXIT_USAGE
    folders = [Path(os.path.abspath(d.expanduser())) for d in args.folders]
    for d in folders:
        if not d.is_dir():
            print(
                f"watcher: {shown(str(d))}: not a folder (it is watched anyway once it exists)",
                file=err,
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    db = args.db.expanduser().absolute() if args.db else None
    path.write_text(render_config(folders, db), encoding="utf-8")
    print(f"wrote {path}: {plural(len(folders), 'folder')}; edit it, then `watcher run`", file=out)
    return EXIT_OK


def cmd_completion(args, out: TextIO, err: TextIO) -> int:
    try:
        import argcomplete
    except ImportError:
        print(
            "watcher: shell completion needs the argcomplete package: "
            "pip install 'moondream-watcher[completion]'",
            file=err,
        )
        return EXIT_USAGE
    # (use_defaults, shell) given by position: `shell=` reads like a subprocess flag.
    out.write(argcomplete.shellcode(["watcher"], True, args.shell))
    return EXIT_OK


# -- reload / run / model / service -----------------------------------------------------------


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
    from watcher.service.status import daemon_pid

    pid = daemon_pid(cfg.database)
    if pid is not None and sig is not None:
        os.kill(pid, sig)
    return pid


def cmd_run(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.service.daemon import run_daemon, with_command_line

    # Folders given here are watched besides the config's, and stay watched across reloads.
    dirs = [Path(os.path.abspath(d.expanduser())) for d in args.folders]
    if not with_command_line(cfg, dirs).folders:
        print(
            "watcher: no folders to watch: give them on the command line or under "
            f"`folders:` in {cfg.source or default_config_path()}",
            file=err,
        )
        return EXIT_USAGE
    # The database first (as the daemon's lock does): a database path that cannot be used
    # is the error to fix before the model matters. Changes nothing.
    from watcher.index import verify

    verify(cfg.database)
    from watcher.backends.registry import get_backend

    if get_backend(cfg.model.backend).checks_weights:
        # Checked here, said once: the daemon never downloads (it runs offline), so a
        # missing model is the user's to fetch, whatever HF_HUB_OFFLINE says.
        from watcher.backends import ModelUnavailable
        from watcher.backends.weights import ensure_available

        try:
            ensure_available(cfg.model, daemon=True)
        except ModelUnavailable as e:
            print(f"watcher: {e}", file=err)
            return EXIT_USAGE
    return run_daemon(cfg, args.config, err, dirs)


def cmd_model(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    if args.model_command == "fetch":
        return model_fetch(cfg.model, args.revision, out, err=err)
    return model_info(cfg.model, out)


def model_fetch(
    model: ModelConfig,
    revision: str | None,
    out: TextIO,
    *,
    verify: bool = True,
    err: TextIO | None = None,
) -> int:
    """`watcher model fetch`: the download's steps as they happen, then how it ended.

    0: everything is in place; 1: a download or test-load failed; 2: the request is
    refused (an unpinned revision for remote code) or the Hub cannot be reached."""
    from watcher.backends.weights import FetchStep, fetch, hub_cache_dir, human_size

    err = err or out

    def step(s: FetchStep) -> None:
        if s.kind == "local copy":
            line = (
                f"model.path is set: {s.folder} is used as it is; "
                "nothing to download for the model."
            )
        elif s.kind == "downloading" and s.tokenizer:
            line = f"fetching tokenizer {s.repo_id} ..."
        elif s.kind == "downloading":
            line = f"fetching {s.repo_id} at revision {s.revision or 'main'} ..."
        elif s.kind == "downloaded":
            line = f"  {s.folder} ({human_size(s.size)})"
        elif s.kind == "cached":
            line = f"cache: {s.folder}"
        else:
            line = "test-loading the model ..."
        print(line, file=out)

    report = fetch(model, revision, verify=verify, on_step=step)
    if report.outcome == "refused":
        print(f"watcher: {report.message}", file=err)
        return EXIT_USAGE
    if report.outcome == "no network":
        print(
            f"watcher: cannot download from the Hugging Face Hub: {report.message}. Connect this "
            "machine to the network and run `watcher model fetch` again, or fetch on a "
            f"connected machine and copy its cache ({hub_cache_dir()}) here, or set "
            "model.path to a local copy.",
            file=err,
        )
        return EXIT_USAGE
    if report.outcome == "download failed":
        print(f"watcher: download failed: {report.message}", file=err)
        return EXIT_FAILED
    if report.outcome == "does not load":
        print(f"watcher: downloaded, but it does not load: {report.message}", file=err)
        return EXIT_FAILED
    if report.not_test_loaded:
        print(f"not test-loaded: {report.not_test_loaded}.", file=out)
    elif report.outcome == "loads":
        print("ok: the model loads from the cache; it works offline now.", file=out)
    return EXIT_OK


def model_info(model: ModelConfig, out: TextIO) -> int:
    """`watcher model info`: the configured model's state and what the HF cache holds."""
    from watcher.backends.weights import FIX, cache_info, human_size

    info = cache_info(model)
    print(f"Hugging Face cache: {info.cache}", file=out)
    if info.local_path is not None:
        state = human_size(info.local_size) if info.local_size is not None else "missing"
        print(f"model.path: {info.local_path} ({state})", file=out)
    else:
        status = "cached" if info.cached else "not cached"
        print(
            f"configured: {model.backend} {model.id} at revision {model.revision or 'main'}: "
            f"{status}",
            file=out,
        )
    if info.missing:
        print(f"not ready offline: missing {' and '.join(info.missing)}; to fix: {FIX}", file=out)
    elif info.missing is not None:
        print("ready to run offline", file=out)
    if info.cache_error is not None:
        print(f"cannot read the cache: {info.cache_error}", file=out)
        return EXIT_FAILED
    if not info.models:
        print("nothing cached yet", file=out)
        return EXIT_OK
    print("cached models:", file=out)
    for repo in info.models:
        print(f"  {repo.repo_id}: {human_size(repo.size)}", file=out)
        for rev in repo.revisions:
            refs = ", ".join(rev.refs) or "no tag"
            print(f"    {refs} (commit {rev.commit[:12]}): {human_size(rev.size)}", file=out)
    for warning in info.warnings:
        print(f"warning: {warning}", file=out)
    return EXIT_OK


def cmd_service(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.service import install as service

    config_path = (args.config or default_config_path()).expanduser().absolute()
    if args.service_command == "install":
        return service.install(cfg, config_path, now=args.now, out=out)
    if args.service_command == "uninstall":
        return service.uninstall(out=out)
    return service.status(out=out)
