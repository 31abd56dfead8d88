"""Backends registered, not chained: the registry, each backend's config rules, plugins."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import pytest
import yaml
from daemon_harness import run_cli
from images import distinct_image

from watcher.backends import ModelUnavailable, load_backend, open_backend
from watcher.backends.registry import (
    BackendSpec,
    backend_names,
    get_backend,
    register,
    unregister,
)
from watcher.config import DEFAULT_MOONDREAM_REVISION, ConfigError, ModelConfig, parse_config
from watcher.tasks import Task

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ("moondream", "transformers", "photon", "openai")


# -- a backend a test registers ------------------------------------------------------------


class EchoBackend:
    """Says how big each image is: a caption a test can predict."""

    max_batch = 4

    def __init__(self, cfg: ModelConfig) -> None:
        self.name = cfg.source
        self.revision = cfg.revision
        self.closed = False

    def describe(self, images: Sequence, tasks: Sequence[Task]) -> list[list[str]]:
        return [
            [f"A {t.kind} echo of a {im.width}x{im.height} image" for t in tasks] for im in images
        ]

    def close(self) -> None:
        self.closed = True


class EchoSpec(BackendSpec):
    name = "echo-test"
    default_revision = "r1"

    def __init__(self, *, checks_weights: bool = False, missing: tuple[str, ...] = ()) -> None:
        self.checks_weights = checks_weights
        self.missing = missing
        self.loads = 0

    def load(self, cfg: ModelConfig) -> EchoBackend:
        self.loads += 1
        return EchoBackend(cfg)

    def config_problem(self, cfg: ModelConfig, given: Collection[str]) -> str | None:
        if "id" not in given:
            return "model.id: missing; backend 'echo-test' needs an id"
        return super().config_problem(cfg, given)

    def missing_files(self, cfg: ModelConfig) -> list[str]:
        return list(self.missing)


@pytest.fixture
def echo() -> Iterator[EchoSpec]:
    spec = EchoSpec()
    register(spec)
    try:
        yield spec
    finally:
        unregister(spec.name)


def _config_file(tmp_path: Path, model: dict) -> Path:
    p = tmp_path / "config.yaml"
    data = {
        "model": model,
        "database": str(tmp_path / "index.db"),
        "log": {"level": "warning"},
    }
    p.write_text(yaml.safe_dump(data))
    return p


# -- the registry --------------------------------------------------------------------------


def test_the_builtins_are_registered_in_order_without_importing_torch():
    # In a fresh interpreter: validating a config asks the registry, which must stay light.
    code = textwrap.dedent("""
        import sys
        from watcher.backends.registry import backend_names, get_backend
        from watcher.config import parse_config
        for name in backend_names():
            model = {"backend": name, "id": "x/y", "base_url": "http://127.0.0.1:1/v1"}
            print(name, parse_config({"model": model}).model.backend)
        print("torch imported:", "torch" in sys.modules)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "moondream moondream",
        "transformers transformers",
        "photon photon",
        "openai openai",
        "torch imported: False",
    ]


def test_registry_names_each_spec_by_its_backend_name():
    assert backend_names()[: len(BUILTIN)] == BUILTIN
    assert [get_backend(n).name for n in BUILTIN] == list(BUILTIN)
    with pytest.raises(ModelUnavailable, match="unknown backend 'llava'"):
        get_backend("llava")


def test_unknown_backend_is_a_config_error_listing_the_valid_names():
    with pytest.raises(ConfigError) as e:
        parse_config({"model": {"backend": "llava"}}, "c.yaml")
    assert str(e.value) == (
        "c.yaml: model.backend: expected one of moondream, transformers, photon, openai; "
        "got 'llava'"
    )


def test_unknown_backend_exits_2_through_the_cli(tmp_path):
    cfg = _config_file(tmp_path, {"backend": "llava"})
    (tmp_path / "pics").mkdir()
    code, out, err = run_cli("--config", str(cfg), "caption", str(tmp_path / "pics"))
    assert code == 2 and out == ""
    assert err.strip() == (
        f"watcher: config error: {cfg}: model.backend: expected one of moondream, "
        "transformers, photon, openai; got 'llava'"
    )


def test_a_taken_name_is_refused(echo):
    with pytest.raises(ValueError, match="'echo-test' is already registered"):
        register(EchoSpec())
    with pytest.raises(ValueError, match="'moondream' is already registered"):
        register(type("Again", (BackendSpec,), {"name": "moondream"})())


# -- each backend's config rules -----------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        # transformers: a model must be named; remote code only at a pinned revision
        ({"backend": "transformers"}, "model.id: missing; backend 'transformers' needs id or path"),
        (
            {"backend": "transformers", "id": "a/b", "trust_remote_code": True},
            "model.revision: remote code is only trusted on a pinned revision (a tag or commit "
            "sha); got none",
        ),
        (
            {"backend": "transformers", "id": "a/b", "trust_remote_code": True, "revision": "main"},
            "model.revision: expected a tag or commit sha, not a branch; got 'main'",
        ),
        # moondream: always remote code
        (
            {"backend": "moondream", "revision": None},
            "model.revision: remote code is only trusted on a pinned revision (a tag or commit "
            "sha); got none",
        ),
        (
            {"backend": "moondream", "revision": "master"},
            "model.revision: expected a tag or commit sha, not a branch; got 'master'",
        ),
        # photon: remote code only when asked for
        (
            {"backend": "photon", "trust_remote_code": True},
            "model.revision: remote code is only trusted on a pinned revision (a tag or commit "
            "sha); got none",
        ),
    ],
)
def test_each_backend_refuses_its_own_bad_configs(model, problem):
    with pytest.raises(ConfigError) as e:
        parse_config({"model": model}, "c.yaml")
    assert str(e.value) == f"c.yaml: {problem}"


@pytest.mark.parametrize(
    ("model", "revision"),
    [
        ({"backend": "moondream"}, DEFAULT_MOONDREAM_REVISION),
        ({"backend": "moondream", "path": "/models/md", "revision": None}, None),
        ({"backend": "transformers", "id": "a/b"}, None),
        ({"backend": "transformers", "path": "/models/x", "revision": "main"}, "main"),
        ({"backend": "photon"}, None),
        ({"backend": "photon", "revision": "2025-06-21"}, "2025-06-21"),
    ],
)
def test_each_backend_accepts_its_good_configs_with_its_default_revision(model, revision):
    assert parse_config({"model": model}).model.revision == revision


def test_a_registered_backend_validates_its_own_config(echo):
    with pytest.raises(ConfigError) as e:
        parse_config({"model": {"backend": "echo-test"}}, "c.yaml")
    assert str(e.value) == "c.yaml: model.id: missing; backend 'echo-test' needs an id"
    model = parse_config({"model": {"backend": "echo-test", "id": "echo/v1"}}).model
    assert (model.backend, model.id, model.revision) == ("echo-test", "echo/v1", "r1")


# -- what the index records ----------------------------------------------------------------


def test_index_name_and_revision_per_backend(tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "models--a--b" / "snapshots" / sha
    snap.mkdir(parents=True)
    plain = tmp_path / "copy"
    plain.mkdir()

    def recorded(**kw) -> tuple[str, str | None]:
        cfg = ModelConfig(**kw)
        spec = get_backend(cfg.backend)
        return spec.model_name(cfg), spec.model_revision(cfg)

    assert recorded() == ("vikhyatk/moondream2", DEFAULT_MOONDREAM_REVISION)
    assert recorded(path=str(snap)) == (str(snap), sha)
    assert recorded(path=str(plain)) == (str(plain), None)
    assert recorded(backend="transformers", path=str(plain), revision="v2") == (str(plain), "v2")
    assert recorded(backend="transformers", path=str(snap), revision="v2") == (str(snap), sha)
    assert recorded(backend="photon", revision="r") == ("vikhyatk/moondream2", "r")
    assert recorded(backend="photon", path=str(snap), revision="r") == (str(snap), None)


# -- a registered backend, end to end ------------------------------------------------------


def test_a_registered_backend_loads_in_process_and_captions_a_folder(tmp_path, echo):
    model = {"backend": "echo-test", "id": "echo/v1", "isolate": False, "max_tokens": 20}
    cfg = parse_config({"model": model}).model
    loaded = load_backend(cfg)
    assert isinstance(loaded, EchoBackend) and loaded.name == "echo/v1"
    opened = open_backend(cfg)  # isolate: false, so no child process
    assert isinstance(opened, EchoBackend) and echo.loads == 2

    pics = tmp_path / "pics"
    distinct_image(1, pics / "a.jpg", size=(40, 30))
    cfg_file = _config_file(tmp_path, model)
    code, out, err = run_cli("--config", str(cfg_file), "caption", str(pics))
    assert code == 0, out + err
    assert (pics / "a.txt").read_text() == "A short echo of a 40x30 image\n"
    con = sqlite3.connect(tmp_path / "index.db")
    row = con.execute("SELECT model, revision FROM images").fetchone()
    con.close()
    assert row == ("echo/v1", "r1")
    # What the spec says the index holds is what the backend recorded: nothing to redo.
    code, out, _ = run_cli("--config", str(cfg_file), "caption", str(pics))
    assert (code, out.strip()) == (0, "0 new, 1 up to date")

    unregister("echo-test")
    assert "echo-test" not in backend_names()
    code, _, err = run_cli("--config", str(cfg_file), "caption", str(pics))
    assert (
        code == 2
        and "expected one of moondream, transformers, photon, openai; got 'echo-test'" in err
    )


# -- the weights check before start --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "checked"), [("moondream", True), ("transformers", True), ("photon", False)]
)
def test_which_builtins_check_their_weights_before_start(name, checked):
    assert get_backend(name).checks_weights is checked


def test_a_backend_that_checks_weights_fails_before_loading(tmp_path, monkeypatch):
    # Offline (HF_HUB_OFFLINE=1 in the tests) with a file missing: one message, no load.
    spec = EchoSpec(checks_weights=True, missing=("model echo/v1 at revision r1",))
    register(spec)
    try:
        cfg = ModelConfig(backend="echo-test", id="echo/v1", revision="r1", isolate=False)
        with pytest.raises(ModelUnavailable, match="model echo/v1 at revision r1 not found"):
            load_backend(cfg)
        pics = tmp_path / "pics"
        distinct_image(1, pics / "a.jpg")
        cfg_file = _config_file(tmp_path, {"backend": "echo-test", "id": "echo/v1"})
        code, out, err = run_cli("--config", str(cfg_file), "caption", str(pics))
        assert code == 2 and "model echo/v1 at revision r1 not found in the Hugging Face" in err
        assert spec.loads == 0 and not (pics / "a.txt").exists()
        # The same backend, not checking: it loads.
        spec.checks_weights = False
        assert isinstance(load_backend(cfg), EchoBackend) and spec.loads == 1
    finally:
        unregister("echo-test")


# -- plugins: the watcher.backends entry point group ---------------------------------------


def test_an_installed_plugin_is_a_backend_and_a_broken_one_is_skipped(tmp_path):
    site = tmp_path / "site"
    (site / "echo_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "echo_plugin-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: echo-plugin\nVersion: 1.0\n"
    )
    (site / "echo_plugin-1.0.dist-info" / "entry_points.txt").write_text(
        "[watcher.backends]\necho = echo_plugin:EchoSpec\nbroken = no_such_module:SPEC\n"
    )
    (site / "echo_plugin.py").write_text(
        textwrap.dedent("""
            from watcher.backends.registry import BackendSpec

            class EchoSpec(BackendSpec):
                name = "echo"

                def load(self, cfg):
                    return "loaded " + cfg.id
        """)
    )
    code = textwrap.dedent("""
        from watcher.backends import load_backend
        from watcher.backends.registry import backend_names
        from watcher.config import parse_config
        print(backend_names())
        print(load_backend(parse_config({"model": {"backend": "echo", "id": "e/1"}}).model))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    *logged, names, loaded = proc.stdout.splitlines()
    assert (names, loaded) == (
        "('moondream', 'transformers', 'photon', 'openai', 'echo')",
        "loaded e/1",
    )
    # The broken plugin is left out, with a warning that names it (structlog's default
    # output, unconfigured in this script, is stdout).
    assert len(logged) == 1 and "backend plugin failed to load" in logged[0]
    assert "backend=broken" in logged[0] and "No module named 'no_such_module'" in logged[0]
