"""The model in a child process (model.isolate): same outputs, crashes contained, no orphans."""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml
from daemon_harness import Daemon, children, wait_for, write_config
from images import distinct_image
from PIL import Image

from watcher.backends import ModelUnavailable, load_backend, open_backend
from watcher.backends.process import ModelProcess
from watcher.cli import main
from watcher.config import LogConfig, ModelConfig
from watcher.tasks import Task


def _model(path: Path, **kw) -> ModelConfig:
    return ModelConfig(backend="transformers", path=str(path), revision=None, max_tokens=6, **kw)


def _images(tmp_path: Path, n: int) -> list[Image.Image]:
    out = []
    for i in range(n):
        p = distinct_image(i, tmp_path / f"{i}.jpg")
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone too
    except FileNotFoundError:
        return False


def test_child_gives_the_same_outputs_as_in_process(tmp_path, tiny_llava) -> None:
    images = _images(tmp_path, 3)
    tasks = (Task("short", max_tokens=6), Task("prompt", max_tokens=6))
    here = load_backend(_model(tiny_llava))
    expected = here.describe(images, tasks)
    here.close()

    backend = open_backend(_model(tiny_llava), LogConfig(format="json"))
    try:
        assert isinstance(backend, ModelProcess)
        assert backend.pid is not None and backend.pid != os.getpid()
        assert _alive(backend.pid)
        assert backend.describe(images, tasks) == expected
        assert backend.describe(images[:1], tasks) == expected[:1]
        assert backend.max_batch == 8 and backend.revision is None
        assert backend.device == "cpu"  # said by the child: where its model computes
    finally:
        backend.close()
    assert not _alive(backend.pid), "close() leaves no model process behind"


def test_isolate_false_runs_in_this_process(tmp_path, tiny_llava) -> None:
    before = set(children(os.getpid()))
    backend = open_backend(_model(tiny_llava, isolate=False))
    try:
        assert not isinstance(backend, ModelProcess)
        [[caption]] = backend.describe(_images(tmp_path, 1), [Task("short", max_tokens=6)])
        assert len(caption.split()) == 6  # the tiny model's words, made here
        assert set(children(os.getpid())) <= before, "a model process was started"
    finally:
        backend.close()


def test_model_that_cannot_load_says_why(tmp_path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ModelUnavailable) as e:
        open_backend(_model(broken))
    assert str(broken) in str(e.value)


def _crashing_moondream(tiny_moondream: Path, dest: Path, size: tuple[int, int]) -> Path:
    """The tiny Moondream with model code that dies by SIGSEGV on images of `size`."""
    shutil.copytree(tiny_moondream, dest)
    code = dest / "modeling_tinymoondream.py"
    text = code.read_text()
    hook = (
        f"        if getattr(image, 'size', None) == {size!r}:\n"
        "            import os, signal\n"
        "            os.kill(os.getpid(), signal.SIGSEGV)\n"
    )
    marker = "    def encode_image(self, image):\n"
    assert marker in text
    code.write_text(text.replace(marker, marker + hook, 1))
    return dest


@pytest.mark.slow  # the model process restarts for each crash while the batch is split
def test_a_crash_in_model_code_fails_only_that_image(tmp_path, tiny_moondream) -> None:
    model = _crashing_moondream(tiny_moondream, tmp_path / "crashing-moondream", (13, 17))
    pics = tmp_path / "pics"
    # Two good images are enough to share the crashing batch; each more costs a restart.
    good = 2
    for i in range(good):
        distinct_image(i, pics / f"{i}.jpg")
    Image.new("RGB", (13, 17), (200, 10, 10)).save(pics / "bad.png")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "backend": "moondream",
                    "path": str(model),
                    "max_tokens": 9,
                    "batch_size": 8,
                },
                "database": str(tmp_path / "index.db"),
                "log": {"format": "json"},
            }
        )
    )

    out, err = io.StringIO(), io.StringIO()
    code = main(["--config", str(cfg), "caption", str(pics)], out=out, err=err)

    assert code == 1, err.getvalue()
    lines = out.getvalue().splitlines()
    assert f"{good} new, 0 up to date, 1 failed" in lines
    assert (
        f"failed: {pics / 'bad.png'}: model error: ModelCrashed: the model process died "
        "(killed by SIGSEGV) running a batch of 1"
    ) in lines
    for i in range(good):
        assert (pics / f"{i}.txt").read_text().strip()
    assert not (pics / "bad.txt").exists()
    assert sorted(p.name for p in pics.iterdir()) == sorted(
        [f"{i}.jpg" for i in range(good)] + [f"{i}.txt" for i in range(good)] + ["bad.png"]
    )

    out = io.StringIO()
    assert main(["--config", str(cfg), "status"], out=out, err=io.StringIO()) == 0
    assert "model process died (killed by SIGSEGV)" in out.getvalue()


def test_killing_the_daemon_takes_its_model_process_along(tmp_path, tiny_llava) -> None:
    pics = tmp_path / "pics"
    pics.mkdir()
    cfg = write_config(
        tmp_path,
        tiny_llava,
        [{"path": str(pics), "settle_seconds": 0.1}],
        model={"backend": "transformers", "path": str(tiny_llava), "isolate": True},
    )
    d = Daemon(cfg, tmp_path).start()
    try:
        distinct_image(0, pics / "a.jpg")
        wait_for(lambda: d.captioned(pics / "a.jpg"), 60, "a caption from the child")
        [child] = children(d.proc.pid)
        assert _alive(child)
        d.kill9()
        wait_for(lambda: not _alive(child), 10, "the model process to die with the daemon")
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.kill9()
    con = sqlite3.connect(tmp_path / "index.db")
    assert con.execute("SELECT state FROM jobs").fetchall() == [("done",)]
