"""What the web app's routes share: the config, the index, and the model's interactive lane."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from PIL import Image

    from watcher.config import Config
    from watcher.tasks import Task


class ModelLane(Protocol):
    """Interactive requests to the daemon's one model, served ahead of the background queue:
    one waits at most for the batch in hand."""

    def stream(self, image: Image.Image, task: Task) -> AsyncIterator[str]:
        """The text as it is generated, in chunks (one chunk if the backend cannot stream)."""
        ...

    async def describe(self, image: Image.Image, task: Task) -> str:
        """The whole text, post-processed as the writer would (watcher.tasks)."""
        ...


@dataclass(frozen=True)
class WebContext:
    """Built once by `watcher run` / `watcher serve` and handed to every route."""

    initial: Config  # the config the server started with (its `web:` settings hold till exit)
    db_path: Path
    lane: ModelLane | None  # None: no model (the page still browses and edits the library)
    daemon: bool = True  # False for `watcher serve`: nothing is watched
    # The daemon's config now: a reload adds or removes watched folders, and the pages must
    # serve exactly the folders watched now (a folder taken out of the config is not served).
    source: Callable[[], Config] | None = None

    @property
    def config(self) -> Config:
        return self.source() if self.source is not None else self.initial
