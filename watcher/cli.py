"""The `watcher` command: a thin layer over the library; every subcommand wires stages."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from watcher import __version__
from watcher.config import (
    Config,
    ConfigError,
    ModelConfig,
    SearchConfig,
    default_config_path,
    load_config,
)
from watcher.paths import shown

if TYPE_CHECKING:
    from watcher.captioning import CaptionReport
    from watcher.messages import Outcome

# A subcommand: its parsed arguments and the config in, the exit code out.
Handler = Callable[[argparse.Namespace, Config, TextIO, TextIO], int]

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
        "watcher caption /mnt/archive --ray=auto   (on a Ray cluster's head node)",
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
    c.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the model work on a Ray cluster (pip install 'moondream-watcher[ray]'): "
        "one model per GPU, the index written here. ADDRESS: auto, HOST:PORT or "
        "ray://HOST:PORT; none: $RAY_ADDRESS or a new local cluster. Put it after the "
        "folders or write --ray=ADDRESS. The folders must be at the same paths on every node",
    )
    c.add_argument(
        "--actors",
        type=int,
        default=None,
        metavar="N",
        help="with --ray: how many models (default: one per GPU; half the CPUs without GPUs)",
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
        "that arrives or changes, and serve the web page and API on web.listen "
        "(http://127.0.0.1:2020/ by default; web.enabled: false turns it off). Stops on "
        "SIGTERM/Ctrl-C; SIGHUP re-reads the config.",
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

    sv = command(
        "serve",
        "the web page and API on the index, without watching folders",
        "Serve the web page (library, image, try, status pages) and the Moondream-compatible "
        "API on the index, with the configured model for the try page and the API, without "
        "watching any folder (`watcher run` serves them too, while it watches). Stops on "
        "SIGTERM/Ctrl-C.",
        "watcher serve",
        "watcher serve --listen 127.0.0.1:8080",
        "watcher serve --no-model",
    )
    sv.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="where to listen (default: web.listen in the config, 127.0.0.1:2020)",
    )
    sv.add_argument(
        "--no-model",
        action="store_true",
        help="load no model: browse and edit the library; the API answers 503",
    )

    s = command(
        "search",
        "search the captions by words and by meaning, best first",
        "Hybrid by default: full-text matches (all words, stemmed) and the captions "
        "nearest in meaning (an embedding model, offline) fused by rank. --mode text or "
        "semantic for one of them; --like IMAGE for the images captioned most like it. "
        "Without the embedding model it searches the text only and says so on stderr. "
        "Exit 1 when nothing matches. --json scores grow with relevance.",
        'watcher search "red bicycle"',
        'watcher search "dog playing in snow" --mode semantic --limit 5',
        "watcher search --like ~/Pictures/beach.jpg --json",
        "watcher search sky --folder ~/Pictures/2024 --task short",
    )
    s.add_argument("query", metavar="TEXT", nargs="?", help="what to find")
    s.add_argument("--limit", type=int, default=20, help="at most this many hits (default 20)")
    s.add_argument(
        "--json",
        action="store_true",
        help="JSON: path, caption, sidecar, score and its parts (ranks, similarity)",
    )
    s.add_argument(
        "--mode",
        choices=("hybrid", "text", "semantic"),
        help="hybrid (words + meaning), text (words) or semantic (meaning); default "
        "search.mode (hybrid)",
    )
    s.add_argument(
        "--like",
        type=Path,
        metavar="IMAGE",
        help="images whose captions are nearest to this image's (instead of TEXT)",
    )
    s.add_argument("--folder", type=Path, metavar="DIR", help="only images under this folder")
    s.add_argument("--task", metavar="TASK", help="only images whose sidecar is this task's")

    ex = command(
        "export",
        "write the index as CSV, JSON Lines, a HF dataset or kohya configs",
        "Write what the index holds (all images, those under --folder, or those matching "
        "--query) as csv (UTF-8 with a byte-order mark so spreadsheet programs read it as "
        "UTF-8, quoted as needed), jsonl, hf (metadata.jsonl at the dataset root: "
        "file_name and text, for datasets' imagefolder) or kohya (dataset.toml, "
        "dataset-finetune.toml and metadata.json). Rows are streamed: any size exports "
        "in constant memory.",
        "watcher export --format csv -o captions.csv",
        "watcher export --format jsonl --query bicycle > hits.jsonl",
        "watcher export --format hf --folder ~/datasets/lora",
        "watcher export --format kohya --folder ~/datasets/lora --out ~/train",
    )
    ex.add_argument("--format", required=True, choices=("csv", "jsonl", "hf", "kohya"))
    ex.add_argument("--folder", type=Path, metavar="DIR", help="only images under DIR")
    ex.add_argument("--query", metavar="TEXT", help="only images whose captions match TEXT")
    ex.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="FILE",
        help="csv/jsonl: file to write (default: stdout)",
    )
    ex.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="hf: the dataset root (default --folder); kohya: where its files go",
    )

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
        "Face cache, then test-load it; then the search embedding model "
        "(search.embedding_model, for semantic search). Needs the network once.",
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
    if args.command in WITHOUT_CONFIG:
        return WITHOUT_CONFIG[args.command](args, out, err)
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
    handler = COMMANDS[args.command]
    try:
        return _with_database_errors(handler, args, cfg, out, err)
    except ConfigError as e:
        print(f"watcher: config error: {e}", file=err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("watcher: interrupted", file=err)
        return 130


def _with_database_errors(
    handler: Handler, args: argparse.Namespace, cfg: Config, out: TextIO, err: TextIO
) -> int:
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
    """The progress of a caption run (the library's on_start and on_progress). On a
    terminal: a tqdm bar (count, rate, ETA) with log lines written above it. Else one plain
    line per image."""

    def __init__(self, out: TextIO, err: TextIO, cfg: Config) -> None:
        self.out = out
        self.err = err
        self.cfg = cfg
        self.broken = False
        self.bar: Any = None

    def start(self, total: int, daemon: int | None) -> None:
        if daemon is not None:
            print(
                f"watcher run (pid {daemon}) is using {self.cfg.database}: handing it "
                f"{plural(total, 'image')} and following its progress",
                file=self.err,
            )
        if _isatty(self.out):
            from tqdm import tqdm

            from watcher.log import configure_logging

            # rate_noinv: always "N images/s", never tqdm's inverse "s/ images".
            self.bar = tqdm(
                total=total,
                file=self.out,
                unit=" images",
                dynamic_ncols=True,
                desc="captioning",
                leave=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                "[{elapsed}<{remaining}, {rate_noinv_fmt}]",
            )
            # Log lines go through tqdm.write: they appear above the bar, never inside it.
            configure_logging(self.cfg.log, stream=cast("TextIO", _AboveBar(self.err)))

    def __call__(self, outcome: Outcome, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
            return
        state: str = outcome.state
        detail = outcome.reason
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
            self.out.write(f"[{done}/{total}] {state}: {shown(outcome.path)} ({detail})\n")
            self.out.flush()
        except BrokenPipeError:
            # `watcher caption DIR | head`: the reader left. The work goes on (this runs
            # in the writer's thread); the summary's print ends the command quietly.
            self.broken = True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            from watcher.log import configure_logging

            configure_logging(self.cfg.log, stream=self.err)


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


def _run_caption(run: Callable[..., CaptionReport], out: TextIO, err: TextIO, cfg: Config) -> int:
    """Run a caption call of the library with the terminal's progress, then print its
    report; a run that cannot start is one line on stderr and exit 2."""
    from watcher.backends import ModelUnavailable
    from watcher.captioning import CaptionError, NoMatches

    progress = Progress(out, err, cfg)
    try:
        try:
            report = run(on_start=progress.start, on_progress=progress)
        finally:
            progress.close()  # the bar ends before any message below it
    except (CaptionError, ModelUnavailable) as e:
        print(f"watcher: {e}", file=err)
        return EXIT_USAGE
    except NoMatches:
        print("no matches", file=err)
        return EXIT_FAILED
    return print_caption_report(report, out, err)


def cmd_caption(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.captioning import caption_folders

    if args.ray is not None and not args.dry_run:
        from watcher.cluster import caption_on_ray

        return _run_caption(
            functools.partial(
                caption_on_ray,
                cfg,
                args.folders,
                address=args.ray or None,
                actors=args.actors,
                force=args.force,
                **_overrides(args),
            ),
            out,
            err,
            cfg,
        )
    return _run_caption(
        functools.partial(
            caption_folders,
            cfg,
            args.folders,
            force=args.force,
            dry_run=args.dry_run,
            **_overrides(args),
        ),
        out,
        err,
        cfg,
    )


def cmd_recaption(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.captioning import recaption

    return _run_caption(
        functools.partial(
            recaption,
            cfg,
            args.paths,
            folders=args.folder,
            query=args.query,
            dry_run=args.dry_run,
            **_overrides(args),
        ),
        out,
        err,
        cfg,
    )


def _overrides(args) -> dict[str, Any]:
    return {"task": args.task, "question": args.question, "overwrite": args.overwrite}


def print_caption_report(report: CaptionReport, out: TextIO, err: TextIO) -> int:
    """What `watcher caption` prints for a report; returns the exit code."""
    if report.dry_run:
        return _print_plan(report, out)
    if report.unfinished:
        print(
            "watcher: the daemon stopped before finishing; the images stay queued for its "
            "next start",
            file=err,
        )
        return EXIT_FAILED
    if not report.ran:
        line = f"0 new, {report.up_to_date} up to date" + _restored_clause(report)
        print(line + _skipped_count(report.skipped), file=out)
        _print_restored(report, out)
        _print_skipped(report.skipped, out)
        _print_passed_over(report.passed_over, list(report.folders), out)
        return report.exit_code
    again = len(report.captioned_again)
    line = f"{len(report.captioned) - again} new"
    if again:
        line += f", {again} captioned again (other settings or --force)"
    line += f", {report.up_to_date} up to date"
    if report.reused:
        copies = plural(report.reused, "copy of an identical image", "copies of identical images")
        line += f" ({copies}, no model work)"
    if report.kept:
        line += f", {plural(len(report.kept), 'existing sidecar')} left alone"
    line += _restored_clause(report)
    line += f", {len(report.failed)} failed" + _skipped_count(report.skipped)
    print(line, file=out)
    for o in report.sidecars_pending:
        print(f"sidecar pending: {shown(o.path)}: {o.reason or 'not writable'}", file=out)
    _print_kept(report.kept, out)
    _print_restored(report, out)
    for f in report.failed:
        print(f"failed: {shown(f.path)}: {f.error}", file=out)
    # Images whose folder became a link while the model ran: skipped, like the scan's.
    _print_skipped(report.skipped, out)
    _print_passed_over(report.passed_over, list(report.folders), out)
    return report.exit_code


def _restored_clause(report: CaptionReport) -> str:
    if not report.restored:
        return ""
    return f", {plural(len(report.restored), 'missing sidecar')} written again from the index"


def _print_restored(report: CaptionReport, out: TextIO) -> None:
    for path, reason in report.restore_pending:
        print(f"sidecar pending: {shown(path)}: {reason}", file=out)


def _print_plan(report: CaptionReport, out: TextIO) -> int:
    """--dry-run: what a caption run would do."""
    print(
        f"would caption {plural(len(report.queued), 'image')} ({report.new} new, "
        f"{report.changed} changed, {len(set(report.outdated))} with other settings, "
        f"{report.retried} failed before), write "
        f"{plural(len(report.missing_sidecars), 'missing sidecar')}"
        f" from the index, forget {plural(len(report.forgotten), 'deleted image')}; "
        f"{report.up_to_date} up to date" + _skipped_count(report.skipped),
        file=out,
    )
    for p in report.queued:
        print(f"would caption: {shown(p)}", file=out)
    for p in report.missing_sidecars:
        print(f"would write the missing sidecar of: {shown(p)}", file=out)
    for p in report.forgotten:
        print(f"would forget (deleted): {shown(p)}", file=out)
    _print_skipped(report.skipped, out)
    _print_passed_over(report.passed_over, list(report.folders), out)
    return EXIT_OK


def _skipped_count(skipped: Sequence[tuple[Path, str]]) -> str:
    return f", {len(skipped)} skipped" if skipped else ""


def _print_skipped(skipped: Sequence[tuple[Path, str]], out: TextIO) -> None:
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
    from watcher.index import open_index
    from watcher.search import QueryEncoder, SearchError, load_query_embedder, search
    from watcher.web.client import borrow_encoder

    if (args.query is None) == (args.like is None):
        print("watcher: search needs TEXT or --like IMAGE (one of them)", file=err)
        return EXIT_USAGE
    try:
        (args.query or "").encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 in argv (surrogate-escaped)
        print("watcher: the search text is not valid UTF-8; captions are UTF-8 text", file=err)
        return EXIT_USAGE
    # No database yet: NoDatabase, "no index yet" and exit 1 (_with_database_errors).
    index = open_index(cfg.database)
    # Semantic search turned off in the config: plain text search, nothing to say about it.
    mode = args.mode or ("text" if cfg.search.embedding_model is None else cfg.search.mode)
    embedder: QueryEncoder | None = None
    why = None
    if mode != "text" and args.like is None:
        # A running daemon has the model loaded: its vector for the query saves loading
        # torch and the model here (seconds per search).
        embedder = borrow_encoder(cfg, index, args.query)
        if embedder is None:
            embedder, why = load_query_embedder(index, cfg.search)
    folder = None if args.folder is None else os.path.abspath(args.folder.expanduser())
    try:
        result = search(
            index,
            args.query,
            mode=mode,
            limit=args.limit,
            folder=folder,
            task=args.task,
            like=args.like,
            embedder=embedder,
            unavailable=why,
        )
    except SearchError as e:
        print(f"watcher: {e}", file=err)
        return EXIT_FAILED
    if result.note:
        print(f"watcher: note: {result.note}", file=err)
    hits = result.hits
    if args.json:
        json.dump([_hit_json(h, result.mode) for h in hits], out, indent=2)
        out.write("\n")
    else:
        for h in hits:
            print(shown(h.row.path), file=out)
            print(f"    {h.row.caption}", file=out)
        if not hits:
            print("no matches", file=err)
    return EXIT_OK if hits else EXIT_FAILED


def cmd_export(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.export import ExportError, count, export
    from watcher.index import connect

    # Not checked on disk: the index may hold a folder on a disk not mounted now.
    folder = Path(os.path.abspath(args.folder.expanduser())) if args.folder else None
    if args.format in ("hf", "kohya") and args.output is not None:
        print(f"watcher: --format {args.format} writes several files: use --out DIR", file=err)
        return EXIT_USAGE
    if args.format in ("csv", "jsonl") and args.out is not None:
        print(f"watcher: --format {args.format} writes one file: use -o FILE", file=err)
        return EXIT_USAGE
    # No database yet: NoDatabase, "no index yet" and exit 1 (_with_database_errors).
    db = connect(cfg.database, readonly=True)
    pattern = (cfg.folder_for(folder) if folder else None) or cfg.with_folders([Path("/")]).folders[
        0
    ]
    stem, _, ext = pattern.sidecar.partition("{stem}")
    bar: Any = None
    if _isatty(err):
        from tqdm import tqdm

        bar = tqdm(
            total=count(db, folder, args.query),
            file=err,
            unit=" rows",
            desc="exporting",
            dynamic_ncols=True,
            mininterval=0.5,
        )
    try:
        report = export(
            db,
            args.format,
            out_file=args.output,
            out_dir=args.out,
            folder=folder,
            query=args.query,
            stdout=out,
            on_row=bar.update if bar is not None else (lambda: None),
            sidecar_extension=ext if not stem and "{" not in ext else None,
        )
    except ExportError as e:
        print(f"watcher: {e}", file=err)
        return EXIT_USAGE
    except OSError as e:
        print(f"watcher: cannot write the export: {e}", file=err)
        return EXIT_USAGE
    finally:
        if bar is not None:
            bar.close()
    written = ", ".join(f for f in report.files if f != "-")
    if written:
        print(f"exported {plural(report.rows, 'row')} ({report.format}) to {written}", file=err)
    for path, why in report.skipped:
        print(f"left out: {shown(path)}: {why}", file=err)
    for note in report.notes:
        print(f"note: {note}", file=err)
    return EXIT_OK


def _hit_json(h, mode: str) -> dict:
    """One hit for --json: `score` grows with relevance whatever the mode (text: -bm25;
    semantic: cosine similarity; hybrid: the fused reciprocal rank), and its parts."""
    d = {"path": h.row.path, "caption": h.row.caption, "sidecar": h.row.sidecar}
    d["score"] = round(h.score, 6)
    d["mode"] = mode
    d["task"] = h.row.task
    d["text_rank"] = h.text_rank
    d["text_score"] = None if h.text_score is None else round(h.text_score, 6)
    d["semantic_rank"] = h.semantic_rank
    d["similarity"] = None if h.similarity is None else round(h.similarity, 6)
    return d


def cmd_status(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.service.status import collect, render

    report = collect(cfg.database, cfg.model)
    if args.json:
        json.dump(report, out, indent=2)
        out.write("\n")
    else:
        out.write(render(report))
    return EXIT_OK


def cmd_retry(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    from watcher.captioning import retry

    if not args.all and not args.paths:
        print("watcher: retry needs --all or one or more paths", file=err)
        return EXIT_USAGE
    report = retry(cfg, None if args.all else args.paths, dry_run=args.dry_run)
    if report.dry_run:
        print(
            f"would queue {plural(len(report.failed), 'failed image')} again, try "
            f"{plural(len(report.pending), 'pending sidecar')}, write "
            f"{plural(len(report.missing), 'missing sidecar')} from the index, forget "
            f"{plural(len(report.forgotten), 'failure')} of deleted images",
            file=out,
        )
        for p in report.failed:
            print(f"would retry: {shown(p)}", file=out)
        for p in report.pending:
            print(f"would write the pending sidecar of: {shown(p)}", file=out)
        for p in report.missing:
            print(f"would write the missing sidecar of: {shown(p)}", file=out)
        for p in report.forgotten:
            print(f"would forget (deleted): {shown(p)}", file=out)
        return EXIT_OK
    line = (
        f"{plural(report.requeued, 'failed image')} queued again; "
        f"{plural(report.written, 'pending sidecar')} written"
    )
    if report.restored:
        line += f"; {plural(len(report.restored), 'missing sidecar')} written again"
    if report.forgotten:
        line += f"; {plural(len(report.forgotten), 'failure')} of deleted images forgotten"
    print(line, file=out)
    for path, reason in report.still_pending:
        print(f"sidecar still pending: {shown(path)}: {reason}", file=out)
    return report.exit_code


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
    for rec in info.get("output_records", []):
        # The xmp/embed outputs beside the sidecar: what each did, where, and when.
        lines.append(
            f"  {rec['output']} output: {rec['state']}"
            + (f" ({shown(rec['target'])})" if rec["target"] else "")
            + f", {_utc(rec['updated'])}"
            + (f": {shown(rec['reason'])}" if rec["reason"] else "")
        )
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
    lines.append(f"  captioned: {_utc(info['updated'])}")
    lines.append(f"  size: {info['width']}x{info['height']}, sha256 {info['sha256'][:16]}")
    return "\n".join(lines) + "\n"


def _utc(seconds: float) -> str:
    import datetime

    when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return f"{when.strftime('%Y-%m-%d %H:%M:%S')} UTC"


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


def cmd_serve(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    import dataclasses

    from watcher.config import split_listen

    if args.listen:
        listen = args.listen if not args.listen.isdigit() else f"127.0.0.1:{args.listen}"
        try:
            split_listen(listen)
        except ValueError as e:
            print(f"watcher: --listen {args.listen!r}: {e}", file=err)
            return EXIT_USAGE
        cfg = dataclasses.replace(cfg, web=dataclasses.replace(cfg.web, listen=listen))
    from watcher.index import verify

    verify(cfg.database)
    from watcher.web.app import serve

    return serve(cfg, with_model=not args.no_model, err=err)


def cmd_model(args, cfg: Config, out: TextIO, err: TextIO) -> int:
    if args.model_command == "fetch":
        code = model_fetch(cfg.model, args.revision, out, err=err)
        return code if code != EXIT_OK else embedding_fetch(cfg.search, out, err)
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
        elif s.kind == "elsewhere":
            line = f"backend {model.backend}: nothing to download for the model."
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


def embedding_fetch(search: SearchConfig, out: TextIO, err: TextIO) -> int:
    """The caption-embedding model (semantic search), after the vision model."""
    from watcher.backends.weights import FetchStep, fetch_embedding, human_size

    def step(s: FetchStep) -> None:
        if s.kind == "downloading":
            print(
                f"fetching the search embedding model {s.repo_id} at revision "
                f"{s.revision or 'main'} ...",
                file=out,
            )
        elif s.kind == "downloaded":
            print(f"  {s.folder} ({human_size(s.size)})", file=out)

    report = fetch_embedding(search, on_step=step)
    if report is None:
        return EXIT_OK
    if report.outcome == "no network":
        print(f"watcher: cannot download the embedding model: {report.message}", file=err)
        return EXIT_USAGE
    if report.outcome == "download failed":
        print(f"watcher: embedding model download failed: {report.message}", file=err)
        return EXIT_FAILED
    print("ok: semantic search works offline now.", file=out)
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


# -- the commands ---------------------------------------------------------------------------

# Each subcommand's handler, by the name the parser gives it (build_parser). These two need
# no config: init writes one, completion prints a script.
WITHOUT_CONFIG: dict[str, Callable[[argparse.Namespace, TextIO, TextIO], int]] = {
    "completion": cmd_completion,
    "init": cmd_init,
}
COMMANDS: dict[str, Handler] = {
    "caption": cmd_caption,
    "recaption": cmd_recaption,
    "run": cmd_run,
    "serve": cmd_serve,
    "search": cmd_search,
    "export": cmd_export,
    "status": cmd_status,
    "retry": cmd_retry,
    "show": cmd_show,
    "prune": cmd_prune,
    "reload": cmd_reload,
    "model": cmd_model,
    "service": cmd_service,
}
