"""`watcher export`: CSV through the csv module, JSON Lines, a loadable HF imagefolder, kohya."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import pytest
from daemon_harness import run_cli
from images import distinct_image
from rows import image_row

from watcher.index import Index, connect, transaction

TRICKY = [
    'a red bicycle, leaning on a wall, "vintage"',
    "two lines\nof caption, with a comma",
    "plain",
    'only "quotes"',
    "ünïcödé, 日本語, emoji 🚲",
    "carriage\r\nreturn and ; semicolon",
]


def _index(db: Path, images: dict[Path, str], task: str = "short") -> None:
    """Rows as the writer leaves them (no model needed to export)."""
    d = connect(db)
    index = Index(d)
    now = time.time()
    with transaction(d):
        for i, (path, caption) in enumerate(sorted(images.items())):
            index.upsert(
                image_row(
                    path,
                    caption,
                    task,
                    sha256=f"{i:064x}",
                    width=96,
                    height=72,
                    model="moondream",
                    revision="2025-06-21",
                    sidecar=str(path.with_suffix(".txt")),
                    created=now,
                    updated=now,
                )
            )
    d.conn.close()


def test_csv_round_trips_commas_quotes_and_newlines(tmp_path):
    images = {tmp_path / "pics" / f"img{i}.jpg": c for i, c in enumerate(TRICKY)}
    # A file name with a comma and a quote is a field like any other.
    images[tmp_path / "pics" / 'odd, "name".jpg'] = "odd name"
    _index(tmp_path / "index.db", images)
    out = tmp_path / "captions.csv"

    code, stdout, err = run_cli(
        "--db", str(tmp_path / "index.db"), "export", "--format", "csv", "-o", str(out)
    )

    assert code == 0, err
    assert f"exported 7 rows (csv) to {out}" in err
    raw = out.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # the byte-order mark spreadsheet programs need
    with out.open(encoding="utf-8-sig", newline="") as f:
        got = {r["path"]: r for r in csv.DictReader(f)}
    assert {p: r["caption"] for p, r in got.items()} == {str(p): c for p, c in images.items()}
    first = got[str(tmp_path / "pics" / "img0.jpg")]
    assert (first["task"], first["model"], first["revision"]) == (
        "short",
        "moondream",
        "2025-06-21",
    )
    assert first["created"].endswith("+00:00") and first["width"] == "96"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".watcher-tmp")]


def test_jsonl_to_stdout_filtered_by_folder_and_query(tmp_path):
    a, b = tmp_path / "pics" / "a", tmp_path / "pics" / "b"
    _index(
        tmp_path / "index.db",
        {
            a / "1.jpg": "a red bicycle",
            a / "2.jpg": "a blue car",
            b / "3.jpg": "a red kettle",
        },
    )
    db = str(tmp_path / "index.db")

    code, out, _ = run_cli("--db", db, "export", "--format", "jsonl", "--query", "red")
    assert code == 0
    assert [json.loads(line)["path"] for line in out.splitlines()] == [
        str(a / "1.jpg"),
        str(b / "3.jpg"),
    ]
    code, out, _ = run_cli(
        "--db", db, "export", "--format", "jsonl", "--folder", str(a), "--query", "red"
    )
    assert [json.loads(line)["caption"] for line in out.splitlines()] == ["a red bicycle"]


def test_hf_export_loads_with_datasets_imagefolder(tmp_path):
    datasets = pytest.importorskip("datasets")  # the test extra installs it
    root = tmp_path / "dataset"
    images = {
        distinct_image(1, root / "a.jpg"): "a red bicycle, brick wall",
        distinct_image(2, root / "nested" / "deeper" / "b.png"): 'a "quoted" cat\non a sofa',
        distinct_image(3, root / "nested" / "c.jpg"): "ünïcödé tram",
    }
    _index(tmp_path / "index.db", images)

    code, _, err = run_cli(
        "--db", str(tmp_path / "index.db"), "export", "--format", "hf", "--folder", str(root)
    )

    assert code == 0, err
    meta = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert {m["file_name"] for m in meta} == {"a.jpg", "nested/c.jpg", "nested/deeper/b.png"}
    ds = datasets.load_dataset(
        "imagefolder", data_dir=str(root), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert set(ds.column_names) == {"image", "text"}
    assert sorted(ds["text"]) == sorted(images.values())
    sizes = {row["text"]: row["image"].size for row in ds}
    assert sizes["ünïcödé tram"] == (96, 72)


def test_hf_export_leaves_out_images_outside_the_root(tmp_path):
    root = tmp_path / "dataset"
    root.mkdir()
    _index(tmp_path / "index.db", {root / "in.jpg": "in", tmp_path / "other" / "out.jpg": "out"})

    code, _, err = run_cli(
        "--db", str(tmp_path / "index.db"), "export", "--format", "hf", "--out", str(root)
    )

    assert code == 0
    assert f"left out: {tmp_path / 'other' / 'out.jpg'}: not under the dataset root" in err
    assert json.loads((root / "metadata.jsonl").read_text()) == {
        "file_name": "in.jpg",
        "text": "in",
    }


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_kohya_export_is_valid_toml_with_our_caption_extension(tmp_path):
    import tomllib

    root = tmp_path / "lora"
    images = {root / "a" / "1.jpg": "sks dog, grass", root / "b" / "2.jpg": 'sks "dog", snow'}
    _index(tmp_path / "index.db", images, task="prompt")
    out = tmp_path / "train"
    out.mkdir()

    code, _, err = run_cli(
        "--db",
        str(tmp_path / "index.db"),
        "export",
        "--format",
        "kohya",
        "--folder",
        str(root),
        "--out",
        str(out),
    )

    assert code == 0, err
    cfg = tomllib.loads((out / "dataset.toml").read_text(encoding="utf-8"))
    assert cfg["general"]["caption_extension"] == ".txt"
    dirs = [s["image_dir"] for s in cfg["datasets"][0]["subsets"]]
    assert dirs == [str(root / "a"), str(root / "b")]
    fine = tomllib.loads((out / "dataset-finetune.toml").read_text(encoding="utf-8"))
    meta_file = fine["datasets"][0]["subsets"][0]["metadata_file"]
    meta = json.loads(Path(meta_file).read_text(encoding="utf-8"))
    assert meta == {str(p): {"caption": c} for p, c in images.items()}


def test_usage_errors_exit_2(tmp_path):
    _index(tmp_path / "index.db", {tmp_path / "a.jpg": "x"})
    db = str(tmp_path / "index.db")

    code, _, err = run_cli("--db", db, "export", "--format", "hf")
    assert code == 2 and "needs --out DIR" in err
    code, _, err = run_cli("--db", db, "export", "--format", "kohya", "-o", "x.toml")
    assert code == 2 and "use --out DIR" in err
    code, _, err = run_cli("--db", db, "export", "--format", "hf", "--folder", str(tmp_path / "no"))
    assert code == 2 and "not a folder" in err
    code, _, err = run_cli("--db", str(tmp_path / "none.db"), "export", "--format", "csv")
    assert code == 1 and "no index yet" in err
