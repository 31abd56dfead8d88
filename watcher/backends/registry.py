"""The backends watcher knows by name: built-ins and plugins, registered through one hook.

Each backend is a `BackendSpec`: its `model.backend` name, its config rules, whether its
weights are checked before start, what the index records for it, and how it loads. The
built-ins are entry points written here; third-party packages add theirs under the
`watcher.backends` entry point group (`name = "package.module:SPEC"`), loaded by the same
function. `register`/`unregister` also take one directly (tests, embedding programs).

Nothing here imports torch: config validation and `watcher model info` run on every
machine in well under a second.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from watcher.backends import ModelUnavailable

if TYPE_CHECKING:
    from watcher.backends import Backend
    from watcher.config import ModelConfig

log = structlog.get_logger("watcher.backends.registry")

GROUP = "watcher.backends"
# The built-ins, in the order `model.backend`'s error message lists them.
BUILTIN = (
    EntryPoint("moondream", "watcher.backends.moondream:SPEC", GROUP),
    EntryPoint("transformers", "watcher.backends.transformers_backend:SPEC", GROUP),
    EntryPoint("photon", "watcher.backends.photon:SPEC", GROUP),
    EntryPoint("openai", "watcher.backends.openai:SPEC", GROUP),
)
_UNPINNED_BRANCHES = ("main", "master")


class BackendSpec:
    """One kind of backend, as config, the CLI and the index see it. Subclass and register.

    The defaults suit a backend that manages its own weights and runs no remote code.
    """

    name: str = ""  # the `model.backend` value
    default_revision: str | None = None  # model.revision when the config gives none
    # Whether the Hugging Face cache is checked before start (`ensure_available`): a
    # missing model fails in seconds with one message instead of at load time.
    checks_weights: bool = False
    # Why `watcher model fetch` does not test-load it; None: it does.
    not_test_loaded: str | None = None
    # Whether its weights come from the Hugging Face Hub (`watcher model fetch`); False: the
    # model lives elsewhere (a server) and there is nothing to download for it.
    downloads: bool = True

    def load(self, cfg: ModelConfig) -> Backend:
        """The loaded backend. Raises ModelUnavailable with a user-facing message."""
        raise NotImplementedError

    def needs_remote_code(self, cfg: ModelConfig) -> bool:
        """Whether loading runs code from the model's repository."""
        return cfg.trust_remote_code

    def config_problem(self, cfg: ModelConfig, given: Collection[str]) -> str | None:
        """What is wrong with `cfg` for this backend ("model.key: ..."), or None.

        `given`: the model keys the config file set (the rest are defaults)."""
        if cfg.path or not self.needs_remote_code(cfg):
            return None
        if not cfg.revision:
            return (
                "model.revision: remote code is only trusted on a pinned revision "
                "(a tag or commit sha); got none"
            )
        if cfg.revision in _UNPINNED_BRANCHES:
            return (
                f"model.revision: expected a tag or commit sha, not a branch; got {cfg.revision!r}"
            )
        return None

    def missing_files(self, cfg: ModelConfig) -> list[str]:
        """What the model still needs from the Hub, as phrases for a message."""
        return []

    def tokenizers(self, cfg: ModelConfig, folder: Path | None) -> tuple[str, ...]:
        """Hub repositories of tokenizers the model fetches at start-up (`folder`: the
        model's files when they are on disk), which `watcher model fetch` fetches too."""
        return ()

    def model_name(self, cfg: ModelConfig) -> str:
        """The model name the loaded backend records in the index."""
        return cfg.source

    def model_revision(self, cfg: ModelConfig) -> str | None:
        """The revision the loaded backend records, as far as the config and disk tell."""
        return None if cfg.path else cfg.revision

    def destination(self, cfg: ModelConfig) -> str | None:
        """Where the images are sent to be described, for `watcher status`; None: nowhere,
        the model runs in watcher's own process."""
        return None


_specs: dict[str, BackendSpec] = {}
_loaded = False
_lock = threading.RLock()


def register(spec: BackendSpec) -> None:
    """Make `spec` available as `model.backend: <spec.name>`; a taken name is refused."""
    if not spec.name:
        raise ValueError(f"{type(spec).__name__}: a backend needs a name")
    with _lock:
        _load_all()
        if spec.name in _specs:
            raise ValueError(f"backend {spec.name!r} is already registered")
        _specs[spec.name] = spec


def unregister(name: str) -> None:
    with _lock:
        _load_all()
        _specs.pop(name, None)


def backend_names() -> tuple[str, ...]:
    """The valid `model.backend` values: the built-ins first, then plugins."""
    with _lock:
        _load_all()
        return tuple(_specs)


def get_backend(name: str) -> BackendSpec:
    """The spec registered as `name`; ModelUnavailable when there is none."""
    with _lock:
        _load_all()
        spec = _specs.get(name)
    if spec is None:
        raise ModelUnavailable(f"unknown backend {name!r}")
    return spec


def _load_all() -> None:
    """Register the built-ins, then the installed plugins, once (under `_lock`)."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # first: a plugin module may call register() while it is imported
    try:
        for ep in BUILTIN:
            _specs[ep.name] = _load(ep)
    except BaseException:
        _loaded = False
        raise
    for ep in entry_points(group=GROUP):
        if ep.name in _specs:
            log.warning("backend plugin ignored: the name is taken", backend=ep.name, ep=ep.value)
            continue
        try:
            _specs[ep.name] = _load(ep)
        except Exception as e:  # one broken plugin must not stop watcher
            log.warning(
                "backend plugin failed to load",
                backend=ep.name,
                ep=ep.value,
                error=f"{type(e).__name__}: {e}",
            )


def _load(ep: EntryPoint) -> BackendSpec:
    spec = ep.load()
    if isinstance(spec, type):
        spec = spec()
    if not isinstance(spec, BackendSpec):
        raise TypeError(f"{ep.value} is not a BackendSpec")
    if spec.name != ep.name:
        raise ValueError(f"{ep.value} is named {spec.name!r}, registered as {ep.name!r}")
    return spec
