"""Allow `python -m watcher` (the service runs `python -I -m watcher`)."""

from watcher.isolated import drop_cwd_from_sys_path

# `python -m` put the working directory first on sys.path: a `structlog.py` there would be
# imported in place of the real one below. (Only `watcher` itself was imported before this
# line; `python -I -m watcher`, as the service runs it, keeps even that from the cwd.)
drop_cwd_from_sys_path()

from watcher.cli import main  # noqa: E402 - after the path is safe

raise SystemExit(main())
