"""Which paths under a watched folder are images to caption, and why the others are not."""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from watcher.config import FolderConfig, avif_readable
from watcher.outputs.sidecar import is_temp
from watcher.pipeline.decode import image_format

NOT_REGULAR = "not a regular file"  # a named pipe (opening it would block), socket, device

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


def _sniff_image(path: Path | str) -> bool:
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
