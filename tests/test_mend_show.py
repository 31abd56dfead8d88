"""`watcher show IMAGE` lists its xmp/embed outputs beside its sidecar: which, state, when."""

from __future__ import annotations

import datetime
import json
import shutil
import time

from conftest import require
from daemon_harness import cli_config, run_cli
from images import distinct_image


def _utc(seconds: float) -> str:
    when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M:%S") + " UTC"


def test_show_lists_the_xmp_output_written_and_when(tmp_path, tiny_llava):
    require("exiftool", shutil.which("exiftool") is not None, "apt install libimage-exiftool-perl")
    image = distinct_image(31, tmp_path / "pics" / "a.jpg")
    cfg = cli_config(
        tmp_path, tiny_llava, folders=[{"path": str(image.parent), "outputs": ["txt", "xmp"]}]
    )
    before = time.time()
    code, out, _ = run_cli("--config", str(cfg), "caption", str(image.parent))
    after = time.time()
    assert code == 0, out

    code, out, err = run_cli("--config", str(cfg), "show", str(image), "--json")
    assert code == 0, err
    (rec,) = json.loads(out)["output_records"]
    xmp = str(image) + ".xmp"
    assert (rec["output"], rec["target"], rec["state"], rec["reason"]) == (
        "xmp",
        xmp,
        "written",
        None,
    )
    assert before <= rec["updated"] <= after

    code, out, err = run_cli("--config", str(cfg), "show", str(image))
    assert code == 0, err
    lines = out.splitlines()
    # Beside the sidecar's lines, before the captions.
    where = lines.index(f"  xmp output: written ({xmp}), {_utc(rec['updated'])}")
    assert lines[where - 1].startswith("  sidecar text: ")


def test_show_lists_a_pending_output_with_its_reason(tmp_path, tiny_llava, monkeypatch):
    image = distinct_image(32, tmp_path / "pics" / "a.jpg")
    cfg = cli_config(
        tmp_path,
        tiny_llava,
        folders=[{"path": str(image.parent), "outputs": ["txt", "xmp", "embed"]}],
    )
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # exiftool is not installed
    code, out, _ = run_cli("--config", str(cfg), "caption", str(image.parent))
    assert code == 0, out

    code, out, err = run_cli("--config", str(cfg), "show", str(image), "--json")
    assert code == 0, err
    records = json.loads(out)["output_records"]
    assert [(r["output"], r["state"]) for r in records] == [
        ("embed", "pending"),
        ("xmp", "pending"),
    ]
    assert all("exiftool is not installed" in r["reason"] for r in records)

    code, out, err = run_cli("--config", str(cfg), "show", str(image))
    assert code == 0, err
    for r in records:
        target = f" ({r['target']})" if r["target"] else ""
        line = f"  {r['output']} output: pending{target}, {_utc(r['updated'])}: {r['reason']}"
        assert line in out.splitlines()
    # The sidecar itself was written: its lines are unchanged.
    assert f"  sidecar: {image.with_suffix('.txt')}" in out


def test_show_of_an_image_without_other_outputs_lists_none(tmp_path, tiny_llava):
    image = distinct_image(33, tmp_path / "pics" / "a.jpg")
    cfg = cli_config(tmp_path, tiny_llava, folders=[{"path": str(image.parent)}])
    code, out, _ = run_cli("--config", str(cfg), "caption", str(image.parent))
    assert code == 0, out

    code, out, err = run_cli("--config", str(cfg), "show", str(image), "--json")
    assert code == 0, err
    assert json.loads(out)["output_records"] == []
    code, out, err = run_cli("--config", str(cfg), "show", str(image))
    assert " output: " not in out
