"""YAML configuration loaded into frozen dataclasses, validated with messages that name the key."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from watcher.backends.registry import backend_names, get_backend
from watcher.outputs.base import DEFAULT_OUTPUTS, OUTPUT_NAMES
from watcher.outputs.sidecar import pattern_problem
from watcher.tasks import TASK_KINDS, Task


@functools.cache
def avif_readable() -> bool:
    """Whether this Pillow decodes AVIF (built with libavif, as Pillow >= 11.2 wheels are).
    Asked of the import system, not by importing Pillow: every command loads the config."""
    from importlib.util import find_spec

    try:
        return find_spec("PIL._avif") is not None
    except (ImportError, ValueError):
        return False


# AVIF only where Pillow reads it: elsewhere an .avif file is reported as passed over (with
# how to get a Pillow that reads it), not failed at every scan.
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".heic",
    ".heif",
) + ((".avif",) if avif_readable() else ())
OVERWRITE_POLICIES = ("never", "ours", "always")
ON_DELETE = ("keep", "remove-ours")
DEFAULT_MOONDREAM_REVISION = "2025-06-21"
DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# The Hub commit `watcher model fetch` downloads and search uses (pinned: the vectors in the
# index must come from the same weights as the query's).
DEFAULT_EMBEDDING_REVISION = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"
SEARCH_MODES = ("hybrid", "text", "semantic")


class ConfigError(ValueError):
    """A configuration problem, worded for the user: file, key path, expectation."""


@dataclass(frozen=True)
class ModelConfig:
    backend: str = "moondream"
    id: str = "vikhyatk/moondream2"
    # A tag or commit sha. Remote code is only trusted on a pinned revision.
    revision: str | None = DEFAULT_MOONDREAM_REVISION
    path: str | None = None  # a local copy of the model; wins over id
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    batch_size: int = 8
    max_tokens: int = 120
    trust_remote_code: bool = False  # only for backend transformers; moondream always needs it
    # Run the model in a child process of its own (see watcher.backends.process).
    isolate: bool = True
    # backend openai (watcher.backends.openai): the server's API root, the environment
    # variable holding its API key (the key itself is never in the config), whether a
    # base_url that is not this machine is allowed, requests in flight, seconds per
    # request, and tries again after a 429/5xx/timeout.
    base_url: str | None = None
    api_key_env: str | None = None
    allow_remote: bool = False
    concurrency: int = 8
    timeout: float = 120.0
    retries: int = 3

    @property
    def source(self) -> str:
        return self.path or self.id


@dataclass(frozen=True)
class FolderConfig:
    path: Path
    task: str = "short"  # what the sidecar holds
    index_tasks: tuple[str, ...] = ()  # extra outputs kept in the index only
    question: str | None = None
    prefix: str = ""
    suffix: str = ""
    sidecar: str = "{stem}.txt"
    overwrite: str = "ours"
    polling: bool = False
    poll_interval: float = 2.0
    settle_seconds: float = 1.0
    # A file its writer closed (Linux inotify) with its format's end marker as its last bytes
    # is finished: it goes without the settle_seconds wait.
    fast_close: bool = True
    ignore: tuple[str, ...] = ()
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    on_delete: str = "keep"
    rescan_minutes: float = 0.0  # 0: only at start
    # What is written for each image (watcher.outputs): the `.txt` sidecar, an XMP sidecar
    # for photo managers, the description embedded in the image file itself (opt-in).
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    xmp_sidecar: str = "{name}.xmp"  # darktable, digiKam; "{stem}.xmp" for Lightroom
    xmp_keywords: bool = True  # the `prompt` task's terms as dc:subject keywords

    def tasks(self, max_tokens: int) -> tuple[Task, ...]:
        """The sidecar task first, then the index-only ones, without repeats."""
        kinds: list[str] = []
        for kind in (self.task, *self.index_tasks):
            if kind not in kinds:
                kinds.append(kind)
        return tuple(Task(k, self.question if k == "query" else None, max_tokens) for k in kinds)


@dataclass(frozen=True)
class LogConfig:
    format: str = "auto"  # auto | json | console
    level: str = "info"


# The web page and API (watcher.web): where `watcher run` serves them.
DEFAULT_LISTEN = "127.0.0.1:2020"


@dataclass(frozen=True)
class WebConfig:
    enabled: bool = True
    # host:port; port 0 picks a free one (logged at start). $WATCHER_WEB_LISTEN replaces the
    # default (as $WATCHER_DB does the database's): tests run many daemons at once.
    listen: str = field(
        default_factory=lambda: os.environ.get("WATCHER_WEB_LISTEN") or DEFAULT_LISTEN
    )
    # Required to listen anywhere but loopback; then every request needs it (or the login).
    token: str | None = None
    max_body_bytes: int = 32 * 2**20  # any request body (an upload as a data URI: 4/3)
    allowed_hosts: tuple[str, ...] = ()  # Host names besides localhost and the listen host
    thumb_cache: Path | None = None  # None: the user cache dir / "thumbs" (watcher.web.pages)
    thumb_cache_mb: int = 256

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


def split_listen(listen: str) -> tuple[str, int]:
    """("127.0.0.1", 2020) from "127.0.0.1:2020", ("::1", 80) from "[::1]:80"; ValueError
    when it is not host:port."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ValueError(f"expected host:port such as {DEFAULT_LISTEN}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address goes in brackets: [::1]:2020")
    return host, int(port)


@dataclass(frozen=True)
class SearchConfig:
    """`search:`: the caption-embedding model behind semantic and hybrid search."""

    # A Hub id (fetched by `watcher model fetch`) or a local folder; None: text search only.
    embedding_model: str | None = DEFAULT_EMBEDDING_MODEL
    embedding_revision: str | None = DEFAULT_EMBEDDING_REVISION
    mode: str = "hybrid"  # what `watcher search` does without --mode
    batch_size: int = 32  # captions per embedding call
    # CPU threads for the embedding model where it runs alone (search, or the daemon when
    # the vision model is isolated): one leaves the other cores to the vision model.
    threads: int = 1
    backfill: bool = True  # the daemon embeds existing captions in the background


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    folders: tuple[FolderConfig, ...] = ()
    database: Path = field(default_factory=lambda: default_database_path())
    decode_threads: int = 2
    max_pixels: int = 100_000_000  # decompression-bomb limit, in pixels
    max_side: int = 2048  # larger images are downscaled before the model
    max_attempts: int = 5
    retry_backoff: float = 2.0  # seconds, doubled per attempt
    log: LogConfig = field(default_factory=LogConfig)
    web: WebConfig = field(default_factory=WebConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    defaults: dict[str, Any] = field(default_factory=dict)  # folder defaults as written
    source: Path | None = None  # the file it came from

    def folder_for(self, path: Path) -> FolderConfig | None:
        """The configured folder that contains `path` (deepest root wins)."""
        best: FolderConfig | None = None
        for f in self.folders:
            if path == f.path or f.path in path.parents:
                if best is None or len(f.path.parts) > len(best.path.parts):
                    best = f
        return best

    def with_folders(self, paths: list[Path]) -> Config:
        """This config watching `paths`, each with the configured folder defaults."""
        where = str(self.source or "command line")
        folders = tuple(
            _folder({"path": str(p), **self.defaults}, f"folders[{i}]", where)
            for i, p in enumerate(paths)
        )
        return dataclasses.replace(self, folders=folders)


def default_database_path() -> Path:
    env = os.environ.get("WATCHER_DB")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("moondream-watcher")) / "index.db"


def default_config_path() -> Path:
    env = os.environ.get("WATCHER_CONFIG")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("moondream-watcher")) / "config.yaml"


def load_config(path: Path | None = None, *, required: bool = False) -> Config:
    """Load `path` (or the default location). A missing default file gives the defaults."""
    explicit = path is not None
    path = path or default_config_path()
    if not path.exists():
        if explicit or required:
            raise ConfigError(f"{path}: config file not found")
        return Config()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse_config(data or {}, str(path), base_dir=path.parent, source=path)


# --- validation -------------------------------------------------------------------------


def _fail(where: str, key: str, expected: str, got: Any) -> ConfigError:
    return ConfigError(f"{where}: {key}: expected {expected}; got {got!r}")


def _check_keys(data: dict, allowed: set[str], prefix: str, where: str) -> None:
    for k in data:
        if k not in allowed:
            raise ConfigError(
                f"{where}: {prefix}{k}: unknown key; expected one of {', '.join(sorted(allowed))}"
            )


def _typed(value: Any, kind: type | tuple, key: str, where: str, expected: str) -> Any:
    # bool is an int in Python; a YAML `true` for a number is a mistake.
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise _fail(where, key, expected, value)
    if not isinstance(value, kind):
        raise _fail(where, key, expected, value)
    return value


def _choice(value: Any, choices: tuple[str, ...], key: str, where: str) -> str:
    if value not in choices:
        raise _fail(where, key, f"one of {', '.join(choices)}", value)
    return value


def _number(value: Any, key: str, where: str, *, minimum: float, integer: bool = False) -> Any:
    expected = "an integer" if integer else "a number"
    _typed(value, int if integer else (int, float), key, where, f"{expected} >= {minimum}")
    if value < minimum:
        raise _fail(where, key, f"{expected} >= {minimum}", value)
    return value


def _strings(value: Any, key: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(where, key, "a list of strings", value)
    return tuple(value)


_FOLDER_FIELDS = {f.name for f in dataclasses.fields(FolderConfig)}


def _folder(data: Any, key: str, where: str, base_dir: Path | None = None) -> FolderConfig:
    if isinstance(data, str):
        data = {"path": data}
    if not isinstance(data, dict):
        raise _fail(where, key, "a mapping with at least 'path'", data)
    _check_keys(data, _FOLDER_FIELDS, f"{key}.", where)
    if "path" not in data:
        raise ConfigError(f"{where}: {key}.path: missing")
    kw: dict[str, Any] = {}
    p = Path(os.path.expandvars(_typed(data["path"], str, f"{key}.path", where, "a path")))
    p = p.expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    kw["path"] = Path(os.path.abspath(p))
    for name, value in data.items():
        k = f"{key}.{name}"
        if name == "path":
            continue
        if name == "task":
            kw[name] = _choice(value, TASK_KINDS, k, where)
        elif name == "index_tasks":
            kw[name] = tuple(
                _choice(v, TASK_KINDS, f"{k}[{i}]", where)
                for i, v in enumerate(_strings(value, k, where))
            )
        elif name == "question":
            if value is not None:
                kw[name] = _typed(value, str, k, where, "a string")
        elif name in ("prefix", "suffix"):
            kw[name] = _typed(value, str, k, where, "a string")
        elif name == "sidecar":
            kw[name] = _typed(value, str, k, where, "a pattern such as '{stem}.txt'")
        elif name == "overwrite":
            kw[name] = _choice(value, OVERWRITE_POLICIES, k, where)
        elif name == "on_delete":
            kw[name] = _choice(value, ON_DELETE, k, where)
        elif name in ("polling", "fast_close"):
            kw[name] = _typed(value, bool, k, where, "true or false")
        elif name in ("poll_interval", "settle_seconds", "rescan_minutes"):
            kw[name] = float(_number(value, k, where, minimum=0))
        elif name == "ignore":
            kw[name] = _strings(value, k, where)
        elif name == "extensions":
            exts = _strings(value, k, where)
            kw[name] = tuple(("." + e.lstrip(".")).lower() for e in exts)
        elif name == "outputs":
            outs = tuple(
                _choice(v, OUTPUT_NAMES, f"{k}[{i}]", where)
                for i, v in enumerate(_strings(value, k, where))
            )
            # Written in OUTPUT_NAMES order whatever the listed order: embed changes the
            # image, whose new identity goes in the row, so it comes last.
            kw[name] = tuple(o for o in OUTPUT_NAMES if o in outs)
        elif name == "xmp_sidecar":
            kw[name] = _typed(value, str, k, where, "'{name}.xmp' or '{stem}.xmp'")
        elif name == "xmp_keywords":
            kw[name] = _typed(value, bool, k, where, "true or false")
    # Checked against the folder's extensions, wherever either was given (a pattern that
    # passes cannot fail to render, nor name an image).
    pattern = kw.get("sidecar", FolderConfig.sidecar)
    problem = pattern_problem(pattern, kw.get("extensions", IMAGE_EXTENSIONS))
    if problem:
        raise ConfigError(
            f"{where}: {key}.sidecar: expected a file name pattern such as '{{stem}}.txt' (text "
            f"with {{stem}} and/or {{name}}); got {pattern!r}: {problem}"
        )
    xmp = kw.get("xmp_sidecar", FolderConfig.xmp_sidecar)
    problem = pattern_problem(xmp, kw.get("extensions", IMAGE_EXTENSIONS))
    if problem is None and not xmp.lower().endswith(".xmp"):
        problem = "an XMP sidecar's name ends in .xmp"
    if problem is None and xmp == kw.get("sidecar", FolderConfig.sidecar):
        problem = "it is the .txt sidecar's name too"
    if problem:
        raise ConfigError(
            f"{where}: {key}.xmp_sidecar: expected '{{name}}.xmp' (photo.jpg.xmp: darktable, "
            f"digiKam) or '{{stem}}.xmp' (photo.xmp: Lightroom); got {xmp!r}: {problem}"
        )
    task = kw.get("task", "short")
    if "query" in (task, *kw.get("index_tasks", ())) and not kw.get("question"):
        raise ConfigError(f"{where}: {key}.question: missing; task 'query' needs a question")
    return FolderConfig(**kw)


def _model(data: Any, where: str) -> ModelConfig:
    if not isinstance(data, dict):
        raise _fail(where, "model", "a mapping", data)
    fields_ = {f.name for f in dataclasses.fields(ModelConfig)}
    if "api_key" in data:  # a secret in a file that gets copied, shared and backed up
        raise ConfigError(
            f"{where}: model.api_key: not allowed; put the key in an environment variable "
            "and give its name in model.api_key_env"
        )
    _check_keys(data, fields_, "model.", where)
    kw: dict[str, Any] = {}
    backend = _choice(
        data.get("backend", ModelConfig.backend), backend_names(), "model.backend", where
    )
    kw["backend"] = backend
    for name, value in data.items():
        k = f"model.{name}"
        if name == "path" and value is None:
            continue
        if name in ("id", "path"):
            kw[name] = os.path.expanduser(_typed(value, str, k, where, "a string"))
        elif name == "revision":
            if value is not None:
                value = str(_typed(value, (str, int), k, where, "a tag or commit sha"))
            kw[name] = value
        elif name == "device":
            v = _typed(value, str, k, where, "auto, cpu, cuda, cuda:N or mps")
            if not (v in ("auto", "cpu", "cuda", "mps") or v.startswith("cuda:")):
                raise _fail(where, k, "auto, cpu, cuda, cuda:N or mps", v)
            kw[name] = v
        elif name == "dtype":
            kw[name] = _choice(value, ("auto", "float32", "float16", "bfloat16"), k, where)
        elif name in ("batch_size", "max_tokens"):
            kw[name] = _number(value, k, where, minimum=1, integer=True)
        elif name in ("trust_remote_code", "isolate", "allow_remote"):
            kw[name] = _typed(value, bool, k, where, "true or false")
        elif name in ("base_url", "api_key_env"):
            if value is not None:
                kw[name] = _typed(value, str, k, where, "a string")
        elif name == "concurrency":
            kw[name] = _number(value, k, where, minimum=1, integer=True)
        elif name == "retries":
            kw[name] = _number(value, k, where, minimum=0, integer=True)
        elif name == "timeout":
            kw[name] = float(_number(value, k, where, minimum=0.1))
    # The rest is the backend's to judge (watcher.backends.registry.BackendSpec).
    spec = get_backend(backend)
    if "revision" not in data:
        kw["revision"] = spec.default_revision
    model = ModelConfig(**kw)
    problem = spec.config_problem(model, data.keys())
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return model


_TOP = {
    "model",
    "folders",
    "database",
    "decode_threads",
    "max_pixels",
    "max_side",
    "max_attempts",
    "retry_backoff",
    "log",
    "web",
    "defaults",
    "search",
}


def _web(data: Any, where: str, base_dir: Path | None) -> WebConfig:
    if not isinstance(data, dict):
        raise _fail(where, "web", "a mapping", data)
    _check_keys(data, {f.name for f in dataclasses.fields(WebConfig)}, "web.", where)
    kw: dict[str, Any] = {}
    for name, value in data.items():
        k = f"web.{name}"
        if name == "enabled":
            kw[name] = _typed(value, bool, k, where, "true or false")
        elif name == "listen":
            v = str(_typed(value, (str, int), k, where, f"host:port such as {DEFAULT_LISTEN}"))
            if v.isdigit():  # a bare port: on loopback
                v = f"127.0.0.1:{v}"
            try:
                split_listen(v)
            except ValueError as e:
                raise _fail(where, k, str(e).removeprefix("expected "), value) from None
            kw[name] = v
        elif name == "token":
            if value is not None:
                token = _typed(value, str, k, where, "a string (at least 16 characters)")
                if len(token) < 16 or token != token.strip():
                    raise _fail(where, k, "a string of at least 16 characters", "(hidden)")
                kw[name] = token
        elif name in ("max_body_bytes", "thumb_cache_mb"):
            kw[name] = _number(value, k, where, minimum=1, integer=True)
        elif name == "allowed_hosts":
            kw[name] = tuple(h.lower() for h in _strings(value, k, where))
        elif name == "thumb_cache":
            if value is not None:
                p = Path(os.path.expandvars(_typed(value, str, k, where, "a path"))).expanduser()
                kw[name] = p if p.is_absolute() or base_dir is None else base_dir / p
    return WebConfig(**kw)


def parse_config(
    data: Any, where: str = "config", *, base_dir: Path | None = None, source: Path | None = None
) -> Config:
    if not isinstance(data, dict):
        got = type(data).__name__
        raise ConfigError(f"{where}: expected a mapping at the top level; got {got}")
    _check_keys(data, _TOP, "", where)
    kw: dict[str, Any] = {"source": source}
    if "model" in data:
        kw["model"] = _model(data["model"], where)
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise _fail(where, "defaults", "a mapping of folder settings", defaults)
    if "path" in defaults:
        raise ConfigError(f"{where}: defaults.path: not allowed; paths go under folders")
    # Validate the defaults on their own so their errors name `defaults.`.
    _folder({"path": "/", **defaults}, "defaults", where)
    kw["defaults"] = dict(defaults)
    folders = data.get("folders") or []
    if not isinstance(folders, list):
        raise _fail(where, "folders", "a list", folders)
    parsed = []
    for i, f in enumerate(folders):
        merged = (
            {**defaults, **f}
            if isinstance(f, dict)
            else ({**defaults, "path": f} if isinstance(f, str) else f)
        )
        parsed.append(_folder(merged, f"folders[{i}]", where, base_dir))
    kw["folders"] = tuple(parsed)
    if "database" in data:
        db = _typed(data["database"], str, "database", where, "a path")
        p = Path(os.path.expandvars(db)).expanduser()
        kw["database"] = p if p.is_absolute() or base_dir is None else base_dir / p
    for name, minimum in (
        ("decode_threads", 1),
        ("max_pixels", 1),
        ("max_side", 64),
        ("max_attempts", 1),
    ):
        if name in data:
            kw[name] = _number(data[name], name, where, minimum=minimum, integer=True)
    if "retry_backoff" in data:
        kw["retry_backoff"] = float(
            _number(data["retry_backoff"], "retry_backoff", where, minimum=0)
        )
    if "web" in data:
        kw["web"] = _web(data["web"] or {}, where, base_dir)
    if "log" in data:
        log = data["log"]
        if not isinstance(log, dict):
            raise _fail(where, "log", "a mapping", log)
        _check_keys(log, {"format", "level"}, "log.", where)
        kw["log"] = LogConfig(
            format=_choice(
                log.get("format", "auto"), ("auto", "json", "console"), "log.format", where
            ),
            level=_choice(
                str(log.get("level", "info")).lower(),
                ("debug", "info", "warning", "error"),
                "log.level",
                where,
            ),
        )
    if "search" in data:
        kw["search"] = _search(data["search"], where, base_dir)
    return Config(**kw)


def _search(data: Any, where: str, base_dir: Path | None) -> SearchConfig:
    if not isinstance(data, dict):
        raise _fail(where, "search", "a mapping", data)
    _check_keys(data, {f.name for f in dataclasses.fields(SearchConfig)}, "search.", where)
    kw: dict[str, Any] = {}
    for name, value in data.items():
        k = f"search.{name}"
        if name == "embedding_model":
            if value is not None:
                value = os.path.expandvars(_typed(value, str, k, where, "a model id or folder"))
                # A relative folder is relative to the config file, like database:.
                if value.startswith(".") and base_dir is not None:
                    value = str((base_dir / value).absolute())
            kw[name] = value
        elif name == "embedding_revision":
            if value is not None:
                value = str(_typed(value, (str, int), k, where, "a tag or commit sha"))
            kw[name] = value
        elif name == "mode":
            kw[name] = _choice(value, SEARCH_MODES, k, where)
        elif name in ("batch_size", "threads"):
            kw[name] = _number(value, k, where, minimum=1, integer=True)
        elif name == "backfill":
            kw[name] = _typed(value, bool, k, where, "true or false")
    return SearchConfig(**kw)
