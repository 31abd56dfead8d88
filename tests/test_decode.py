"""watcher.pipeline.decode.prepare on real files: what the worker gets, or what status shows."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import resource
import sys
from pathlib import Path

import images
import pytest
from PIL import Image, ImageFile, ImageStat
from PIL.JpegImagePlugin import JpegImageFile

from watcher.messages import Job, Prepared
from watcher.pipeline import decode
from watcher.pipeline.decode import DecodeError, file_identity, prepare

MAX_PIXELS = 100_000_000
MAX_SIDE = 2048


def job(path: Path) -> Job:
    return Job(id=1, path=path, root=path.parent, gen=0, attempts=1)


def run(
    path: Path, *, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE, now: float | None = None
) -> Prepared:
    return prepare(job(path), max_pixels=max_pixels, max_side=max_side, now=now)


def fails(path: Path, **kw) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        run(path, **kw)
    return info.value


def later(path: Path) -> float:
    """A `now` well after the file's mtime: it is no longer being written."""
    return path.stat().st_mtime + 3600


def close(a, b, tol: int = 12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def mean(im: Image.Image, box=None) -> tuple[float, ...]:
    return tuple(ImageStat.Stat(im.crop(box) if box else im).mean)


# --- images that decode -------------------------------------------------------------------


def test_plain_jpeg_gives_every_field(tmp_path: Path) -> None:
    path = images.write_jpeg(tmp_path / "a.jpg", (64, 48), images.RED)
    p = run(path)
    st = path.stat()
    assert p.job == job(path)
    assert p.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (p.size, p.mtime_ns) == (st.st_size, st.st_mtime_ns) == file_identity(path)
    assert (p.width, p.height) == (64, 48)
    assert p.image.mode == "RGB" and p.image.size == (64, 48)
    assert close(mean(p.image), images.RED, 3)


def test_image_is_detached_from_the_file(tmp_path: Path) -> None:
    path = images.write_png(tmp_path / "a.png", (40, 30), images.GREEN)
    p = run(path)
    path.unlink()
    assert type(p.image) is Image.Image  # loaded pixels, no lazy ImageFile
    assert p.image.getpixel((5, 5)) == images.GREEN


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    # Stored landscape 64x48 with a black square in the stored top-left corner; orientation 6
    # means "rotate 90 degrees clockwise to display": upright it is portrait 48x64 and the
    # stored top-left corner is at the top right.
    path = images.write_jpeg(
        tmp_path / "rot.jpg", (64, 48), images.RED, exif_orientation=6, marker=True
    )
    p = run(path)
    assert (p.width, p.height) == (48, 64)
    assert p.image.size == (48, 64)
    assert close(p.image.getpixel((45, 3)), (0, 0, 0), 30)  # top right: the marker
    assert close(p.image.getpixel((3, 3)), images.RED, 30)
    assert close(p.image.getpixel((45, 60)), images.RED, 30)


def test_exif_orientation_with_downscale_reports_original_upright_size(tmp_path: Path) -> None:
    path = images.write_jpeg(tmp_path / "rot.jpg", (400, 300), exif_orientation=8)
    p = run(path, max_side=100)
    assert (p.width, p.height) == (300, 400)
    assert p.image.size == (75, 100)


def test_cmyk_jpeg_becomes_rgb_with_its_colour(tmp_path: Path) -> None:
    path = images.write_cmyk_jpeg(tmp_path / "cmyk.jpg", cmyk=(0, 255, 255, 0))
    p = run(path)
    assert p.image.mode == "RGB"
    assert close(mean(p.image), (255, 0, 0), 10)


def test_16_bit_png_is_scaled_not_clipped_to_white(tmp_path: Path) -> None:
    path = images.write_png16(tmp_path / "g16.png", (256, 32))
    with Image.open(path) as raw:
        assert raw.mode.startswith("I;16")  # the case under test really is 16-bit
    p = run(path)
    assert p.image.mode == "RGB"
    row = [p.image.getpixel((x, 16))[0] for x in range(0, 256, 32)]
    assert row == sorted(row) and row[0] < 10 and row[-1] > 200
    assert 100 < p.image.getpixel((128, 16))[0] < 156  # mid-grey in the middle
    assert 100 < mean(p.image)[0] < 156  # not all white


def test_palette_png_transparency_becomes_white_not_black(tmp_path: Path) -> None:
    path = images.write_palette_png_transparent(tmp_path / "p.png", (64, 48))
    p = run(path)
    assert p.image.mode == "RGB"
    assert p.image.getpixel((2, 2)) == (255, 255, 255)  # transparent background
    assert p.image.getpixel((32, 24)) == (255, 0, 0)  # opaque square keeps its colour


def test_rgba_png_transparency_becomes_white(tmp_path: Path) -> None:
    path = images.write_rgba_png(tmp_path / "rgba.png", (64, 48))
    p = run(path)
    assert p.image.getpixel((5, 24)) == (255, 255, 255)
    assert p.image.getpixel((60, 24)) == images.BLUE


def test_semi_transparent_rgba_is_blended_onto_white(tmp_path: Path) -> None:
    path = images.write_png(tmp_path / "half.png", (16, 16), (0, 0, 0, 128), mode="RGBA")
    grey = run(path).image.getpixel((8, 8))
    assert close(grey, (127, 127, 127), 2)


def test_rgba_downscaled_has_no_dark_fringe(tmp_path: Path) -> None:
    path = images.write_rgba_png(tmp_path / "rgba.png", (640, 480))
    p = run(path, max_side=64)
    assert p.image.size == (64, 48)
    # Resampling near the edge mixes blue with white, never with the hidden black.
    edge = [p.image.getpixel((x, 24)) for x in range(28, 36)]
    assert all(px[2] >= 150 for px in edge), edge


def test_la_png_becomes_rgb_on_white(tmp_path: Path) -> None:
    path = images.write_la_png(tmp_path / "la.png", (64, 48))
    p = run(path)
    assert p.image.mode == "RGB"
    assert p.image.getpixel((5, 24)) == (255, 255, 255)
    assert p.image.getpixel((60, 24)) == (60, 60, 60)


def test_one_bit_and_grey_pngs(tmp_path: Path) -> None:
    assert run(images.write_png(tmp_path / "1.png", (8, 8), 1, mode="1")).image.getpixel(
        (0, 0)
    ) == (255, 255, 255)
    assert run(images.write_png(tmp_path / "l.png", (8, 8), 77, mode="L")).image.getpixel(
        (0, 0)
    ) == (77, 77, 77)


@pytest.mark.parametrize(
    "writer", [images.write_animated_gif, images.write_animated_webp], ids=["gif", "webp"]
)
def test_animation_gives_its_first_frame(tmp_path: Path, writer) -> None:
    path = writer(
        tmp_path / ("anim" + (".gif" if "gif" in writer.__name__ else ".webp")),
        (64, 48),
        (images.RED, images.GREEN, images.BLUE),
    )
    with Image.open(path) as raw:
        assert getattr(raw, "n_frames", 1) == 3
    p = run(path)
    assert p.image.mode == "RGB" and p.image.size == (64, 48)
    assert close(mean(p.image), images.RED, 8)


def test_big_jpeg_is_decoded_reduced_and_downscaled(tmp_path: Path, monkeypatch) -> None:
    path = images.write_big_jpeg(tmp_path / "big.jpg", (8000, 6000))
    decoded_at: list[tuple[int, int]] = []
    original_load = JpegImageFile.load

    def spy(self):
        decoded_at.append(self.size)
        return original_load(self)

    monkeypatch.setattr(JpegImageFile, "load", spy)
    p = run(path, max_side=2048)
    assert (p.width, p.height) == (8000, 6000)
    assert p.image.size == (2048, 1536) and p.image.mode == "RGB"
    # JPEG draft mode: libjpeg decoded at 1/2 scale (4000x3000), never the full 48 Mpx.
    assert decoded_at and max(decoded_at[0]) <= 4000
    # The gradient survived, the right way up: red rises top to bottom, green falls.
    top, bottom = p.image.getpixel((1024, 10)), p.image.getpixel((1024, 1525))
    assert top[0] < 30 and top[1] > 225 and bottom[0] > 225 and bottom[1] < 30
    assert close(p.image.getpixel((1024, 768)), (128, 128, 128), 12)


def test_small_image_is_not_upscaled(tmp_path: Path) -> None:
    p = run(images.write_png(tmp_path / "s.png", (30, 20)), max_side=64)
    assert p.image.size == (30, 20)


def test_downscale_of_non_jpeg_keeps_aspect(tmp_path: Path) -> None:
    p = run(images.distinct_image(3, tmp_path / "d.png", (900, 300)), max_side=300)
    assert p.image.size == (300, 100) and (p.width, p.height) == (900, 300)


def test_distinct_images_differ(tmp_path: Path) -> None:
    preps = [run(images.distinct_image(i, tmp_path / f"d{i}.png")) for i in range(8)]
    assert len({p.sha256 for p in preps}) == 8
    means = [mean(p.image) for p in preps]
    for i in range(8):
        for j in range(i):
            assert sum(abs(a - b) for a, b in zip(means[i], means[j], strict=True)) > 20
    # And every suffix Pillow writes works.
    for suffix in (".jpg", ".webp", ".gif", ".bmp", ".tif"):
        assert run(images.distinct_image(1, tmp_path / f"x{suffix}")).image.mode == "RGB"


# --- images that do not decode ------------------------------------------------------------


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path, monkeypatch) -> None:
    path = images.write_bomb_png(tmp_path / "bomb.png", (30000, 30000))
    assert path.stat().st_size < 200_000
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    e = fails(path)
    assert e.reason == ("image too large: 30000x30000 = 900.0 Mpx exceeds max_pixels (100.0 Mpx)")
    assert not e.transient and not e.vanished
    assert loads == []  # no pixel data was ever decoded
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown_kib < 100 * 1024  # decoding it would take 900 MB


def test_max_pixels_is_the_configured_limit(tmp_path: Path) -> None:
    path = images.write_png(tmp_path / "a.png", (100, 50))
    assert run(path, max_pixels=5000).width == 100  # exactly at the limit is fine
    e = fails(path, max_pixels=4999)
    assert e.reason.startswith("image too large: 100x50 = ")
    # Pillow's own fixed limit (179 Mpx) is not in the way of a larger configured one: the
    # header is checked against max_pixels, and nothing else refuses the image.
    assert Image.MAX_IMAGE_PIXELS is None


def test_truncated_jpeg_is_permanent_once_old(tmp_path: Path) -> None:
    path = images.write_truncated_jpeg(tmp_path / "cut.jpg")
    e = fails(path, now=later(path))
    assert e.reason.startswith("truncated or corrupt image: ")
    assert "truncated" in e.reason.removeprefix("truncated or corrupt image: ")
    assert not e.transient and not e.vanished


def test_truncated_jpeg_just_written_is_transient(tmp_path: Path) -> None:
    path = images.write_truncated_jpeg(tmp_path / "cut.jpg")
    e = fails(path, now=path.stat().st_mtime + 2)  # may still be being copied
    assert e.reason.startswith("truncated or corrupt image: ") and e.transient


@pytest.mark.parametrize("keep", [10, 20, 40])
def test_png_cut_inside_its_header_is_corrupt_not_not_an_image(tmp_path: Path, keep: int) -> None:
    full = images.write_png(tmp_path / "full.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(full[:keep])
    e = fails(path, now=later(path))
    assert e.reason.startswith("truncated or corrupt image: "), e.reason
    assert not e.transient
    assert fails(path, now=path.stat().st_mtime).transient  # may still be being written


def test_text_file_named_png_is_not_an_image(tmp_path: Path) -> None:
    path = images.write_text_as_png(tmp_path / "notes.png")
    e = fails(path)
    assert e.reason == "not an image (cannot identify image file)"
    assert not e.transient and not e.vanished


def test_empty_file(tmp_path: Path) -> None:
    path = images.write_empty(tmp_path / "zero.jpg")
    e = fails(path, now=later(path))
    assert e.reason == "empty file (0 bytes)" and not e.transient
    assert fails(path, now=path.stat().st_mtime).transient  # just created: being written?


@pytest.mark.skipif(decode.HEIF_AVAILABLE, reason="pillow-heif is installed here")
def test_heic_without_pillow_heif_says_how_to_install(tmp_path: Path) -> None:
    path = images.write_fake_heic(tmp_path / "IMG_0001.HEIC")
    e = fails(path)
    assert e.reason == (
        "HEIC/HEIF needs the optional pillow-heif package: pip install 'moondream-watcher[heif]'"
    )
    assert not e.transient


@pytest.mark.skipif(not decode.HEIF_AVAILABLE, reason="pillow-heif is not installed")
def test_heic_with_pillow_heif_decodes(tmp_path: Path) -> None:
    path = tmp_path / "IMG_0001.heic"
    Image.new("RGB", (64, 48), images.RED).save(path, "HEIF", quality=95)
    p = run(path)
    assert p.image.mode == "RGB" and (p.width, p.height) == (64, 48)
    assert close(mean(p.image), images.RED, 15)
    # An EXIF orientation on a HEIC turns upright once, not twice (libheif applies it).
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 48), images.RED).save(path, "HEIF", quality=95, exif=exif.tobytes())
    p = run(path)
    assert (p.width, p.height) == p.image.size == (48, 64)


def test_eps_is_not_opened(tmp_path: Path) -> None:
    # Pillow would run Ghostscript on it; whatever its name, it is refused unopened.
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    assert fails(path).reason == "not an image (cannot identify image file)"


# --- the file itself ----------------------------------------------------------------------


def test_file_changed_while_being_read(tmp_path: Path, monkeypatch) -> None:
    path = images.write_jpeg(tmp_path / "a.jpg")
    read_all = decode._read_all

    def read_then_append(fd: int) -> bytes:
        data = read_all(fd)
        with open(path, "ab") as f:  # a writer adds to the file after we read it
            f.write(b"\0" * 100)
        return data

    monkeypatch.setattr(decode, "_read_all", read_then_append)
    e = fails(path)
    assert e.reason == "file changed while being read"
    assert e.transient and not e.vanished


def test_file_replaced_while_being_read(tmp_path: Path, monkeypatch) -> None:
    path = images.write_jpeg(tmp_path / "a.jpg", color=images.RED)
    read_all = decode._read_all

    def read_then_replace(fd: int) -> bytes:
        data = read_all(fd)
        new = images.write_jpeg(tmp_path / "new.jpg", color=images.BLUE)
        os.utime(new, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
        os.replace(new, path)  # same size and mtime, another file: an atomic save
        return data

    monkeypatch.setattr(decode, "_read_all", read_then_replace)
    e = fails(path)
    assert e.reason == "file changed while being read" and e.transient


def test_file_vanished(tmp_path: Path) -> None:
    e = fails(tmp_path / "gone.jpg")
    assert e.reason == "file disappeared before it could be read"
    assert e.vanished and not e.transient


def test_file_deleted_right_after_the_read_counts_as_vanished(tmp_path: Path, monkeypatch) -> None:
    path = images.write_jpeg(tmp_path / "a.jpg")
    read_all = decode._read_all

    def read_then_delete(fd: int) -> bytes:
        data = read_all(fd)
        path.unlink()
        return data

    monkeypatch.setattr(decode, "_read_all", read_then_delete)
    assert fails(path).vanished


def test_directory_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "album.jpg"
    folder.mkdir()
    e = fails(folder)
    assert e.reason == "not a regular file (a directory)"
    assert not e.transient and not e.vanished


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this OS")
def test_named_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    assert fails(fifo).reason == "not a regular file (a named pipe)"


def test_symlink_to_an_image_is_followed(tmp_path: Path) -> None:
    target = images.write_png(tmp_path / "real.png")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    assert run(link).sha256 == hashlib.sha256(target.read_bytes()).hexdigest()


def test_dangling_symlink_counts_as_vanished(tmp_path: Path) -> None:
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "missing.png")
    assert fails(link).vanished


@contextlib.contextmanager
def _without_file_permission_override():
    """Root reads a chmod-000 file anyway (CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH). Drop those
    two capabilities from this thread's effective set for the block (Linux capabilities are
    per thread; they stay permitted, so they are restored after)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("running as root, and dropping capabilities is Linux-only")

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        ]

    libc = ctypes.CDLL(None, use_errno=True)
    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        pytest.skip("running as root and capget() failed: cannot make a file unreadable")
    saved = data[0].effective
    data[0].effective &= ~((1 << 1) | (1 << 2))  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.capset(ctypes.byref(header), data) != 0:
        pytest.skip("running as root and capset() failed: cannot make a file unreadable")
    try:
        yield
    finally:
        data[0].effective = saved
        assert libc.capset(ctypes.byref(header), data) == 0, "could not restore capabilities"


def test_permission_denied_is_transient(tmp_path: Path) -> None:
    path = images.write_jpeg(tmp_path / "private.jpg")
    path.chmod(0)
    try:
        root = hasattr(os, "geteuid") and os.geteuid() == 0
        with _without_file_permission_override() if root else contextlib.nullcontext():
            with pytest.raises(PermissionError):
                path.open("rb").close()  # the setup really denies reading
            e = fails(path)
    finally:
        path.chmod(0o644)
    assert e.reason == "permission denied reading the file"
    assert e.transient and not e.vanished


@pytest.mark.parametrize("code", [errno.EBUSY, errno.EAGAIN, errno.EIO])
def test_busy_or_io_errors_are_transient(tmp_path: Path, monkeypatch, code: int) -> None:
    path = images.write_jpeg(tmp_path / "a.jpg")

    def busy(fd: int) -> bytes:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(decode, "_read_all", busy)
    e = fails(path)
    assert e.reason == f"cannot read the file right now: {os.strerror(code)}"
    assert e.transient and not e.vanished


def test_out_of_memory_is_transient(tmp_path: Path, monkeypatch) -> None:
    path = images.write_jpeg(tmp_path / "a.jpg")

    def no_memory(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_memory)
    e = fails(path)
    assert e.reason == "not enough memory to decode the image" and e.transient

    monkeypatch.setattr(decode, "_read_all", lambda fd: (_ for _ in ()).throw(MemoryError()))
    e = fails(path)
    assert e.reason == "not enough memory to read the file" and e.transient

    monkeypatch.setattr(
        decode,
        "_read_all",
        lambda fd: (_ for _ in ()).throw(OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))),
    )
    assert fails(path).transient


def test_file_far_too_large_for_max_pixels_is_not_read(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "huge.tif"
    with open(path, "wb") as f:
        f.truncate(300 * 2**20)  # sparse: no disk used
    monkeypatch.setattr(decode, "_read_all", lambda fd: pytest.fail("read a huge file"))
    e = fails(path, max_pixels=1000)
    assert e.reason.startswith("file too large: 300 MiB") and not e.transient


def test_file_identity(tmp_path: Path) -> None:
    path = images.write_png(tmp_path / "a.png")
    os.utime(path, ns=(1_000_000_000, 1_234_567_891_000))
    assert file_identity(path) == (path.stat().st_size, 1_234_567_891_000)
    with pytest.raises(FileNotFoundError):
        file_identity(tmp_path / "missing.png")


def test_decode_error_carries_its_reason() -> None:
    e = DecodeError("empty file (0 bytes)")
    assert (str(e), e.reason, e.transient, e.vanished) == (
        "empty file (0 bytes)",
        "empty file (0 bytes)",
        False,
        False,
    )
    assert DecodeError("x", transient=True).transient
