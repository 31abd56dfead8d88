"""Config loading: defaults, the example file, and error messages that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from watcher.config import Config, ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def test_no_config_file_gives_defaults(tmp_path: Path) -> None:
    cfg = Config()
    assert cfg.model.backend == "moondream"
    assert cfg.model.revision == "2025-06-21"
    assert cfg.folders == ()


def test_example_config_loads_and_documents_every_key(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "config.example.yaml")
    assert cfg.folders, "the example watches at least one folder"
    text = (ROOT / "config.example.yaml").read_text()
    import dataclasses

    from watcher.config import FolderConfig, ModelConfig

    for f in dataclasses.fields(ModelConfig):
        assert f"{f.name}:" in text, f"model.{f.name} is not documented in the example"
    for f in dataclasses.fields(FolderConfig):
        assert f"{f.name}:" in text, f"folder key {f.name} is not documented in the example"
    for key in (
        "database",
        "decode_threads",
        "max_pixels",
        "max_side",
        "max_attempts",
        "retry_backoff",
        "log",
        "defaults",
    ):
        assert f"{key}:" in text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"folders": [{"path": "/a"}, {"path": "/b", "task": "detailed"}]},
            "cfg.yaml: folders[1].task: expected one of prompt, short, normal, long, query; "
            "got 'detailed'",
        ),
        ({"folders": [{"task": "short"}]}, "cfg.yaml: folders[0].path: missing"),
        (
            {"folders": [{"path": "/a", "overwrite": "sometimes"}]},
            "folders[0].overwrite: expected one of never, ours, always; got 'sometimes'",
        ),
        (
            {"folders": [{"path": "/a", "settle_seconds": "soon"}]},
            "folders[0].settle_seconds: expected a number >= 0; got 'soon'",
        ),
        (
            {"folders": [{"path": "/a", "polling": "yes"}]},
            "folders[0].polling: expected true or false; got 'yes'",
        ),
        ({"folders": [{"path": "/a", "colour": 1}]}, "folders[0].colour: unknown key"),
        (
            {"folders": [{"path": "/a", "task": "query"}]},
            "folders[0].question: missing; task 'query' needs a question",
        ),
        (
            {"folders": [{"path": "/a", "sidecar": "captions/{stem}.txt"}]},
            "folders[0].sidecar: expected a file name pattern",
        ),
        ({"model": {"batch_size": 0}}, "model.batch_size: expected an integer >= 1; got 0"),
        (
            {"model": {"backend": "moondream", "revision": "main"}},
            "model.revision: expected a tag or commit sha, not a branch; got 'main'",
        ),
        (
            {"model": {"backend": "moondream", "revision": None}},
            "model.revision: remote code is only trusted on a pinned revision",
        ),
        ({"model": {"backend": "gpt"}}, "model.backend: expected one of moondream"),
        ({"log": {"level": "loud"}}, "log.level: expected one of debug, info"),
        ({"max_pixels": True}, "max_pixels: expected an integer >= 1; got True"),
        ({"defaults": {"task": "poem"}}, "defaults.task: expected one of prompt"),
        ([1, 2], "expected a mapping at the top level"),
    ],
)
def test_config_errors_name_file_key_and_expectation(data, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(data, "cfg.yaml")
    assert message in str(e.value)


def test_defaults_apply_to_folders_and_folders_override(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "defaults": {"task": "prompt", "prefix": "mylora"},
            "folders": [{"path": "a"}, {"path": "/b", "task": "long"}],
        },
        "cfg.yaml",
        base_dir=tmp_path,
    )
    a, b = cfg.folders
    assert a.path == tmp_path / "a" and a.task == "prompt" and a.prefix == "mylora"
    assert b.task == "long" and b.prefix == "mylora"
    assert cfg.folder_for(tmp_path / "a" / "x" / "y.jpg") == a


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("folders: [\n")
    with pytest.raises(ConfigError, match=str(p)):
        load_config(p)


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_database_default_is_in_user_data_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WATCHER_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert Config().database == tmp_path / "data" / "moondream-watcher" / "index.db"
