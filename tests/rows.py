"""Index rows for tests that need an index without running a model."""

from __future__ import annotations

from pathlib import Path

from watcher.index import ImageRow


def image_row(path: str | Path, caption: str, task: str = "short", **fields) -> ImageRow:
    """A row as the writer leaves it for an image captioned `caption` with `task` (the model's
    caption and the sidecar's text the same); `fields` replace any other column."""
    path = str(path)
    row = dict(
        path=path,
        root=str(Path(path).parent),
        sha256=path,
        size=1,
        mtime_ns=1,
        width=4,
        height=3,
        caption=caption,
        task=task,
        outputs={task: caption},
        model="m",
        revision=None,
        sidecar=None,
        sidecar_sha256=None,
        sidecar_state="written",
        sidecar_error=None,
        created=0.0,
        updated=0.0,
        model_caption=caption,
    )
    row.update(fields)
    return ImageRow(**row)
