"""Sidecar files: naming (with stem collisions), the overwrite policy, confined atomic writes."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat
import string
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from watcher import faults
from watcher.messages import SidecarState
from watcher.outputs.base import Content, Output, Place, Record, Result, pending
from watcher.paths import shown

_log = structlog.get_logger("watcher.outputs.sidecar")

TEMP_SUFFIX = ".watcher-tmp"
# Our temp names exactly: a dot, the writing process's pid as 8 hex digits, 8 random hex
# digits, the suffix (`.00003039a1b2c3d4.watcher-tmp`). Only such names are ever removed as
# leftovers of an interrupted write; `notes.watcher-tmp` is someone's file. (Names of 12 hex
# digits are what earlier versions wrote.)
_TEMP_NAME = re.compile(
    r"\.(?:(?P<pid>[0-9a-f]{8})[0-9a-f]{8}|[0-9a-f]{12})" + re.escape(TEMP_SUFFIX)
)
# A write takes milliseconds: a temp file this old (seconds) is a leftover whoever wrote it.
# A younger one is, if the process that wrote it is gone.
TEMP_MIN_AGE = 60.0

# No caption we write comes near this; a bigger file at a sidecar's name is someone else's
# and is neither read nor hashed (a sparse 2 GB file must cost nothing).
SIDECAR_MAX_BYTES = 1 << 20
_CHUNK = 1 << 16

# The replacement fields a sidecar pattern may use: `photo.jpg` -> stem `photo`, name
# `photo.jpg`. Nothing else (no indexing, attributes, conversions or format specs).
FIELDS = ("stem", "name")

# What hash_at says of a symlink, folder or pipe at a sidecar's name: it is never ours
# (so never replaced unless `overwrite: always`), and it is not opened (a FIFO would block
# the writer; a symlink may lead out of the watched folder).
NOT_A_FILE = "not a regular file"
TOO_BIG = "too big to be ours"

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC
# A folder we may pass through but not list (mode 711) still serves as a dir_fd this way
# (Linux); fsync on it is refused, which fsync_fd ignores.
_O_PATH = getattr(os, "O_PATH", 0)
_READ_FLAGS = os.O_RDONLY | _O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | _O_CLOEXEC


class FolderMoved(Exception):
    """A folder between the watched root and the image is no longer a real folder (a
    symbolic link now, or something else): nothing is written through it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SidecarRefused(Exception):
    """The sidecar name is one we never write (an image's name, a bad pattern)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- patterns ---------------------------------------------------------------------------


def _image_extensions(extensions: Collection[str]) -> frozenset[str]:
    """The folder's extensions plus every extension watcher knows as an image, lowercase:
    a sidecar is never given a name another folder's config would caption either."""
    from watcher.config import IMAGE_EXTENSIONS  # config imports this module

    known = {*IMAGE_EXTENSIONS, ".avif", ".jfif"}
    return frozenset(("." + e.lstrip(".")).lower() for e in (*known, *extensions))


def _pieces(pattern: str) -> list[tuple[str, str | None]]:
    """(literal, field) pairs; raises ValueError for anything outside the grammar."""
    pieces: list[tuple[str, str | None]] = []
    for literal, field, spec, conversion in string.Formatter().parse(pattern):
        if field is None:
            pieces.append((literal, None))
            continue
        if field not in FIELDS or spec or conversion:
            shown = (
                "{"
                + field
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
            raise ValueError(
                f"{shown} is not allowed; the only fields are {{stem}} and {{name}}, as they are"
            )
        pieces.append((literal, field))
    return pieces


def _fill(pieces: list[tuple[str, str | None]], stem: str, name: str) -> str:
    return "".join(
        lit + (stem if f == "stem" else name if f == "name" else "") for lit, f in pieces
    )


def pattern_problem(pattern: str, extensions: Collection[str] = ()) -> str | None:
    """Why `pattern` is not a safe sidecar pattern (None: it is). Safe means: made of text,
    {stem} and {name} only (so rendering cannot fail), depends on the image, stays in the
    image's folder, and cannot render to an image's name (any image extension, any case),
    whatever the image is called."""
    try:
        pieces = _pieces(pattern)
    except ValueError as e:
        return str(e)
    if not any(f for _, f in pieces):
        return (
            "it does not depend on the image (no {stem} or {name}): every image would "
            "share one sidecar"
        )
    literal = "".join(lit for lit, _ in pieces)
    if "/" in literal or os.sep in literal or "\0" in literal:
        return "a sidecar goes beside its image: no '/' in the pattern"
    # The rendered name's extension comes from the text after the last field when that
    # text has a dot; otherwise it ends in part of the file name: anything after the
    # stem's last dot (the attacker names the file), or the image's own extension.
    last = next(f for _, f in reversed(pieces) if f)
    tail = pieces[-1][0] if pieces[-1][1] is None else ""
    exts = _image_extensions(extensions) | {TEMP_SUFFIX}
    own = [("." + e.lstrip(".")).lower() for e in extensions] or [".jpg"]
    example: str | None = None
    if "." in tail:
        if tail[tail.rfind(".") :].lower() in exts:
            example = "photo" + own[0]
    elif last == "name":
        example = next(("photo" + c for c in own if c + tail.lower() in exts), None)
    else:
        hit = next(
            (e for e in (*own, *sorted(exts)) if e in exts and e[1:].endswith(tail.lower())), None
        )
        if hit is not None:
            example = "photo." + hit[1 : len(hit) - len(tail)] + own[0]
    if example is None:
        return None
    image = Path(example)
    return (
        f"it can name an image (for {image.name} it gives "
        f"{_fill(pieces, image.stem, image.name)}); a sidecar name must not end in an "
        f"image extension (or {TEMP_SUFFIX})"
    )


def render(pattern: str, image: Path, *, full_name: bool = False) -> Path:
    """The sidecar path for `image`. With `full_name`, {stem} is given the full file name
    (the same-stem fallback: `photo.png` -> `photo.png.txt`). Never raises for a pattern
    pattern_problem accepts; a bad one (a Config built in code) raises SidecarRefused."""
    try:
        pieces = _pieces(pattern)
    except ValueError as e:
        raise SidecarRefused(f"sidecar pattern {pattern!r} is not valid: {e}") from None
    name = image.name
    return image.with_name(_fill(pieces, name if full_name else image.stem, name))


def check_name(name: str, extensions: Collection[str]) -> None:
    """Refuse (SidecarRefused) a sidecar name we must never write: an image's name (any
    image extension, any case: it would replace an image, or become one), a path."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise SidecarRefused(f"sidecar name {name!r} is not a file name")
    lower = name.lower()
    ext = next((e for e in _image_extensions(extensions) if lower.endswith(e)), None)
    if ext is not None or lower.endswith(TEMP_SUFFIX):
        raise SidecarRefused(
            f"sidecar name {name} is an image's name ({ext or TEMP_SUFFIX}); not written, so "
            "no image is replaced: change `sidecar:` in the config (e.g. '{stem}.txt')"
        )


@dataclass(frozen=True)
class Naming:
    path: Path
    collision: str | None  # the other image whose sidecar name we avoided, if any


def choose_name(
    image: Path,
    pattern: str,
    extensions: tuple[str, ...],
    owner_of: Callable[[str], str | None],  # sidecar path -> owning image, from the index
    current: str | None = None,
) -> Naming:
    """Pick the sidecar path for `image`.

    `photo.jpg` and `photo.png` in one folder would share `photo.txt` under `{stem}.txt`: the
    first one to claim it keeps it (the index records owners); the second gets `{name}.txt`.
    With no owner recorded yet, the sibling whose name sorts first wins, so the choice does
    not depend on which file arrived first.
    """
    if current:
        return Naming(Path(current), None)
    wanted = render(pattern, image)
    if not any(f == "stem" for _, f in _pieces(pattern)):
        return Naming(wanted, None)
    owner = owner_of(str(wanted))
    rival: Path | None = None
    if owner is not None and owner != str(image):
        rival = Path(owner)
    elif owner is None:
        rival = _earlier_sibling(image, extensions)
    if rival is None:
        return Naming(wanted, None)
    return Naming(render(pattern, image, full_name=True), str(rival))


def _earlier_sibling(image: Path, extensions: tuple[str, ...]) -> Path | None:
    """An image with the same stem whose name sorts before ours (a few stats, no listdir).
    Plain strings and os.stat: this runs for every image the writer handles."""
    name, folder = image.name, os.path.dirname(image)
    stem = name[: len(name) - len(image.suffix)] if image.suffix else name
    mine = None
    seen = set()
    for ext in extensions:
        for variant in (ext, ext.upper()):
            other = stem + variant
            if other >= name or other in seen:
                continue
            seen.add(other)
            path = os.path.join(folder, other)
            try:
                st = os.stat(path)
                if mine is None:
                    mine = os.stat(image)
            except OSError:
                continue
            # samestat: on case-insensitive filesystems `.JPG` may be this very file.
            if not os.path.samestat(st, mine):
                return Path(path)
    return None


# --- folders opened without following links --------------------------------------------


def open_folder(root: Path, folder: Path) -> int:
    """A directory fd for `folder`, opened component by component from the watched `root`
    without following a symbolic link: what is written through it lands inside the root,
    whatever was swapped meanwhile. The root itself is the user's config and is trusted.
    Raises FolderMoved (a component is a link or not a folder), FileNotFoundError."""
    try:
        rel = folder.relative_to(root)
    except ValueError:
        raise FolderMoved(f"{folder} is not inside the watched folder {root}") from None
    fd = _open_dir(str(root), _DIR_FLAGS, None)
    try:
        here = root
        for part in rel.parts:
            here = here / part
            if part in (".", ".."):
                raise FolderMoved(f"{here} is not a plain folder name")
            try:
                nfd = _open_dir(part, _DIR_FLAGS | _O_NOFOLLOW, fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise
                try:
                    mode = os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode
                except FileNotFoundError:
                    raise e from None
                what = "a symbolic link" if stat.S_ISLNK(mode) else "not a folder"
                raise FolderMoved(
                    f"folder {here} is now {what}; nothing is written through it"
                ) from None
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_dir(name: str, flags: int, dir_fd: int | None) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:
        if not _O_PATH:
            raise
        return os.open(name, (flags & ~os.O_RDONLY) | _O_PATH, dir_fd=dir_fd)


def _open_regular(dir_fd: int, name: str) -> tuple[int, os.stat_result] | str | None:
    """(fd, stat) of the regular file `name` in `dir_fd`; None if absent; NOT_A_FILE."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return NOT_A_FILE
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # swapped for a link or a FIFO since
            return NOT_A_FILE
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return NOT_A_FILE
    return fd, st


def _capped_chunks(dir_fd: int, name: str, use: Callable[[bytes], None]) -> str | None:
    """Feed the regular file `name` in `dir_fd` to `use` in chunks. None when all of it was
    read; else why not: _MISSING, NOT_A_FILE, or TOO_BIG above SIDECAR_MAX_BYTES (a sparse
    2 GB file is never read; one that grows past the cap while read stops there)."""
    opened = _open_regular(dir_fd, name)
    if not isinstance(opened, tuple):
        return opened if opened is not None else _MISSING
    fd, st = opened
    try:
        if st.st_size > SIDECAR_MAX_BYTES:
            return TOO_BIG
        total = 0
        while chunk := os.read(fd, _CHUNK):
            total += len(chunk)
            if total > SIDECAR_MAX_BYTES:  # grew since the fstat
                return TOO_BIG
            use(chunk)
        return None
    finally:
        os.close(fd)


_MISSING = "missing"  # _capped_chunks: nothing by that name


def hash_at(dir_fd: int, name: str) -> str | None:
    """sha256 of the regular file `name` in `dir_fd` (read in chunks), None if nothing is
    there, NOT_A_FILE for anything else, TOO_BIG above SIDECAR_MAX_BYTES (not read)."""
    h = hashlib.sha256()
    why = _capped_chunks(dir_fd, name, h.update)
    if why is None:
        return h.hexdigest()
    return None if why == _MISSING else why


def read_text_at(dir_fd: int, name: str) -> str | None:
    """The text of the sidecar `name` (UTF-8, undecodable bytes replaced), None if it is not
    a regular file of at most SIDECAR_MAX_BYTES."""
    chunks: list[bytes] = []
    if _capped_chunks(dir_fd, name, chunks.append) is not None:
        return None
    return b"".join(chunks).decode("utf-8", errors="replace")


def file_hash(path: Path) -> str | None:
    """hash_at for a path (its folder opened as given)."""
    fd = os.open(path.parent, _DIR_FLAGS)
    try:
        return hash_at(fd, path.name)
    finally:
        os.close(fd)


def decide_hash(policy: str, on_disk: str | None, ours_sha256: str | None, new_text: str) -> str:
    """'write', 'same' (already holds exactly this text) or 'keep' (someone else's file),
    given the hash of what is at the sidecar's name now (hash_at)."""
    if on_disk is None:
        return "write"
    if on_disk == text_hash(new_text):
        # Also covers a crash between our rename and our index commit: captions are
        # deterministic, so the file on disk is the one we are about to write.
        return "same"
    if policy == "always":
        return "write"
    if policy == "ours" and ours_sha256 is not None and on_disk == ours_sha256:
        return "write"
    return "keep"


def decide(policy: str, sidecar: Path, ours_sha256: str | None, new_text: str) -> str:
    return decide_hash(policy, file_hash(sidecar), ours_sha256, new_text)


def kept_reason(policy: str, on_disk: str | None, ours_sha256: str | None) -> str:
    """Why an existing sidecar was left alone, as `watcher status` shows it."""
    if on_disk == NOT_A_FILE:
        return "not a regular file (a link, folder or pipe); left alone"
    if on_disk == TOO_BIG:
        return f"larger than {SIDECAR_MAX_BYTES >> 20} MiB, so not ours; left alone"
    if ours_sha256 is not None and policy == "ours":
        return "edited by you; not overwritten"
    if policy == "never":
        return "overwrite: never; not overwritten"
    return "not written by watcher (your own); not overwritten"


# --- writing ----------------------------------------------------------------------------


def write_atomic(
    path: Path,
    text: str | bytes,
    *,
    sync_dir: bool = True,
    dir_fd: int | None = None,
    extensions: Collection[str] = (),
) -> str:
    """Write via a temp file in the same folder, fsync, rename, fsync the folder.

    `dir_fd` is the folder opened by open_folder (without it, `path.parent` is opened as
    given). A reader sees the old file or the new one, never half. The temp name is short
    and hidden (so 250-byte image names still fit and watchers ignore it), created with
    O_EXCL|O_NOFOLLOW, and removed on any failure. An image's name is refused whatever the
    config said (check_name). Returns the sha256 of what was written.
    """
    check_name(path.name, extensions)
    if dir_fd is None:
        fd = os.open(path.parent, _DIR_FLAGS)
        try:
            return write_atomic(path, text, sync_dir=sync_dir, dir_fd=fd, extensions=extensions)
        finally:
            os.close(fd)
    data = text.encode("utf-8") if isinstance(text, str) else text
    tmp = f".{os.getpid() & 0xFFFFFFFF:08x}{secrets.token_hex(4)}{TEMP_SUFFIX}"
    # The user's umask applies to 0o666.
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o666, dir_fd=dir_fd
    )
    try:
        try:
            view = memoryview(data)
            while view:
                faults.hit("sidecar_write", (str(path),))  # test-only seam; no-op normally
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise
    if sync_dir:  # a caller writing many files in one folder syncs it once (fsync_fd)
        fsync_fd(dir_fd)
    return hashlib.sha256(data).hexdigest()


def fsync_fd(dir_fd: int) -> None:
    try:
        os.fsync(dir_fd)
    except OSError as e:  # some filesystems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS):
            raise


def fsync_dir(folder: Path, root: Path | None = None) -> None:
    """fsync `folder` (opened without following links below `root`, when given)."""
    try:
        fd = open_folder(root, folder) if root is not None else os.open(folder, _DIR_FLAGS)
    except (OSError, FolderMoved):
        return
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)


def remove_if_ours(root: Path, sidecar: Path, ours_sha256: str) -> bool:
    """Unlink `sidecar` if it still holds exactly what we wrote, through its folder opened
    below `root` without following links. True if removed."""
    try:
        fd = open_folder(root, sidecar.parent)
    except (OSError, FolderMoved):
        return False
    try:
        if hash_at(fd, sidecar.name) != ours_sha256:
            return False
        os.unlink(sidecar.name, dir_fd=fd)
        fsync_fd(fd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)


def rename_if_ours(
    root: Path, old: Path, new: Path, ours_sha256: str, extensions: Collection[str] = ()
) -> None:
    """Rename our unchanged sidecar `old` to `new` (its image moved), both folders opened
    below `root` without following links. Raises OSError/FolderMoved/SidecarRefused, or
    FileExistsError if `new` exists, or ValueError if `old` is no longer ours."""
    check_name(new.name, extensions)
    src = open_folder(root, old.parent)
    try:
        dst = open_folder(root, new.parent)
        try:
            if hash_at(src, old.name) != ours_sha256:
                raise ValueError("the sidecar is not ours any more")
            try:
                os.stat(new.name, dir_fd=dst, follow_symlinks=False)
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(new))
            except FileNotFoundError:
                pass
            os.rename(old.name, new.name, src_dir_fd=src, dst_dir_fd=dst)
            fsync_fd(dst)
            if dst != src:
                fsync_fd(src)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def follow_image(
    root: Path,
    old: Path,
    pattern: str,
    dest: Path,
    ours_sha256: str,
    extensions: Collection[str],
    *,
    what: str,
    refuse: Callable[[Path], bool],
    log: Any,
) -> Path | None:
    """Our sidecar `old` renamed to the name `pattern` gives the image's new path `dest`
    (rename_if_ours: unchanged, no link followed, nothing overwritten). Returns that name,
    or None where it stays: a name `refuse`d, taken, or no longer ours (silently), or an
    error (said on the caller's `log`, `what` naming the sidecar)."""
    try:
        new = render(pattern, dest)
        if refuse(new):
            return None
        rename_if_ours(root, old, new, ours_sha256, extensions)
    except (FileExistsError, ValueError):  # the name is taken, or it is not ours now
        return None
    except (OSError, FolderMoved, SidecarRefused) as e:
        log.warning(
            f"could not rename our {what} with its image",
            sidecar=shown(old),
            reason=getattr(e, "reason", None) or getattr(e, "strerror", str(e)),
        )
        return None
    return new


def is_temp(name: str) -> bool:
    """`name` is exactly one of our temp names (write_atomic): nothing else is ours."""
    return _TEMP_NAME.fullmatch(name) is not None


def temp_is_stale(name: str, age: float) -> bool:
    """Whether our temp file `name`, `age` seconds old, is a leftover (no write of it can
    still be under way): old, or written by a process that no longer exists."""
    m = _TEMP_NAME.fullmatch(name)
    if m is None:
        return False
    if age >= TEMP_MIN_AGE:
        return True
    if m.group("pid") is None:
        return False
    pid = int(m.group("pid"), 16)
    if pid == os.getpid() & 0xFFFFFFFF or pid == 0:
        return False  # ours: our writer may be writing it right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, someone else's
        return False
    return False


# --- the `.txt` sidecar as an output (watcher.outputs.base) ------------------------------

# Errors that go away by themselves: the job is retried later with backoff. Any other error
# writing a sidecar (EACCES, EPERM, EROFS, ENAMETOOLONG, ...) needs the user: the caption is
# kept in the index and the sidecar waits for `watcher retry`.
TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EBUSY, errno.ENOMEM, errno.EIO}


class TxtOutput(Output):
    """The `.txt` sidecar: named by the folder's pattern (stem collisions resolved through
    the index), ours while its whole-file hash is the one the index recorded. Its record
    is the images row's sidecar columns (schema 2), not an image_outputs row."""

    name = "txt"

    def __init__(self, owner_of: Callable[[str], str | None], *, sync_dir: bool = True) -> None:
        self.owner_of = owner_of  # sidecar path -> owning image (Index.sidecar_owner)
        self.sync_dir = sync_dir  # the writer syncs each folder once per batch instead

    def write(self, place: Place, content: Content, previous: Record | None) -> Result:
        folder = place.folder
        text = content.caption + "\n"
        ours = previous.sha256 if previous else None
        sidecar: Path | None = None
        try:
            problem = pattern_problem(folder.sidecar, folder.extensions)
            if problem:  # a Config built in code, bypassing load_config's check
                raise SidecarRefused(f"sidecar pattern {folder.sidecar!r}: {problem}")
            naming = choose_name(
                place.image,
                folder.sidecar,
                folder.extensions,
                self.owner_of,
                previous.target if previous else None,
            )
            sidecar = naming.path
            if naming.collision:
                _log.warning(
                    "sidecar name taken by another image with the same stem; using "
                    "the full file name",
                    path=str(place.image),
                    sidecar=str(sidecar),
                    other=naming.collision,
                )
            if sidecar.parent != place.image.parent:
                raise SidecarRefused(f"sidecar {sidecar} is not beside its image")
            check_name(sidecar.name, folder.extensions)
            on_disk = hash_at(place.dir_fd, sidecar.name)
            decision = decide_hash(folder.overwrite, on_disk, ours, text)
            if decision == "write":
                sha = write_atomic(
                    sidecar,
                    text,
                    sync_dir=self.sync_dir,
                    dir_fd=place.dir_fd,
                    extensions=folder.extensions,
                )
                return Result(
                    Record("txt", str(sidecar), sha, SidecarState.WRITTEN.value),
                    wrote=True,
                    created=on_disk is None,
                )
            if decision == "same":
                return Result(Record("txt", str(sidecar), text_hash(text), "written"))
            # Someone else's (or edited) sidecar: left alone, and the index holds what it
            # says, so `watcher search` finds the user's words.
            theirs = read_text_at(place.dir_fd, sidecar.name)
            return Result(
                Record(
                    "txt",
                    str(sidecar),
                    ours,
                    SidecarState.KEPT.value,
                    kept_reason(folder.overwrite, on_disk, ours),
                ),
                theirs=theirs.strip() if theirs is not None else None,
            )
        except SidecarRefused as e:
            # Never an image's name: no sidecar name is kept, so once the config is fixed
            # `watcher retry --all` writes the name it gives then.
            return pending("txt", None, ours, f"cannot write sidecar: {e.reason}")
        except OSError as e:
            if e.errno in TRANSIENT_ERRNOS:
                raise  # disk full and the like: the job is retried later, nothing kept
            # Read-only folder, permissions, a name too long...: the caption is not lost, it
            # goes in the index; the sidecar waits for `watcher retry`.
            from watcher.outputs.pending import error_reason

            target = str(sidecar) if sidecar is not None else None
            return pending("txt", target, ours, error_reason("cannot write sidecar", e))
