"""`watcher export`: the index as CSV, JSON Lines, a Hugging Face imagefolder, or kohya configs."""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TextIO

import sqlite_utils

from watcher.index import prefix_range
from watcher.outputs.sidecar import TEMP_SUFFIX
from watcher.paths import decode
from watcher.search import fts_query

FORMATS = ("csv", "jsonl", "hf", "kohya")
CSV_COLUMNS = (
    "path",
    "caption",
    "model_caption",
    "task",
    "model",
    "revision",
    "sidecar",
    "width",
    "height",
    "created",
    "updated",
)
_BATCH = 1000  # rows fetched from SQLite at a time: memory stays flat whatever the count


class ExportError(ValueError):
    """The export cannot be made as asked (the message says why): exit 2."""


@dataclass(frozen=True)
class ExportRow:
    """One indexed image as exported (paths as text: see `text_path`)."""

    path: str
    caption: str  # what the sidecar holds (the user's text where theirs was kept)
    model_caption: str
    task: str
    model: str
    revision: str | None
    sidecar: str | None
    width: int | None
    height: int | None
    created: str  # ISO 8601, UTC
    updated: str


@dataclass(frozen=True)
class ExportReport:
    format: str
    rows: int
    files: tuple[str, ...]  # what was written ("-": standard output)
    skipped: tuple[tuple[str, str], ...] = ()  # (path, why) rows left out
    notes: tuple[str, ...] = ()


def text_path(path: str) -> str:
    """A file name as text for the exported file: UTF-8 names as they are; bytes that are
    not UTF-8 as `\\xe9` (a CSV or JSON file holds text, not raw bytes)."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _where(folder: Path | None, query: str | None) -> tuple[str, str, tuple]:
    """FROM/WHERE clause and arguments selecting the rows to export."""
    args: tuple = ()
    where = []
    source = "images"
    if query is not None:
        source = "images JOIN images_fts ON images_fts.rowid = images.rowid"
        where.append("images_fts MATCH ?")
        args += (fts_query(query),)
    if folder is not None:
        where.append("images.path >= ? AND images.path < ?")
        args += prefix_range(folder)
    return source, (" WHERE " + " AND ".join(where)) if where else "", args


def count(db: sqlite_utils.Database, folder: Path | None = None, query: str | None = None) -> int:
    source, where, args = _where(folder, query)
    return db.conn.execute(f"SELECT count(*) FROM {source}{where}", args).fetchone()[0]


def rows(
    db: sqlite_utils.Database, folder: Path | None = None, query: str | None = None
) -> Iterator[ExportRow]:
    """The rows to export in path order, streamed from SQLite in batches."""
    source, where, args = _where(folder, query)
    cur = db.conn.execute(
        f"""SELECT images.path, images.caption, coalesce(images.model_caption, images.caption),
                   images.task, images.model, images.revision, images.sidecar, images.width,
                   images.height, images.created, images.updated
            FROM {source}{where} ORDER BY images.path""",
        args,
    )
    while batch := cur.fetchmany(_BATCH):
        for p, cap, mcap, task, model, rev, side, w, h, created, updated in batch:
            yield ExportRow(
                text_path(decode(p)),
                cap,
                mcap,
                task,
                model,
                rev,
                text_path(decode(side)) if side is not None else None,
                w,
                h,
                _iso(created),
                _iso(updated),
            )


# -- writing files atomically ---------------------------------------------------------------


@contextmanager
def _atomic(path: Path, *, binary: bool = False, bom: bool = False) -> Iterator[IO]:
    """A file written whole or not at all: a temp file in the same folder (our temp name
    form, removed by a scan if a kill leaves it), fsync, rename."""
    path = path.absolute()
    tmp = path.with_name(f".{os.getpid() & 0xFFFFFFFF:08x}{secrets.token_hex(4)}{TEMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    raw = os.fdopen(fd, "wb")
    try:
        stream: IO = raw
        if not binary:
            # newline="": the csv module writes its own \r\n; JSON lines end in \n.
            stream = io.TextIOWrapper(
                raw, encoding="utf-8-sig" if bom else "utf-8", newline="", write_through=False
            )
        yield stream
        stream.flush()
        os.fsync(raw.fileno())
        stream.close()
        os.rename(tmp, path)
    except BaseException:
        raw.close()
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@contextmanager
def _target(out_file: Path | None, stdout: TextIO, *, bom: bool) -> Iterator[TextIO]:
    if out_file is None or str(out_file) == "-":
        yield stdout
        stdout.flush()
        return
    with _atomic(out_file, bom=bom) as f:
        yield f  # type: ignore[misc]


# -- formats ------------------------------------------------------------------------------------


def export(
    db: sqlite_utils.Database,
    fmt: str,
    *,
    out_file: Path | None = None,
    out_dir: Path | None = None,
    folder: Path | None = None,
    query: str | None = None,
    stdout: TextIO | None = None,
    on_row: Callable[[], None] = lambda: None,
    sidecar_extension: str | None = ".txt",
) -> ExportReport:
    """Write the index's rows (all, under `folder`, or matching `query`) in `fmt`.

    csv/jsonl go to `out_file` (or standard output); hf and kohya write their files into
    `out_dir` (hf: the dataset root, by default `folder`; every image must be under it).
    `on_row` is called once per row written (a progress bar)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    stdout = stdout if stdout is not None else sys.stdout
    picked = rows(db, folder, query)
    if fmt == "csv":
        return _csv(picked, out_file, stdout, on_row)
    if fmt == "jsonl":
        return _jsonl(picked, out_file, stdout, on_row)
    root = out_dir or folder
    if root is None:
        raise ExportError(f"--format {fmt} needs --out DIR (the dataset's root) or --folder")
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise ExportError(f"{root}: not a folder")
    if fmt == "hf":
        return _hf(picked, root, on_row)
    return _kohya(picked, root, on_row, sidecar_extension)


def _csv(picked, out_file, stdout, on_row) -> ExportReport:
    n = 0
    # UTF-8 with a byte-order mark: spreadsheet programs (Excel) then read it as UTF-8;
    # every field that needs it quoted, \r\n line ends (RFC 4180). Standard output gets
    # no mark: it is read by programs.
    with _target(out_file, stdout, bom=True) as f:
        w = csv.writer(f, lineterminator="\r\n")
        w.writerow(CSV_COLUMNS)
        for r in picked:
            w.writerow(["" if v is None else v for v in (getattr(r, c) for c in CSV_COLUMNS)])
            n += 1
            on_row()
    return ExportReport("csv", n, (str(out_file) if out_file else "-",))


def _jsonl(picked, out_file, stdout, on_row) -> ExportReport:
    n = 0
    with _target(out_file, stdout, bom=False) as f:
        for r in picked:
            f.write(json.dumps(r.__dict__, ensure_ascii=False) + "\n")
            n += 1
            on_row()
    return ExportReport("jsonl", n, (str(out_file) if out_file else "-",))


def _relative(path: str, root: Path) -> str | None:
    rel = os.path.relpath(path, root)
    return None if rel == ".." or rel.startswith("../") else rel


def _hf(picked, root: Path, on_row) -> ExportReport:
    """`metadata.jsonl` at the dataset root: `file_name` relative to it, the caption as
    `text` (datasets' imagefolder; diffusers' `--caption_column text`)."""
    n, skipped = 0, []
    target = root / "metadata.jsonl"
    with _atomic(target) as f:
        for r in picked:
            rel = _relative(r.path, root)
            if rel is None:
                skipped.append((r.path, f"not under the dataset root {root}"))
                continue
            f.write(json.dumps({"file_name": rel, "text": r.caption}, ensure_ascii=False) + "\n")
            n += 1
            on_row()
    return ExportReport("hf", n, (str(target),), tuple(skipped))


def _toml_str(s: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's, non-ASCII kept as it is)."""
    return json.dumps(s, ensure_ascii=False)


def _kohya(picked, root: Path, on_row, ext: str | None) -> ExportReport:
    """kohya-ss sd-scripts: `dataset.toml` (one subset per image folder, captions from our
    sidecars via caption_extension) and the fine-tuning `metadata.json` (full image path ->
    caption) with `dataset-finetune.toml` that points at it."""
    n = 0
    folders: dict[str, None] = {}  # one entry per image folder, not per image
    meta = root / "metadata.json"
    with _atomic(meta) as f:
        f.write("{\n")
        for r in picked:
            folders.setdefault(os.path.dirname(r.path), None)
            sep = ",\n" if n else ""
            f.write(f"{sep}  {json.dumps(r.path, ensure_ascii=False)}: ")
            f.write(json.dumps({"caption": r.caption}, ensure_ascii=False))
            n += 1
            on_row()
        f.write("\n}\n")
    head = (
        "# kohya-ss sd-scripts dataset config, written by `watcher export --format kohya`.\n"
        "[general]\n"
        "shuffle_caption = false\n"
        f"caption_extension = {_toml_str(ext or '.txt')}\n"
        "keep_tokens = 0\n\n"
        "[[datasets]]\n"
        "resolution = 1024\n"
        "batch_size = 1\n"
    )
    with _atomic(root / "dataset.toml") as f:
        f.write(head)
        for d in folders:
            f.write(f"\n  [[datasets.subsets]]\n  image_dir = {_toml_str(d)}\n  num_repeats = 1\n")
    with _atomic(root / "dataset-finetune.toml") as f:
        f.write(head.replace("dataset config", "fine-tuning dataset config"))
        # The metadata's keys are full image paths: sd-scripts opens them as they are.
        f.write(f"\n  [[datasets.subsets]]\n  metadata_file = {_toml_str(str(meta))}\n")
    notes: tuple[str, ...] = ()
    if ext is None:
        notes = (
            "the sidecar pattern is not {stem}.EXT, which kohya's caption_extension cannot "
            "name: train from metadata.json (dataset-finetune.toml) instead",
        )
    files = (str(root / "dataset.toml"), str(root / "dataset-finetune.toml"), str(meta))
    return ExportReport("kohya", n, files, (), notes)


__all__ = ["FORMATS", "ExportError", "ExportReport", "count", "export", "rows"]
