"""Intake without a daemon: which paths count (Filter), the catch-up scan, the event handler."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from daemon_harness import wait_for
from images import distinct_image, write_jpeg
from structlog.testing import capture_logs
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
)

from watcher.captioning import plan_caption
from watcher.config import Config, FolderConfig, ModelConfig
from watcher.index import connect, transaction
from watcher.intake.filter import (
    NO_EXTENSION,
    NO_EXTENSION_IMAGE,
    NOT_IMAGE_EXTENSION,
    NOT_REGULAR,
    Filter,
    PassedOver,
)
from watcher.intake.observer import FolderHandler, Sink, start_observer
from watcher.intake.scan import Expected, scan, scan_folder
from watcher.jobs import JobQueue

OUTSIDE = "symbolic link points outside the watched folder; not followed"
LOOP = "symbolic link loop (too many levels of symbolic links)"


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- Filter: which paths are images to caption ----------------------------------------------


def test_filter_wants_image_extensions_in_any_case_and_nothing_else(tmp_path):
    f = Filter(FolderConfig(tmp_path))
    assert f.wants(tmp_path / "a.jpg")
    assert f.wants(tmp_path / "deep" / "er" / "B.JPEG")
    assert f.wants(tmp_path / "c.Png")
    assert not f.wants(tmp_path / "notes.pdf")
    assert not f.wants(tmp_path / "README")
    assert not f.wants(tmp_path / "a.txt")  # the sidecar pattern's extension
    assert not f.wants(tmp_path)  # the folder itself
    assert not f.wants(tmp_path.parent / "elsewhere.jpg")  # not under the folder


def test_filter_configured_extensions_replace_the_defaults(tmp_path):
    f = Filter(FolderConfig(tmp_path, extensions=(".PNG",)))
    assert f.wants(tmp_path / "a.png") and f.wants(tmp_path / "b.PNG")
    assert not f.wants(tmp_path / "a.jpg")
    assert f.passed_over(tmp_path / "a.jpg") == NOT_IMAGE_EXTENSION


def test_filter_hidden_partial_and_our_temp_names_are_not_images(tmp_path):
    f = Filter(FolderConfig(tmp_path))
    for name in (
        ".hidden.jpg",
        ".cache/a.jpg",  # in a hidden folder
        "sub/.thumbs/b.jpg",
        "a.jpg.part",
        "a.jpg.crdownload",
        "a.JPG.TMP",
        "photo.jpg.swp",
        ".~lock.photo.jpg",
        ".00003039a1b2c3d4.watcher-tmp",  # what our own atomic write leaves for a moment
    ):
        assert not f.wants(tmp_path / name), name
        # Deliberate, so never reported to the user as passed over.
        assert f.passed_over(tmp_path / name) is None, name
    assert not f.wants_dir(tmp_path / ".git")
    assert not f.wants_dir(tmp_path / "sub" / ".thumbs")
    assert f.wants_dir(tmp_path / "sub")


IGNORE = ("raw", "drafts/*", "thumb_*", "*.small.jpg")


@pytest.mark.parametrize(
    ("rel", "wanted"),
    [
        ("a.jpg", True),
        # "raw" names a folder (or file) anywhere in the tree.
        ("raw/a.jpg", False),
        ("2024/raw/a.jpg", False),
        ("2024/raw/deeper/a.jpg", False),
        ("rawness/a.jpg", True),
        # "drafts/*" is a path, anchored at the watched folder, and * crosses folders.
        ("drafts/a.jpg", False),
        ("drafts/sub/b.jpg", False),
        ("2024/drafts/a.jpg", True),
        # A name glob matches files and folders at any depth.
        ("thumb_a.jpg", False),
        ("sub/thumb_b.jpg", False),
        ("thumb_dir/c.jpg", False),
        ("athumb_a.jpg", True),
        ("x.small.jpg", False),
        ("sub/x.small.jpg", False),
        ("x.large.jpg", True),
        # Globs are matched as the file system spells names: case counts on Linux.
        ("RAW/a.jpg", True),
        ("Thumb_a.jpg", True),
    ],
)
def test_filter_ignore_patterns(tmp_path, rel, wanted):
    f = Filter(FolderConfig(tmp_path, ignore=IGNORE))
    assert f.wants(tmp_path / rel) is wanted


@pytest.mark.parametrize(
    ("rel", "reason"),
    [
        ("raw/notes.pdf", None),
        ("drafts/notes.pdf", None),
        ("thumb_notes.pdf", None),
        ("rawness/notes.pdf", NOT_IMAGE_EXTENSION),
        ("2024/drafts/README", NO_EXTENSION),
    ],
)
def test_filter_ignored_files_are_never_reported_as_passed_over(tmp_path, rel, reason):
    # Ignoring is deliberate: quiet, from an event (passed_over) as from a scan (in_scan).
    f = Filter(FolderConfig(tmp_path, ignore=IGNORE))
    path = tmp_path / rel
    assert f.passed_over(path) == reason
    assert f.passed_over_in_scan(path, path.name) == reason


def test_filter_ignored_folders_are_not_entered(tmp_path):
    f = Filter(FolderConfig(tmp_path, ignore=IGNORE))
    assert not f.wants_dir(tmp_path / "raw")
    assert not f.wants_dir(tmp_path / "2024" / "raw")
    # "drafts/*" is what is inside drafts/: the folder is listed, its files refused (above).
    assert f.wants_dir(tmp_path / "drafts")
    assert not f.wants_dir(tmp_path / "drafts" / "sub")
    assert not f.wants_dir(tmp_path / "thumb_dir")
    assert f.wants_dir(tmp_path / "2024")
    assert f.wants_dir(tmp_path / "2024" / "drafts")  # the path glob is anchored at the root
    assert f.wants_dir(tmp_path / "RAW")


def test_filter_says_why_other_files_are_passed_over(tmp_path):
    f = Filter(FolderConfig(tmp_path))
    assert f.passed_over(tmp_path / "notes.pdf") == NOT_IMAGE_EXTENSION
    assert f.passed_over(tmp_path / "sub" / "clip.MOV") == NOT_IMAGE_EXTENSION
    assert f.passed_over(tmp_path / "README") == NO_EXTENSION
    # Only with `sniff` is a file without an extension opened, to tell an image from a text.
    jpeg = write_jpeg(tmp_path / "IMG_0001")
    text = _touch(tmp_path / "LICENSE", b"MIT License\n")
    assert f.passed_over(jpeg) == NO_EXTENSION
    assert f.passed_over(jpeg, sniff=True) == NO_EXTENSION_IMAGE
    assert (
        NO_EXTENSION_IMAGE
        == "no extension, but image bytes: add an extension (e.g. .jpg) to caption it"
    )
    assert f.passed_over(text, sniff=True) == NO_EXTENSION
    # A named pipe without an extension is not opened (that would block): no extension.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert f.passed_over(fifo, sniff=True) == NO_EXTENSION


def test_filter_sidecar_names_of_an_image(tmp_path):
    assert Filter(FolderConfig(tmp_path)).sidecar_names("photo.jpg") == (
        "photo.txt",
        "photo.jpg.txt",  # the name used when photo.png shares the stem
    )
    custom = Filter(FolderConfig(tmp_path, sidecar="{name}.caption"))
    assert custom.sidecar_names("photo.jpg") == ("photo.jpg.caption", "photo.jpg.caption")


def test_filter_follows_links_only_inside_the_folder(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    write_jpeg(outside / "secret.jpg")
    write_jpeg(root / "real.jpg")
    (root / "out.jpg").symlink_to(outside / "secret.jpg")
    (root / "in.jpg").symlink_to(root / "real.jpg")
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    (root / "loop1.jpg").symlink_to(root / "loop2.jpg")
    (root / "loop2.jpg").symlink_to(root / "loop1.jpg")
    f = Filter(FolderConfig(root))
    assert f.refused_link(root / "out.jpg") == OUTSIDE
    assert f.refused_link(root / "loop1.jpg") == LOOP
    assert f.refused_link(root / "in.jpg") is None
    assert f.refused_link(root / "dangling.jpg") is None  # nothing to read, nothing to say
    assert f.refused_link(root / "real.jpg") is None  # not a link


def test_passed_over_counts_per_reason_with_a_few_examples():
    p = PassedOver()
    for i in range(7):
        p.add(f"/w/doc{i}.pdf", NOT_IMAGE_EXTENSION)
    p.add("/w/README", NO_EXTENSION)
    other = PassedOver()
    other.add("/w/sub/LICENSE", NO_EXTENSION)
    p.merge(other)
    assert p.total == 9
    assert p.to_json() == [
        {
            "reason": NOT_IMAGE_EXTENSION,
            "count": 7,
            "examples": [f"/w/doc{i}.pdf" for i in range(5)],
        },
        {"reason": NO_EXTENSION, "count": 2, "examples": ["/w/README", "/w/sub/LICENSE"]},
    ]


# -- the catch-up scan ------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, Path]:
    """A folder with images, their sidecars, other files, ignored and hidden folders, links
    out of the folder and a named pipe."""
    files = {
        "a": distinct_image(0, root / "a.jpg"),
        "b": distinct_image(1, root / "sub" / "b.png"),
        "c": distinct_image(2, root / "sub" / "deeper" / "c.JPG"),
    }
    _touch(root / "a.txt", b"a red square")  # a's sidecar: not reported
    _touch(root / "notes.pdf")
    _touch(root / "sub" / "README")
    distinct_image(3, root / "raw" / "ignored.jpg")
    distinct_image(4, root / ".thumbs" / "hidden.jpg")
    _touch(root / "raw" / "ignored.pdf")  # not reported: the scan never enters raw/
    _touch(root / "a.jpg.part")  # a download under way: quiet
    outside = distinct_image(5, root.parent / "outside" / "secret.jpg")
    (root / "escape.jpg").symlink_to(outside)
    os.mkfifo(root / "pipe.jpg")
    return files


def test_scan_of_a_new_folder_queues_its_images_and_says_what_it_passed_over(tmp_path):
    root = tmp_path / "w"
    files = _tree(root)
    result = scan(Filter(FolderConfig(root, ignore=("raw",))), {}, {})

    assert sorted(result.queue) == sorted(files.values())
    assert result.new == 3 and result.changed == 0 and result.up_to_date == 0
    assert sorted((p.name, why) for p, why in result.skipped) == [
        ("escape.jpg", OUTSIDE),
        ("pipe.jpg", NOT_REGULAR),
    ]
    # Not a.txt (a's sidecar), the partial download, or anything in raw/ or .thumbs/.
    assert sorted(result.passed_over.to_json(), key=lambda e: e["reason"]) == [
        {"reason": NO_EXTENSION, "count": 1, "examples": [str(root / "sub" / "README")]},
        {"reason": NOT_IMAGE_EXTENSION, "count": 1, "examples": [str(root / "notes.pdf")]},
    ]
    assert result.removed == [] and result.unreadable == []


def test_scan_against_the_index_costs_nothing_for_unchanged_files(tmp_path):
    root = tmp_path / "w"
    files = _tree(root)
    filt = Filter(FolderConfig(root, ignore=("raw",)))
    indexed = {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in files.values()}
    indexed[str(root / "deleted.jpg")] = (10, 10)
    indexed[str(tmp_path / "other" / "x.jpg")] = (10, 10)  # another folder's row

    distinct_image(9, files["b"])  # changed since it was indexed
    os.utime(files["b"], ns=(1, 1))
    new = distinct_image(6, root / "new.png")
    result = scan(filt, indexed, {})

    assert sorted(result.queue) == sorted([files["b"], new])
    assert (result.new, result.changed, result.up_to_date) == (1, 1, 2)
    assert result.removed == [str(root / "deleted.jpg")]  # only under this folder


def test_scan_leaves_failed_files_alone_until_they_change_or_are_retried(tmp_path):
    root = tmp_path / "w"
    bad = _touch(root / "bad.jpg", b"not a jpeg")
    same = (bad.stat().st_size, bad.stat().st_mtime_ns)
    failed = {str(bad): same, str(root / "vanished.jpg"): (1, 1)}
    filt = Filter(FolderConfig(root))

    quiet = scan(filt, {}, failed)
    assert quiet.queue == [] and quiet.failed_before == 1 and quiet.retried == set()
    assert quiet.removed == [str(root / "vanished.jpg")]  # a failure of a file gone: forgotten

    retry = scan(filt, {}, failed, retry_failed=True)
    assert retry.queue == [bad] and retry.retried == {str(bad)}

    bad.write_bytes(b"not a jpeg, still")
    changed = scan(filt, {}, failed)
    assert changed.queue == [bad] and changed.retried == {str(bad)} and changed.failed_before == 0


def test_scan_requeues_other_settings_and_restores_missing_sidecars(tmp_path):
    root = tmp_path / "w"
    old = distinct_image(0, root / "old.jpg")
    kept = distinct_image(1, root / "kept.jpg")
    lost = distinct_image(2, root / "lost.jpg")
    _touch(root / "kept.txt", b"caption")

    def expected(p: Path, sidecar: Path | None, current: bool) -> Expected:
        st = p.stat()
        return Expected(st.st_size, st.st_mtime_ns, str(sidecar) if sidecar else None, current)

    indexed = {
        str(old): expected(old, root / "old.txt", current=False),  # written with other settings
        str(kept): expected(kept, root / "kept.txt", current=True),
        str(lost): expected(lost, root / "lost.txt", current=True),  # its sidecar deleted
    }
    result = scan(Filter(FolderConfig(root)), indexed, {})
    assert result.queue == [old] and result.outdated == [old]
    assert result.restore == [str(lost)]
    assert result.up_to_date == 1  # kept.jpg only


def test_scan_does_not_take_an_unlistable_folder_for_deleted(tmp_path, monkeypatch):
    root = tmp_path / "w"
    a = distinct_image(0, root / "a.jpg")
    locked = distinct_image(1, root / "locked" / "b.jpg")
    real_scandir = os.scandir

    def refusing(path):  # what the OS answers for a folder without read permission
        if Path(path) == root / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    indexed = {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in (a, locked)}
    result = scan(Filter(FolderConfig(root)), indexed, {})
    assert result.unreadable == [root / "locked"]
    assert result.removed == []  # b.jpg's row stays: nothing is known about it
    assert result.up_to_date == 1


def test_scan_removes_our_stale_temp_files_only(tmp_path):
    root = tmp_path / "w"
    distinct_image(0, root / "a.jpg")
    ours = _touch(root / ".0000303900000000.watcher-tmp", b"half a caption")
    theirs = _touch(root / "notes.watcher-tmp", b"someone's")
    an_hour_ago = time.time() - 3600
    for p in (ours, theirs):
        os.utime(p, (an_hour_ago, an_hour_ago))
    scan(Filter(FolderConfig(root)), {}, {})
    assert not ours.exists()
    assert theirs.read_bytes() == b"someone's"


def test_scan_folder_reads_what_the_index_expects_and_what_failed(tmp_path):
    root = tmp_path / "w"
    a = distinct_image(0, root / "a.jpg")
    bad = _touch(root / "bad.jpg", b"not a jpeg")
    db = connect(tmp_path / "index.db")
    jobs = JobQueue(db)
    jobs.enqueue(bad, root)
    [job] = jobs.claim(1)
    with transaction(db):
        jobs.fail(
            job,
            "not an image",
            transient=False,
            max_attempts=1,
            backoff=0,
            identity=(bad.stat().st_size, bad.stat().st_mtime_ns),
        )
    folder = FolderConfig(root)

    result = scan_folder(db, folder, ModelConfig())
    assert result.queue == [a] and result.failed_before == 1

    again = scan_folder(db, folder, ModelConfig(), retry_failed=True)
    assert sorted(again.queue) == sorted([a, bad]) and again.retried == {str(bad)}

    sub = scan_folder(db, folder, ModelConfig(), top=root / "nothing-here")
    assert sub.queue == [] and sub.unreadable == [root / "nothing-here"]

    # `watcher caption` plans with the same scan: the failed image is tried again.
    plan = plan_caption(db, Config().with_folders([root]), [root])
    assert sorted(p for p, _ in plan.queued) == sorted([a, bad])
    assert (plan.new, plan.retried) == (2, 1)


# -- the observer: watchdog events into Sink calls ------------------------------------------------


class Recorder(Sink):
    """A sink that writes down what it is told, as (call, names relative to the root...)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[str, ...]] = []

    def _rel(self, p: Path) -> str:
        return p.relative_to(self.root).as_posix()

    def file_touched(self, path, folder):
        self.calls.append(("touched", self._rel(path)))

    def file_closed(self, path, folder):
        self.calls.append(("closed", self._rel(path)))

    def file_deleted(self, path, folder):
        self.calls.append(("deleted", self._rel(path)))

    def file_moved(self, src, dest, folder):
        self.calls.append(("moved", self._rel(src), self._rel(dest)))

    def dir_appeared(self, path, folder):
        self.calls.append(("dir appeared", self._rel(path)))

    def dir_deleted(self, path, folder):
        self.calls.append(("dir deleted", self._rel(path)))

    def file_skipped(self, path, folder, reason):
        self.calls.append(("skipped", self._rel(path), reason))

    def file_passed_over(self, path, folder, reason):
        self.calls.append(("passed over", self._rel(path), reason))


@pytest.fixture
def handled(tmp_path):
    """(root, handler, recorder) for a folder ignoring `raw`."""
    root = tmp_path / "w"
    root.mkdir()
    rec = Recorder(root)
    return root, FolderHandler(FolderConfig(root, ignore=("raw",)), rec), rec


def test_handler_file_events_become_touched_closed_and_deleted(handled):
    root, handler, rec = handled
    a = write_jpeg(root / "a.jpg")
    for event in (
        FileCreatedEvent(str(a)),
        FileModifiedEvent(str(a)),
        FileOpenedEvent(str(a)),  # opened, or closed without writing: nothing changed
        FileClosedNoWriteEvent(str(a)),
        FileClosedEvent(str(a)),
        FileDeletedEvent(str(a)),
    ):
        handler.dispatch(event)
    assert rec.calls == [
        ("touched", "a.jpg"),
        ("touched", "a.jpg"),
        ("closed", "a.jpg"),
        ("deleted", "a.jpg"),
    ]


def test_handler_events_for_other_files_say_only_what_is_worth_telling(handled):
    root, handler, rec = handled
    for rel in (
        "notes.pdf",
        "README",
        "a.txt",
        ".hidden.jpg",
        "raw/a.jpg",
        "raw/b.pdf",
        "a.jpg.part",
    ):
        p = _touch(root / rel)
        handler.dispatch(FileCreatedEvent(str(p)))
        handler.dispatch(FileModifiedEvent(str(p)))
        handler.dispatch(FileDeletedEvent(str(p)))
    # The sidecar (`.txt`: perhaps our own write), hidden, ignored and partial files: quiet.
    assert rec.calls == [
        ("passed over", "notes.pdf", NOT_IMAGE_EXTENSION),
        ("passed over", "README", NO_EXTENSION),
    ]


def test_handler_refuses_pipes_and_links_out_of_the_folder(handled, tmp_path):
    root, handler, rec = handled
    os.mkfifo(root / "pipe.jpg")
    write_jpeg(tmp_path / "secret.jpg")
    (root / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    handler.dispatch(FileCreatedEvent(str(root / "pipe.jpg")))
    handler.dispatch(FileCreatedEvent(str(root / "escape.jpg")))
    assert rec.calls == [("skipped", "pipe.jpg", NOT_REGULAR), ("skipped", "escape.jpg", OUTSIDE)]


def test_handler_moves(handled, tmp_path):
    root, handler, rec = handled
    b = write_jpeg(root / "b.jpg")
    write_jpeg(root / "photo.jpg")
    os.mkfifo(root / "fifo.jpg")

    def moved(src: Path, dest: Path) -> None:
        handler.dispatch(FileMovedEvent(str(src), str(dest)))

    moved(root / "a.jpg", b)  # renamed: the row and sidecar follow
    moved(root / "photo.jpg.part", root / "photo.jpg")  # an atomic save: a new file
    moved(root / "c.jpg", root / "c.bak")  # renamed to a name that is not an image
    moved(root / "d.jpg", tmp_path / "d.jpg")  # moved out of the watched folder
    moved(root / "e.jpg", root / "raw" / "e.jpg")  # into an ignored folder
    moved(root / "f.jpg", root / "fifo.jpg")  # replaced by a named pipe
    moved(tmp_path / "g.jpg", b)  # moved in from outside
    assert rec.calls == [
        ("moved", "a.jpg", "b.jpg"),
        ("touched", "photo.jpg"),
        ("deleted", "c.jpg"),
        ("passed over", "c.bak", NOT_IMAGE_EXTENSION),
        ("deleted", "d.jpg"),
        ("deleted", "e.jpg"),
        ("skipped", "fifo.jpg", NOT_REGULAR),
        ("deleted", "f.jpg"),
        ("touched", "b.jpg"),
    ]


def test_handler_folder_events(handled, tmp_path):
    root, handler, rec = handled
    for event in (
        DirCreatedEvent(str(root / "new")),
        DirCreatedEvent(str(root / "raw")),  # ignored: no scan
        DirCreatedEvent(str(root / ".git")),  # hidden: no scan
        DirDeletedEvent(str(root / "old")),
        DirMovedEvent(str(root / "x"), str(root / "y")),
        DirMovedEvent(str(root / "z"), str(tmp_path / "elsewhere")),
        # The watched folder itself gone: the daemon's folder check handles it (rows kept).
        DirDeletedEvent(str(root)),
        DirMovedEvent(str(root), str(tmp_path / "renamed")),
    ):
        handler.dispatch(event)
    # A move inside a moved folder, made up by watchdog: the folder's scan covers it.
    handler.dispatch(
        FileMovedEvent(str(root / "y" / "a.jpg"), str(root / "y" / "b.jpg"), is_synthetic=True)
    )
    assert rec.calls == [
        ("dir appeared", "new"),
        ("dir deleted", "old"),
        ("dir deleted", "x"),
        ("dir appeared", "y"),
        ("dir deleted", "z"),
    ]


def test_handler_fast_close_off_treats_a_close_as_any_change(tmp_path):
    rec = Recorder(tmp_path)
    handler = FolderHandler(FolderConfig(tmp_path, fast_close=False), rec)
    handler.dispatch(FileClosedEvent(str(write_jpeg(tmp_path / "a.jpg"))))
    assert rec.calls == [("touched", "a.jpg")]


def test_handler_survives_a_sink_that_raises(tmp_path):
    class Broken(Recorder):
        def file_touched(self, path, folder):
            if path.name == "boom.jpg":
                raise RuntimeError("bug")
            super().file_touched(path, folder)

    rec = Broken(tmp_path)
    handler = FolderHandler(FolderConfig(tmp_path), rec)
    with capture_logs() as logs:
        # An exception here would end watchdog's thread: no more events for any folder.
        handler.dispatch(FileCreatedEvent(str(write_jpeg(tmp_path / "boom.jpg"))))
    handler.dispatch(FileCreatedEvent(str(write_jpeg(tmp_path / "fine.jpg"))))
    assert rec.calls == [("touched", "fine.jpg")]
    [entry] = logs
    assert entry["event"] == "error handling a file event" and entry["log_level"] == "error"
    assert "boom.jpg" in entry["file_event"]


@pytest.mark.parametrize("polling", [False, True])
def test_start_observer_delivers_real_file_events(tmp_path, polling):
    rec = Recorder(tmp_path)
    obs = start_observer(FolderConfig(tmp_path, polling=polling, poll_interval=0.1), rec)
    try:
        (tmp_path / "sub").mkdir()
        wait_for(lambda: ("dir appeared", "sub") in rec.calls, 20, "the new folder")
        write_jpeg(tmp_path / "sub" / "a.jpg")
        wait_for(
            lambda: {("touched", "sub/a.jpg"), ("closed", "sub/a.jpg")} & set(rec.calls),
            20,
            "the new image",
        )
    finally:
        obs.stop()
        obs.join(5)


def test_start_observer_raises_for_a_folder_it_cannot_watch(tmp_path):
    with pytest.raises(OSError):
        start_observer(FolderConfig(tmp_path / "missing"), Recorder(tmp_path))
