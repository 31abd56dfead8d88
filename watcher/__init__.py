"""moondream-watcher: caption sidecars and a searchable index for image folders."""

__version__ = "0.1.0"
