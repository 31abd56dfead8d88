"""Issue 12's new commands and conventions, through the real CLI: show, prune, init,
--force, recaption, --dry-run, caption while the daemon runs, help, --version, completion."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from daemon_harness import Daemon, run_cli, write_config
from images import distinct_image
from test_cli import config, env, row, summary

import watcher.backends as backends


def _captioned(tmp_path: Path, tiny_llava: Path, n: int = 2) -> tuple[Path, Path]:
    pics = tmp_path / "pics"
    for i in range(n):
        distinct_image(i, pics / f"{'ab'[i]}.jpg")
    cfg = config(tmp_path, tiny_llava)
    code, out, _ = run_cli("--config", str(cfg), "caption", str(pics))
    assert code == 0, out
    return pics, cfg


# -- show


def test_show_prints_sidecar_caption_model_and_state(tmp_path, tiny_llava):
    pics, cfg = _captioned(tmp_path, tiny_llava)
    r = row(tmp_path / "index.db", pics / "a.jpg")
    code, out, _ = run_cli("--config", str(cfg), "show", str(pics / "a.jpg"))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == str(pics / "a.jpg")
    assert "  state: captioned" in lines
    assert f"  sidecar: {pics / 'a.txt'}" in lines
    assert f"  sidecar text: {r['caption']}" in lines
    assert f"  caption (index): {r['caption']}" in lines
    assert any(
        ln.startswith(f"  model: {tiny_llava}") and ln.endswith(", task short") for ln in lines
    ), out

    (pics / "a.txt").write_text("edited\n")
    code, out, _ = run_cli("--config", str(cfg), "show", str(pics / "a.jpg"), "--json")
    info = json.loads(out)
    assert (info["sidecar_text"], info["caption"], info["task"]) == (
        "edited\n",
        r["caption"],
        "short",
    )
    assert info["model"] == str(tiny_llava) and info["outputs"] == {"short": r["caption"]}

    code, _, err = run_cli("--config", str(cfg), "show", str(pics / "nope.jpg"))
    assert code == 1 and "is not in the index" in err


# -- prune and status


def test_prune_removes_rows_of_missing_images_and_status_counts_them(tmp_path, tiny_llava):
    pics, cfg = _captioned(tmp_path, tiny_llava)
    moved = tmp_path / "moved"
    shutil.move(str(pics), str(moved))  # the whole folder moved away (or unmounted)
    code, out, _ = run_cli("--config", str(cfg), "status")
    assert (
        "index rows of missing files: 2 (their folders are gone; `watcher prune` removes "
        "them)" in out
    )

    code, out, _ = run_cli("--config", str(cfg), "prune", "--dry-run")
    assert code == 0
    assert out.splitlines()[0] == (
        "would remove 2 index rows and 2 jobs of images that no longer exist"
    )
    assert f"  {pics / 'a.jpg'}" in out.splitlines()
    code, out, _ = run_cli("--config", str(cfg), "prune")
    assert out.splitlines()[0] == "removed 2 index rows and 2 jobs of images that no longer exist"
    code, out, _ = run_cli("--config", str(cfg), "status")
    assert "images indexed: 0" in out and "missing files" not in out
    code, out, _ = run_cli("--config", str(cfg), "prune")
    assert out.splitlines()[0] == "removed 0 index rows and 0 jobs of images that no longer exist"


# -- init


def test_init_writes_a_commented_config_with_the_defaults(tmp_path):
    from watcher.config import Config, load_config

    target = tmp_path / "conf" / "config.yaml"
    pics = tmp_path / "pics"
    pics.mkdir()
    code, out, _ = run_cli("--config", str(target), "init", str(pics))
    assert (code, out) == (0, f"wrote {target}: 1 folder; edit it, then `watcher run`\n")
    text = target.read_text()
    assert "# moondream-watcher configuration, written by `watcher init`" in text
    cfg = load_config(target)
    assert [f.path for f in cfg.folders] == [pics]
    defaults = Config()
    assert (cfg.model, cfg.max_pixels, cfg.log) == (
        defaults.model,
        defaults.max_pixels,
        defaults.log,
    )
    assert cfg.folders[0] == defaults.with_folders([pics]).folders[0]

    code, _, err = run_cli("--config", str(target), "init")
    assert code == 2 and "exists; not replaced (--force replaces it)" in err
    assert load_config(target).folders  # untouched
    code, out, _ = run_cli("--config", str(target), "init", "--force")
    assert code == 0 and "0 folders" in out and load_config(target).folders == ()


# -- --force, recaption, --dry-run


def test_caption_force_runs_the_model_again_under_the_overwrite_policy(tmp_path, tiny_llava):
    pics, cfg = _captioned(tmp_path, tiny_llava)
    (pics / "b.txt").write_text("mine\n")
    first = (pics / "a.txt").read_text()
    code, out, _ = run_cli("--config", str(cfg), "caption", "--force", str(pics))
    assert code == 0, out
    assert summary(out) == (
        "0 new, 2 captioned again (other settings or --force), 0 up to "
        "date, 1 existing sidecar left alone, 0 failed"
    )
    assert "no model work" not in out  # the model really ran again
    assert (pics / "a.txt").read_text() == first  # deterministic model: same text
    assert (pics / "b.txt").read_text() == "mine\n"

    code, out, _ = run_cli(
        "--config", str(cfg), "caption", "--force", "--overwrite", "always", str(pics)
    )
    assert code == 0 and "left alone" not in out, out
    assert (pics / "b.txt").read_text() == row(tmp_path / "index.db", pics / "b.jpg")[
        "caption"
    ] + "\n"


def test_recaption_paths_folder_and_query(tmp_path, tiny_llava):
    pics, cfg = _captioned(tmp_path, tiny_llava)
    code, out, _ = run_cli("--config", str(cfg), "recaption", str(pics / "a.jpg"))
    assert code == 0, out
    assert summary(out).startswith(
        "0 new, 1 captioned again (other settings or --force), 1 up to date"
    )
    code, out, _ = run_cli(
        "--config", str(cfg), "recaption", "--folder", str(pics), "--task", "prompt"
    )
    assert code == 0 and "2 captioned again" in summary(out), out
    assert row(tmp_path / "index.db", pics / "b.jpg")["task"] == "prompt"
    word = row(tmp_path / "index.db", pics / "b.jpg")["caption"].split()[0].strip(",")
    code, out, _ = run_cli("--config", str(cfg), "recaption", "--query", word, "--dry-run")
    assert code == 0 and f"would caption: {pics / 'b.jpg'}" in out, out
    code, _, err = run_cli("--config", str(cfg), "recaption")
    assert code == 2 and "recaption needs images, --folder DIR or --query TEXT" in err


def test_caption_dry_run_says_what_would_happen_and_changes_nothing(
    tmp_path, tiny_llava, monkeypatch
):
    pics, cfg = _captioned(tmp_path, tiny_llava)
    distinct_image(7, pics / "new.jpg")
    (pics / "a.txt").unlink()
    monkeypatch.setattr(backends, "open_backend", lambda *a, **k: pytest.fail("model loaded"))
    code, out, _ = run_cli("--config", str(cfg), "caption", "--dry-run", str(pics))
    assert code == 0
    assert out.splitlines() == [
        "would caption 1 image (1 new, 0 changed, 0 with other settings, 0 failed before), "
        "write 1 missing sidecar from the index, forget 0 deleted images; 1 up to date",
        f"would caption: {pics / 'new.jpg'}",
        f"would write the missing sidecar of: {pics / 'a.jpg'}",
    ]
    assert not (pics / "new.txt").exists() and not (pics / "a.txt").exists()
    assert row(tmp_path / "index.db", pics / "new.jpg") == {}


# -- conventions

COMMANDS = [
    "caption",
    "recaption",
    "run",
    "serve",
    "search",
    "status",
    "retry",
    "show",
    "prune",
    "init",
    "reload",
    "model",
    "service",
    "completion",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_description_and_examples(command, capsys):
    code, out, _ = run_cli(command, "--help")
    printed = capsys.readouterr().out  # argparse prints help to sys.stdout itself
    assert code == 0
    text = out + printed
    assert "examples:\n  watcher " in text, text
    assert "--db PATH" in text and "--config PATH" in text


def test_version_and_options_after_the_subcommand(tmp_path, capsys):
    assert run_cli("--version")[0] == 0
    assert capsys.readouterr().out.strip().startswith("watcher 0.")
    db = tmp_path / "x.db"
    code, out, _ = run_cli("status", "--db", str(db))
    assert code == 0 and out.startswith(f"database: {db}\n")
    code, out, _ = run_cli("--db", str(tmp_path / "y.db"), "status", "--json")
    assert json.loads(out)["database"] == str(tmp_path / "y.db")


def test_completion_script(monkeypatch):
    # argcomplete is in the [test] extra: a missing one fails here rather than skipping.
    import argcomplete  # noqa: F401

    code, out, _ = run_cli("completion", "bash")
    assert code == 0 and "complete" in out and "watcher" in out
    monkeypatch.setitem(sys.modules, "argcomplete", None)
    code, _, err = run_cli("completion", "bash")
    assert code == 2 and "pip install 'moondream-watcher[completion]'" in err


# -- caption while the daemon runs


@pytest.mark.timeout(300)
def test_caption_hands_work_to_the_running_daemon(tmp_path, tiny_llava):
    watched = tmp_path / "watched"
    watched.mkdir()
    other = tmp_path / "other"
    for i in range(3):
        distinct_image(i, other / f"{i}.jpg")
    cfg = write_config(
        tmp_path,
        tiny_llava,
        [{"path": str(watched)}],
        model={
            "backend": "transformers",
            "path": str(tiny_llava),
            "batch_size": 8,
            "max_tokens": 6,
            "isolate": False,
        },
    )
    with Daemon(cfg, tmp_path):
        r = subprocess.run(
            [sys.executable, "-m", "watcher", "--config", str(cfg), "caption", str(other)],
            capture_output=True,
            text=True,
            env=env(),
            timeout=240,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "is using" in r.stderr and "handing it 3 images" in r.stderr
        assert "3 new, 0 up to date, 0 failed" in r.stdout
        assert sum(ln.startswith("[") and "] done: " in ln for ln in r.stdout.splitlines()) == 3
        for i in range(3):
            assert (other / f"{i}.txt").read_text().endswith("\n")
        code, out, _ = run_cli("--config", str(cfg), "caption", str(other))
        assert (code, out.strip()) == (0, "0 new, 3 up to date")
        code, _, err = run_cli("--config", str(cfg), "caption", "--task", "prompt", str(other))
        assert code == 2 and "captions with its own settings" in err


# -- the README's "Using it" examples


def test_readme_using_it_examples_run(tmp_path, tiny_llava):
    """Each example of the README's "Using it" section (as in the notes for the lead), run
    against a tiny model: exit codes and the lines they promise."""
    pics = tmp_path / "shoot"
    distinct_image(1, pics / "photo.jpg")
    distinct_image(2, pics / "other.jpg")
    cfg = config(tmp_path, tiny_llava)
    base = ("--config", str(cfg))
    assert run_cli(*base, "caption", str(pics))[0] == 0
    assert run_cli(*base, "caption", "--dry-run", str(pics))[1].startswith("would caption 0")
    word = row(tmp_path / "index.db", pics / "photo.jpg")["caption"].split()[0].strip(",")
    assert run_cli(*base, "search", word)[0] == 0
    assert json.loads(run_cli(*base, "search", word, "--json")[1])
    assert run_cli(*base, "show", str(pics / "photo.jpg"))[0] == 0
    assert run_cli(*base, "status")[0] == 0
    assert run_cli(*base, "status", "--json")[0] == 0
    assert run_cli(*base, "retry", "--all", "--dry-run")[0] == 0
    assert run_cli(*base, "retry", "--all")[0] == 0
    assert run_cli(*base, "caption", "--task", "prompt", str(pics))[0] == 0
    assert run_cli(*base, "recaption", str(pics / "photo.jpg"))[0] == 0
    assert run_cli(*base, "recaption", "--folder", str(pics), "--overwrite", "always")[0] == 0
    assert run_cli(*base, "caption", "--force", str(pics))[0] == 0
    assert run_cli(*base, "prune", "--dry-run")[0] == 0
    assert run_cli(*base, "prune")[0] == 0
    assert run_cli(*base, "model", "info")[0] == 0
    assert run_cli(*base, "reload")[0] == 1  # no daemon running: says so
    fresh = tmp_path / "fresh.yaml"
    assert run_cli("--config", str(fresh), "init", str(pics))[0] == 0
    assert yaml.safe_load(fresh.read_text())["folders"] == [{"path": str(pics)}]


def test_show_never_opens_a_pipe_or_follows_a_link_at_the_sidecar_name(tmp_path, tiny_llava):
    import os

    pics, cfg = _captioned(tmp_path, tiny_llava)
    secret = tmp_path / "secret"
    secret.write_text("not yours\n")
    (pics / "a.txt").unlink()
    os.mkfifo(pics / "a.txt")  # opening it for reading would block forever
    (pics / "b.txt").unlink()
    (pics / "b.txt").symlink_to(secret)
    for name in ("a", "b"):
        code, out, _ = run_cli("--config", str(cfg), "show", str(pics / f"{name}.jpg"), "--json")
        assert code == 0 and json.loads(out)["sidecar_text"] is None
    code, out, _ = run_cli("--config", str(cfg), "show", str(pics / "b.jpg"))
    assert f"  sidecar: {pics / 'b.txt'}  (missing, or not a regular file)" in out
    assert "not yours" not in out
