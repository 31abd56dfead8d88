"""The catch-up scan: a watched folder compared with the index, one stat per unchanged file."""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import structlog

from watcher.config import FolderConfig, ModelConfig
from watcher.intake.filter import NOT_REGULAR, Filter, PassedOver
from watcher.jobs import JobQueue
from watcher.outputs.sidecar import SIDECAR_MAX_BYTES, is_temp, temp_is_stale
from watcher.paths import shown

if TYPE_CHECKING:
    import sqlite_utils

log = structlog.get_logger("watcher.intake.scan")


class Expected(NamedTuple):
    """An indexed image as the catch-up scan sees it: size and mtime_ns (as the plain
    (size, mtime_ns) tuples), its sidecar (None when there is none to keep), and whether it
    was written with the folder's current settings. (A named tuple, not a dataclass: one is
    made per indexed image at every scan, and frozen dataclasses cost more to build.)"""

    size: int
    mtime_ns: int
    sidecar: str | None
    current: bool


@dataclass
class ScanResult:
    """A catch-up scan: what needs captioning, what is up to date, what disappeared."""

    queue: list[Path] = field(default_factory=list)
    up_to_date: int = 0
    failed_before: int = 0  # unchanged files that failed earlier (`watcher retry` re-queues)
    # Queued images that had failed before (changed since, or `retry_failed`): their paths.
    retried: set[str] = field(default_factory=set)
    removed: list[str] = field(default_factory=list)
    new: int = 0
    changed: int = 0
    # Unchanged images whose sidecar was written with other settings (task, prefix, suffix,
    # model) than the folder's now: queued again (the overwrite policy still applies).
    outdated: list[Path] = field(default_factory=list)
    # Unchanged, current images whose sidecar (ours) is missing: rewritten from the index.
    restore: list[str] = field(default_factory=list)
    # Image names that are not captioned, and why: links out of the root or in a loop,
    # named pipes, sockets, devices. Kept as `skipped` jobs so `watcher status` shows them.
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    # Other files not captioned because of their name (see Filter.passed_over).
    passed_over: PassedOver = field(default_factory=PassedOver)
    # Folders that could not be listed: what the index holds under them is not "removed".
    unreadable: list[Path] = field(default_factory=list)


def walk(
    filt: Filter,
    top: Path | None = None,
    skipped: list[tuple[Path, str]] | None = None,
    passed_over: PassedOver | None = None,
    unreadable: list[Path] | None = None,
    unseen: set[str] | None = None,
) -> Iterator[tuple[Path, os.stat_result]]:
    """Every wanted image under the folder with its stat: one stat per file, no more.
    Directory symlinks are not followed; file symlinks only when they stay inside the root.
    Image names refused (see ScanResult.skipped) are logged and added to `skipped`; other
    files passed over by name are counted in `passed_over` (sidecars excepted); folders that
    cannot be listed go in `unreadable`. An unexpected error on one entry is logged and
    recorded against that entry (as skipped): it never stops the walk. Every entry listed
    is struck out of `unseen` (given): what is left there at the end was not found, at no
    extra stat (the scan's sidecars)."""
    stack = [top or filt.root]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError as e:
            log.warning("cannot read folder", folder=shown(d), reason=e.strerror)
            if unreadable is not None:
                unreadable.append(d)
            continue
        others: list[tuple[str, str]] = []  # (path, name) not images by name: passed over
        # unless a sidecar
        sidecars: set[str] = set()
        with it:
            for entry in it:
                if unseen is not None:
                    unseen.discard(entry.path)
                p = Path(entry.path)
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if filt.wants_dir(p):
                            stack.append(p)
                        continue
                    if is_temp(entry.name) and entry.is_file(follow_symlinks=False):
                        _remove_stale_temp(p)
                        continue
                    if not filt.wants(p):
                        if passed_over is not None:
                            others.append((entry.path, entry.name))
                        continue
                    if passed_over is not None:
                        sidecars.update(filt.sidecar_names(entry.name))
                    refused = filt.refused_link(p) if entry.is_symlink() else None
                    if refused is None:
                        st = entry.stat(follow_symlinks=True)
                        if not _regular(st):
                            refused = NOT_REGULAR
                except OSError:
                    continue
                except Exception as e:  # a bug must cost this one file, not the scan
                    refused = f"unexpected error: {type(e).__name__}: {e}"
                    log.error("error looking at a file", path=shown(p), reason=refused)
                if refused is not None:
                    log.warning("skipped", path=shown(p), reason=refused)
                    if skipped is not None:
                        skipped.append((p, refused))
                    continue
                yield p, st
        for path, name in others:
            if name in sidecars:
                continue
            try:
                reason = filt.passed_over_in_scan(path, name, sniff=True)
            except Exception as e:
                log.error(
                    "error looking at a file", path=shown(path), reason=f"{type(e).__name__}: {e}"
                )
                continue
            if reason is not None and passed_over is not None:
                passed_over.add(path, reason)


def _remove_stale_temp(path: Path) -> None:
    """A sidecar temp file found by a scan was left by a killed process: remove it. Only a
    name that is exactly ours (is_temp), a regular file we own, no bigger than a sidecar,
    and stale (temp_is_stale: old, or its writer is gone): anything else by that name is
    someone's file, or a write under way, and stays."""
    try:
        st = os.lstat(path)
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_uid != os.geteuid()
            or st.st_size > SIDECAR_MAX_BYTES
            or not temp_is_stale(path.name, time.time() - st.st_mtime)
        ):
            return
        path.unlink()
        log.info("removed a temp file left by an interrupted write", path=shown(path))
    except OSError:
        pass


def _regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


def scan(
    filt: Filter,
    indexed: Mapping[str, tuple[int, int] | Expected],
    failed: dict[str, tuple[int | None, int | None]],
    *,
    retry_failed: bool = False,
    top: Path | None = None,
) -> ScanResult:
    """Compare the folder with the index: an unchanged file costs one stat.

    When `indexed` holds Expected rows, an unchanged image is also work to do if its
    sidecar was written with other settings (queued, `outdated`) or our sidecar is missing
    (`restore`). Failed images that no longer exist are in `removed`, like indexed ones."""
    result = ScanResult()
    seen: set[str] = set()
    check = isinstance(next(iter(indexed.values()), None), Expected)
    # The sidecars the index expects, struck out as the walk lists them (the strings are
    # the index rows' own: no copy of every name in the tree is kept).
    unseen: set[str] | None = None
    has_sidecar: list[str] = []  # unchanged, current images whose sidecar is to be there
    if check:
        unseen = {e.sidecar for e in indexed.values() if e.sidecar}  # type: ignore[union-attr]
    for path, st in walk(filt, top, result.skipped, result.passed_over, result.unreadable, unseen):
        key = str(path)
        seen.add(key)
        known = indexed.get(key)
        if known is not None and known[0] == st.st_size and known[1] == st.st_mtime_ns:
            if check:
                if not known.current:  # type: ignore[union-attr]
                    result.queue.append(path)
                    result.outdated.append(path)
                    continue
                if known.sidecar:  # type: ignore[union-attr]
                    has_sidecar.append(key)
            result.up_to_date += 1
            continue
        identity = (st.st_size, st.st_mtime_ns)
        if not retry_failed and failed.get(key) == identity:
            result.failed_before += 1
            continue
        result.queue.append(path)
        if known is None:
            result.new += 1
        else:
            result.changed += 1
    if failed:
        result.retried = {key for key in map(str, result.queue) if key in failed}
    if unseen:  # sidecars not listed beside their image: missing (stat only those)
        for key in has_sidecar:
            sidecar = indexed[key].sidecar  # type: ignore[union-attr]
            if sidecar in unseen and not os.path.lexists(sidecar):
                result.restore.append(key)
                result.up_to_date -= 1
    prefix = str(top or filt.root).rstrip("/") + "/"
    # A folder that could not be listed (the root gone, permissions) says nothing about the
    # files under it: they are not "removed".
    blind = tuple(str(u).rstrip("/") + "/" for u in result.unreadable)
    result.removed = [
        p for p in indexed if p not in seen and p.startswith(prefix) and not p.startswith(blind)
    ]
    # A failed image deleted since: forgotten (never listed, never retried). Failures are
    # few, and one that is merely skipped now stays for set_skipped to relabel.
    result.removed += [
        p
        for p in failed
        if p not in seen
        and p not in indexed
        and p.startswith(prefix)
        and not p.startswith(blind)
        and not os.path.lexists(p)
    ]
    return result


def scan_folder(
    db: sqlite_utils.Database,
    folder: FolderConfig,
    model: ModelConfig,
    *,
    top: Path | None = None,
    retry_failed: bool = False,
    force: bool = False,
    lock: contextlib.AbstractContextManager[Any] | None = None,
) -> ScanResult:
    """The scan step of `watcher caption` and of the daemon's catch-up: what the index
    expects under `top` (the whole folder by default) and what failed there, then the walk
    (see `scan`). Records nothing. `force`: every indexed image counts as written with other
    settings (queued again). `lock` is held while the database is read, not for the walk:
    the daemon shares one connection between threads, and the walk is the slow part."""
    # captioning knows what the index expects (it imports this module for the scan).
    from watcher.captioning import expected_under

    under = top or folder.path
    with lock if lock is not None else contextlib.nullcontext():
        # With each row's sidecar and settings: a sidecar written with other settings, or
        # gone, is work to do too.
        expected = expected_under(db, under, folder, model)
        failed = JobQueue(db).failed_under(under)
    if force:
        expected = {p: e._replace(current=False) for p, e in expected.items()}
    return scan(Filter(folder), expected, failed, retry_failed=retry_failed, top=top)
