"""Finding images: which paths count, the catch-up scan, and watchdog observers per folder."""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import structlog

from watcher.config import FolderConfig, avif_readable
from watcher.outputs.sidecar import SIDECAR_MAX_BYTES, is_temp, temp_is_stale
from watcher.paths import shown
from watcher.pipeline.decode import image_format

NOT_REGULAR = "not a regular file"  # a named pipe (opening it would block), socket, device

log = structlog.get_logger("watcher.intake.observer")

# Names browsers and editors write before an atomic rename to the final name.
PARTIAL_SUFFIXES = (".part", ".crdownload", ".tmp", ".partial", ".download", ".swp")

# Why a file that is not hidden, ignored or a sidecar is passed over (not captioned).
NOT_IMAGE_EXTENSION = "not an image extension"
NO_EXTENSION = "no extension"
NO_EXTENSION_IMAGE = "no extension, but image bytes: add an extension (e.g. .jpg) to caption it"
AVIF_UNREADABLE = (
    "AVIF, which this Pillow cannot read: install a Pillow built with AVIF "
    "(pip install -U 'pillow>=11.2')"
)
EXAMPLES = 5  # names kept per reason
SNIFF_BYTES = 32


class Filter:
    """Decides whether a path under a watched folder is an image we should caption."""

    def __init__(self, folder: FolderConfig) -> None:
        self.folder = folder
        self.root = folder.path
        self.extensions = frozenset(e.lower() for e in folder.extensions)

    def relative(self, path: Path) -> Path | None:
        try:
            return path.relative_to(self.root)
        except ValueError:
            return None

    def wants(self, path: Path) -> bool:
        rel = self.relative(path)
        if rel is None or not rel.parts:
            return False
        name = rel.name
        if any(part.startswith(".") for part in rel.parts):  # hidden files and folders
            return False
        if is_temp(name) or name.lower().endswith(PARTIAL_SUFFIXES) or name.startswith(".~"):
            return False
        if os.path.splitext(name)[1].lower() not in self.extensions:
            return False
        return not self._ignored(rel)

    def _ignored(self, rel: Path) -> bool:
        """An ignore glob matches the file, or one of the folders it is in: an event from
        inside an ignored folder is ignored as the scan (which never enters it) would."""
        if not self.folder.ignore:
            return False
        parts = rel.parts
        for i in range(len(parts)):
            sub = "/".join(parts[: i + 1])
            for pattern in self.folder.ignore:
                if fnmatch.fnmatch(sub, pattern) or fnmatch.fnmatch(parts[i], pattern):
                    return True
        return False

    def passed_over(self, path: Path, *, sniff: bool = False) -> str | None:
        """Why a file that `wants` refuses is not captioned, if that is worth telling the
        user: a name with an extension not configured, or none. Hidden files, our temp
        files, partial downloads and ignore globs are deliberate: None. Only the name is
        looked at, except that with `sniff` a regular file without an extension has its
        first bytes read (one small read: such files are rare, and the answer says whether
        it is an image that only lacks its extension)."""
        rel = self.relative(path)
        if rel is None or not rel.parts:
            return None
        if any(part.startswith(".") for part in rel.parts) or self._ignored(rel):
            return None
        return self.passed_over_in_scan(path, rel.name, sniff=sniff)

    def passed_over_in_scan(
        self, path: Path | str, name: str, *, sniff: bool = False
    ) -> str | None:
        """`passed_over` for a file the scan found in a folder it entered (so neither hidden
        nor ignored): from the name alone, without path arithmetic (a scan may meet
        100,000 such files)."""
        if name.startswith(".") or is_temp(name) or name.lower().endswith(PARTIAL_SUFFIXES):
            return None
        if self.folder.ignore:
            rel = self.relative(Path(path))
            if rel is None or self._ignored(rel):
                return None
        ext = os.path.splitext(name)[1].lower()
        if ext in self.extensions:
            return None
        if ext == ".avif" and not avif_readable():
            return AVIF_UNREADABLE
        if ext:
            return NOT_IMAGE_EXTENSION
        if sniff and _sniff_image(path):
            return NO_EXTENSION_IMAGE
        return NO_EXTENSION

    def sidecar_names(self, image_name: str) -> tuple[str, ...]:
        """The names this image's sidecar may have (its own, and the full-name variant used
        when two images share a stem): such files are not reported as passed over."""
        stem = os.path.splitext(image_name)[0]
        pattern = self.folder.sidecar
        try:
            return (
                pattern.format(stem=stem, name=image_name),
                pattern.replace("{stem}", "{name}").format(stem=stem, name=image_name),
            )
        except (IndexError, KeyError, ValueError):
            return ()

    def wants_dir(self, path: Path) -> bool:
        rel = self.relative(path)
        if rel is None:
            return False
        if any(part.startswith(".") for part in rel.parts):
            return False
        rel_s = rel.as_posix()
        return not any(
            fnmatch.fnmatch(rel_s, p) or fnmatch.fnmatch(path.name, p)
            for p in self.folder.ignore
            if rel.parts
        )

    def inside(self, path: Path) -> bool:
        """A symlink is followed only if it resolves inside the watched root."""
        try:
            real = Path(os.path.realpath(path))
            root = Path(os.path.realpath(self.root))
        except OSError:
            return False
        return real == root or root in real.parents

    def refused_link(self, path: Path) -> str | None:
        """Why the symlink at `path` is not followed (None: not a symlink, or one that stays
        inside the root). Nothing outside the watched folder is opened, not even to look."""
        if not os.path.islink(path):
            return None
        try:
            os.path.realpath(path, strict=True)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return "symbolic link loop (too many levels of symbolic links)"
            return None  # dangling: there is nothing to caption, nor to read
        if not self.inside(path):
            return "symbolic link points outside the watched folder; not followed"
        return None


def _sniff_image(path: Path) -> bool:
    """Whether the regular file at `path` starts like an image. Never follows a link and
    never blocks (a named pipe renamed in between), and reads SNIFF_BYTES at most."""
    flags = (
        os.O_RDONLY
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_NONBLOCK", 0)
        | getattr(os, "O_CLOEXEC", 0)
    )
    try:
        fd = os.open(path, flags)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        return image_format(os.read(fd, SNIFF_BYTES)) is not None
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass
class PassedOver:
    """Files not captioned because of their name, counted per reason with a few examples:
    no row per file, so a folder of 100,000 documents costs a counter."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, path: Path | str, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        names = self.examples.setdefault(reason, [])
        if len(names) < EXAMPLES:
            names.append(str(path))

    def merge(self, other: PassedOver) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            names = self.examples.setdefault(reason, [])
            names.extend(other.examples.get(reason, [])[: EXAMPLES - len(names)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> list[dict]:
        return [
            {"reason": r, "count": n, "examples": self.examples.get(r, [])}
            for r, n in sorted(self.counts.items(), key=lambda kv: -kv[1])
        ]


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


class Sink:
    """What the handlers report to (the daemon's tracker)."""

    def file_touched(self, path: Path, folder: FolderConfig) -> None: ...

    def file_closed(self, path: Path, folder: FolderConfig) -> None:
        """Its writer closed it after writing (Linux inotify IN_CLOSE_WRITE)."""
        self.file_touched(path, folder)

    def file_deleted(self, path: Path, folder: FolderConfig) -> None: ...
    def file_moved(self, src: Path, dest: Path, folder: FolderConfig) -> None: ...
    def dir_appeared(self, path: Path, folder: FolderConfig) -> None: ...
    def dir_deleted(self, path: Path, folder: FolderConfig) -> None: ...
    def file_skipped(self, path: Path, folder: FolderConfig, reason: str) -> None: ...
    def file_passed_over(self, path: Path, folder: FolderConfig, reason: str) -> None: ...


class FolderHandler:
    """watchdog event handler for one watched folder: turns raw events into Sink calls."""

    def __init__(self, folder: FolderConfig, sink: Sink) -> None:
        self.folder = folder
        self.filter = Filter(folder)
        self.sink = sink
        # Files with the sidecar pattern's extension are our own writes (or look like them):
        # never reported as passed over from an event (a scan checks them exactly).
        self._sidecar_ext = os.path.splitext(folder.sidecar)[1].lower()

    def dispatch(self, event) -> None:  # watchdog calls this for every event
        try:
            self._dispatch(event)
        except Exception:
            log.exception("error handling a file event", event=repr(event))

    def _followable(self, path: Path) -> bool:
        """Not a symlink out of the root or in a loop, and not a named pipe, socket or
        device (opening a FIFO blocks until someone writes to it)."""
        refused = self.filter.refused_link(path)
        if refused is None:
            try:
                mode = os.stat(path).st_mode
            except OSError:
                return True  # gone already, or not readable: the later stages say so
            if not stat.S_ISREG(mode):
                refused = NOT_REGULAR
        if refused is not None:
            log.warning("skipped", path=str(path), reason=refused)
            self.sink.file_skipped(path, self.folder, refused)
        return refused is None

    def _dispatch(self, event) -> None:
        kind = event.event_type
        if kind in ("opened", "closed_no_write"):
            return
        src = Path(os.fsdecode(event.src_path))
        dest = Path(os.fsdecode(event.dest_path)) if getattr(event, "dest_path", "") else None
        if event.is_directory:
            if src == self.folder.path and kind in ("deleted", "moved"):
                # The watched folder itself went away: the daemon's folder check says so and
                # keeps its rows (it may be a disk unmounted); a catch-up scan when it is
                # back removes what is really gone.
                return
            if kind == "created" and self.filter.wants_dir(src):
                self.sink.dir_appeared(src, self.folder)
            elif kind == "deleted":
                self.sink.dir_deleted(src, self.folder)
            elif kind == "moved" and not getattr(event, "is_synthetic", False):
                # Rows under the old name go; a scan of the new name re-finds the files
                # (their bytes are known, so no model work) and their sidecars came along.
                self.sink.dir_deleted(src, self.folder)
                if dest is not None and self.filter.wants_dir(dest):
                    self.sink.dir_appeared(dest, self.folder)
            return
        if getattr(event, "is_synthetic", False):
            return  # sub-events of a directory move; the dir_appeared scan covers them
        if kind in ("created", "modified", "closed"):
            if self.filter.wants(src):
                if self._followable(src):
                    # Only inotify reports closes; `fast_close: false` treats them as any change.
                    if kind == "closed" and self.folder.fast_close:
                        self.sink.file_closed(src, self.folder)
                    else:
                        self.sink.file_touched(src, self.folder)
            elif kind == "created":
                self._passed_over(src)
        elif kind == "deleted":
            if self.filter.wants(src):
                self.sink.file_deleted(src, self.folder)
        elif kind == "moved" and dest is not None:
            src_ok = self.filter.wants(src)
            dest_ok = self.filter.wants(dest) and self.filter.relative(dest) is not None
            if dest_ok and not self._followable(dest):
                if src_ok:
                    self.sink.file_deleted(src, self.folder)
            elif src_ok and dest_ok:
                self.sink.file_moved(src, dest, self.folder)
            elif dest_ok:  # atomic save: `photo.jpg.part` -> `photo.jpg`, or moved in
                self.sink.file_touched(dest, self.folder)
            elif src_ok:  # moved out of the tree, or renamed to something we ignore
                self.sink.file_deleted(src, self.folder)
            if not dest_ok and self.filter.relative(dest) is not None:
                self._passed_over(dest)

    def _passed_over(self, path: Path) -> None:
        if path.suffix.lower() == self._sidecar_ext:
            return
        reason = self.filter.passed_over(path)
        if reason is not None:
            self.sink.file_passed_over(path, self.folder, reason)
