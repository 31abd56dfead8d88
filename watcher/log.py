"""Structured logging: JSON lines for services, readable lines on a terminal.

`configure_logging` sets up structlog once at start-up:

- JSON, one object per line, when the stream is not a terminal (journald, launchd log
  files, pipes) or `log.format: json`; coloured `key=value` lines on a terminal or with
  `log.format: console` (colours only on a terminal, and never with $NO_COLOR).
- `log.level` filters our own events; timestamps are ISO 8601 in UTC.
- Records from stdlib `logging` (transformers, huggingface_hub, watchdog, PIL, Python
  warnings) are rendered the same way on the same stream, but only from WARNING up, so
  libraries cannot flood the log. Transformers and huggingface_hub install their own
  stderr handlers; those are removed (now or when the library is imported later) so their
  messages are not printed twice or as plain text between JSON lines.
"""

from __future__ import annotations

import importlib.abc
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict

from watcher.config import LogConfig

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# Library records below this level are dropped, whatever log.level says.
LIBRARY_LEVEL = logging.WARNING
# Keys that lead every JSON line, in this order; the rest follow as logged.
_FIRST = ("timestamp", "level", "logger", "event")
_HANDLER_MARK = "_watcher_handler"


# --- configuration ------------------------------------------------------------------------


def configure_logging(cfg: LogConfig | None = None, stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to `stream` (default: stderr) as `cfg` says.

    Safe to call again (tests, reload): the previous set-up is replaced.
    """
    cfg = cfg or LogConfig()
    stream = stream if stream is not None else sys.stderr
    try:
        level = LEVELS[cfg.level.lower()]
    except KeyError:
        raise ValueError(f"log level {cfg.level!r}: expected one of {', '.join(LEVELS)}") from None
    tty = _isatty(stream)
    as_json = cfg.format == "json" or (cfg.format == "auto" and not tty)

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    renderer: Callable[..., Any]
    if as_json:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
        # Tracebacks become one "exception" string field, so a line stays one JSON object.
        finish: list[Callable[..., Any]] = [structlog.processors.format_exc_info, _lead_keys]
    else:
        colors = tty and "NO_COLOR" not in os.environ
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
        finish = []  # ConsoleRenderer prints exc_info itself

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _add_logger_name,
            timestamper,
            structlog.processors.StackInfoRenderer(),
            _escape_names,
            *finish,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_NamedWriteLoggerFactory(stream),
        # Loggers made at import time (module-level `log = get_logger(...)`) must pick up
        # this configuration, including a later reconfiguration.
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *finish, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(_drop_known_noise)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(LIBRARY_LEVEL, level))
    # Stdlib logging in our own package (if any) follows log.level, not the library floor.
    logging.getLogger("watcher").setLevel(level)
    logging.captureWarnings(True)
    adopt_library_loggers()


# Library warnings that say nothing a user can act on, printed at every start.
_NOISE = (
    # transformers, for any model saved with a slow image processor (the tiny test models,
    # many real ones): advice for model authors, not users.
    "Using a slow image processor as `use_fast` is unset",
)


def _drop_known_noise(record: logging.LogRecord) -> bool:
    try:
        message = record.getMessage()
    except Exception:  # a library's bad format string: let the handler show it
        return True
    return not message.startswith(_NOISE)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _dumps(obj: Any, **kw: Any) -> str:
    # Paths, enums, exceptions and the like become their str(); never fail a log line.
    kw["default"] = str
    kw.setdefault("ensure_ascii", False)
    return json.dumps(obj, **kw)


def _escape_names(_logger: Any, _name: str, event_dict: EventDict) -> EventDict:
    """File names (and errors quoting them) as watcher.paths.shown writes them: an
    undecodable byte as `\\xe9`, a newline as `\\x0a`, so a hostile name can neither
    break a log line nor fail to be written."""
    from pathlib import PurePath

    from watcher.paths import shown

    for k, v in event_dict.items():
        if k in ("exception", "exc_info", "stack", "event"):
            continue
        if isinstance(v, PurePath):
            event_dict[k] = shown(v)
        elif isinstance(v, str) and not v.isprintable():
            event_dict[k] = shown(v)
    return event_dict


def _lead_keys(_logger: Any, _name: str, event_dict: EventDict) -> EventDict:
    ordered = {k: event_dict.pop(k) for k in _FIRST if k in event_dict}
    ordered.update(event_dict)
    return ordered


def _add_logger_name(logger: Any, _name: str, event_dict: EventDict) -> EventDict:
    name = getattr(logger, "name", None)
    if name:
        event_dict.setdefault("logger", name)
    return event_dict


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's WriteLogger that remembers the name given to `get_logger(name)`."""

    def __init__(self, file: TextIO, name: str | None) -> None:
        super().__init__(file)
        self.name = name


class _NamedWriteLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        name = args[0] if args and isinstance(args[0], str) else None
        return _NamedWriteLogger(self._file, name)


# --- libraries with their own handlers -----------------------------------------------------


def _adopt_transformers(module: Any) -> None:
    module._configure_library_root_logger()  # creates its stderr handler if not yet done
    module.disable_default_handler()
    module.enable_propagation()


def _adopt_hf_hub(module: Any) -> None:
    lib = logging.getLogger("huggingface_hub")
    for h in list(lib.handlers):
        if type(h) is logging.StreamHandler and not getattr(h, _HANDLER_MARK, False):
            lib.removeHandler(h)
    lib.propagate = True


_ADOPTERS: dict[str, Callable[[Any], None]] = {
    "transformers.utils.logging": _adopt_transformers,
    "huggingface_hub.utils.logging": _adopt_hf_hub,
}
_hook_lock = threading.Lock()


def adopt_library_loggers() -> None:
    """Send transformers' and huggingface_hub's records through our handler.

    Done now for libraries already imported; an import hook does it for the others the
    moment they are imported, so callers need not care about import order.
    """
    for name, adopt in _ADOPTERS.items():
        module = sys.modules.get(name)
        if module is not None:
            _safely(adopt, module, name)
    with _hook_lock:
        if not any(isinstance(f, _AdoptOnImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _AdoptOnImport())


def _safely(adopt: Callable[[Any], None], module: Any, name: str) -> None:
    try:
        adopt(module)
    except Exception as e:  # a library changed its internals; keep its default handler
        structlog.get_logger("watcher.log").debug(
            "cannot adopt library logger", module=name, error=f"{type(e).__name__}: {e}"
        )


class _AdoptOnImport(importlib.abc.MetaPathFinder):
    """Runs the adopter right after one of `_ADOPTERS`' modules has been executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        adopt = _ADOPTERS.get(fullname)
        if adopt is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            _safely(adopt, module, fullname)

        # This spec's own loader instance only.
        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
