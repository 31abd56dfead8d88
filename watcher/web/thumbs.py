"""Thumbnails made on demand with the decoder's guards, cached on disk under a size cap."""

from __future__ import annotations

import io
import os
import secrets
import threading
from pathlib import Path

from watcher.pipeline.decode import DecodeError, decode_image

# Sizes the pages ask for: the library grid, and the image page's view.
SIDES = {"s": 384, "l": 1600}
_QUALITY = 82


def default_folder() -> Path:
    """The user cache dir (XDG on Linux, ~/Library/Caches on macOS)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("moondream-watcher")) / "thumbs"


def cache_key(sha256: str, size: int, side: int) -> str:
    """Changes whenever the image's bytes do (and per size asked): also the ETag."""
    return f"{sha256[:40]}-{size:x}-{side}"


def make_thumb(data: bytes, side: int, *, max_pixels: int) -> bytes:
    """A JPEG at most `side` pixels on its long edge, upright (EXIF orientation applied).
    Decoded with the pipeline's code: the decompression-bomb check (`max_pixels`, from the
    header, before any pixel is decoded), JPEG draft decoding, the mode normalisation.
    Raises DecodeError."""
    image = decode_image(data, max_pixels=max_pixels, max_side=side)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=_QUALITY, optimize=True)
    return out.getvalue()


class ThumbCache:
    """Files named by cache_key in `folder`; the least recently used go first once the total
    passes `cap_bytes`. Safe for the server's threads and for several processes sharing the
    folder (writes are a temp file and a rename)."""

    def __init__(self, folder: Path, cap_bytes: int) -> None:
        self.folder = folder
        self.cap_bytes = max(1, cap_bytes)
        self._lock = threading.Lock()
        self._total: int | None = None  # bytes in the folder, counted at the first write

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.jpg"

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        return data

    def put(self, key: str, data: bytes) -> None:
        """Store `data`; a cache that cannot be written (full disk, read-only) only costs
        the next request a new thumbnail."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name(f".{secrets.token_hex(6)}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:
            return
        with self._lock:
            if self._total is None:
                self._total = sum(size for _, size, _ in self._entries())
            else:
                self._total += len(data)
            if self._total > self.cap_bytes:
                self._evict()

    def _entries(self) -> list[tuple[float, int, Path]]:
        out: list[tuple[float, int, Path]] = []
        try:
            subdirs = list(os.scandir(self.folder))
        except OSError:
            return out
        for sub in subdirs:
            if not sub.is_dir(follow_symlinks=False):
                continue
            try:
                for e in os.scandir(sub.path):
                    if e.name.endswith(".jpg") and e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        out.append((st.st_mtime, st.st_size, Path(e.path)))
            except OSError:
                continue
        return out

    def _evict(self) -> None:
        """Down to 90% of the cap, least recently used first (one listing per eviction,
        not per write)."""
        entries = sorted(self._entries(), key=lambda e: e[0])
        total = sum(size for _, size, _ in entries)
        goal = self.cap_bytes * 9 // 10
        for _, size, path in entries:
            if total <= goal:
                break
            try:
                path.unlink()
            except OSError:
                continue
            total -= size
        self._total = total


__all__ = ["SIDES", "DecodeError", "ThumbCache", "cache_key", "default_folder", "make_thumb"]
