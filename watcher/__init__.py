"""moondream-watcher: caption sidecars and a searchable index for image folders.

Used as a library (the `watcher` command is a thin layer over these)::

    from watcher import caption_folders, load_config, open_index

    cfg = load_config()                        # the config file, or the defaults
    report = caption_folders(cfg, ["~/Pictures/shoot"])
    print(len(report.captioned), "captioned,", len(report.failed), "failed")
    for row, score in open_index(cfg.database).search("red bicycle"):
        print(row.path, row.caption)

Names are imported on first use, so `import watcher` stays cheap (no model libraries).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it (imported lazily by __getattr__).
_EXPORTS = {
    # the config
    "Config": "watcher.config",
    "ConfigError": "watcher.config",
    "load_config": "watcher.config",
    # captioning folders and images
    "caption_folders": "watcher.captioning",
    "recaption": "watcher.captioning",
    "retry": "watcher.captioning",
    "show": "watcher.captioning",
    "prune": "watcher.captioning",
    "CaptionReport": "watcher.captioning",
    "RetryReport": "watcher.captioning",
    "Pruned": "watcher.captioning",
    "CaptionError": "watcher.captioning",
    "NoMatches": "watcher.captioning",
    "ModelUnavailable": "watcher.backends",
    "edit_caption": "watcher.editing",
    "EditError": "watcher.editing",
    "EditConflict": "watcher.editing",
    # the index and search
    "open_index": "watcher.index",
    "connect": "watcher.index",
    "Index": "watcher.index",
    "ImageRow": "watcher.index",
    "DatabaseError": "watcher.index",
    "NoDatabase": "watcher.index",
}

__all__ = [
    "__version__",
    "CaptionError",
    "CaptionReport",
    "Config",
    "ConfigError",
    "DatabaseError",
    "EditConflict",
    "EditError",
    "ImageRow",
    "Index",
    "ModelUnavailable",
    "NoDatabase",
    "NoMatches",
    "Pruned",
    "RetryReport",
    "caption_folders",
    "connect",
    "edit_caption",
    "load_config",
    "open_index",
    "prune",
    "recaption",
    "retry",
    "show",
]

if TYPE_CHECKING:
    from watcher.backends import ModelUnavailable
    from watcher.captioning import (
        CaptionError,
        CaptionReport,
        NoMatches,
        Pruned,
        RetryReport,
        caption_folders,
        prune,
        recaption,
        retry,
        show,
    )
    from watcher.config import Config, ConfigError, load_config
    from watcher.editing import EditConflict, EditError, edit_caption
    from watcher.index import DatabaseError, ImageRow, Index, NoDatabase, connect, open_index


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'watcher' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
