"""Issue 18, deployment: tools/index.py saves a FAISS index of a folder of photos (any depth, JPEG and
PNG, non-square, an unreadable file among them) or a shard split; tools/search.py loads it and
searches by text and by image, one JSON line per hit, without rebuilding anything."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.fixtures import make_photo_folder, make_synthetic_shards
from tools import index as index_tool
from tools import search as search_tool


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """(photo folder, captions CSV, a saved untrained student) with one broken file in the folder."""
    root = tmp_path_factory.mktemp("photos")
    images, table = make_photo_folder(root, count=20)
    (images / "trip1" / "broken.jpg").write_bytes(b"not a jpeg at all")
    shards = make_synthetic_shards(root / "shards", train=16, val=8, maxcount=8, tokenizer=True, image_size=32)
    from train.models.presets import build_student
    torch.manual_seed(0)
    student = root / "student"
    build_student("student-tiny", tokenizer_dir=str(shards / "tokenizer")).save_pretrained(student)
    return images, table, student, shards


def hits_of(capsys, argv) -> list:
    capsys.readouterr()  # what came before (tools/index.py's summary line)
    assert search_tool.main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_folder_index_is_saved_and_searched_by_text_and_image(photos, tmp_path, capsys):
    images, table, student, _ = photos
    out = tmp_path / "index"
    assert index_tool.main(["--student", str(student), "--images", str(images), "--out", str(out),
                            "--captions", str(table), "--batch-size", "4"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"] == 20 and manifest["skipped"] == {"bad_image": 1} and manifest["kind"] == "flat"
    assert manifest["captions"] == 8  # 4 colours x 2 shapes, each caption once
    files = {p.name for p in out.iterdir()}
    assert files == {"manifest.json", *manifest["files"].values()}  # no spill, no .tmp left
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    hits = hits_of(capsys, ["--index", str(out), "--text", "a red disc", "--text", "a blue box", "--top", "3"])
    assert [h["rank"] for h in hits] == [1, 2, 3, 1, 2, 3]
    assert all(Path(h["path"]).is_file() and h["key"] == Path(h["path"]).relative_to(images).as_posix()
               for h in hits)
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]

    query = images / "trip2" / "img008.jpg"
    hits = hits_of(capsys, ["--index", str(out), "--image", str(query), "--top", "2",
                            "--png", str(tmp_path / "sheet.png"), "--html", str(tmp_path / "sheet.html")])
    assert hits[0]["key"] == "trip2/img008.jpg" and hits[0]["score"] > 0.999  # itself, cosine 1
    assert (tmp_path / "sheet.png").stat().st_size > 0 and "<img" in (tmp_path / "sheet.html").read_text()
    captions = hits_of(capsys, ["--index", str(out), "--image", str(query), "--against", "captions", "--top", "8"])
    assert sorted(h["caption"] for h in captions) == sorted({line.split(",", 1)[1] for line in
                                                             table.read_text().splitlines()[1:]})
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # loaded, never rebuilt


def test_rebuild_replaces_the_old_files_ivf_and_shards(photos, tmp_path, capsys):
    images, _, student, shards = photos
    out = tmp_path / "index"
    assert index_tool.main(["--student", str(student), "--images", str(images), "--out", str(out)]) == 0
    first = json.loads((out / "manifest.json").read_text())["files"]["images"]
    assert index_tool.main(["--student", str(student), "--images", str(images), "--out", str(out),
                            "--ivf-above", "10", "--nlist", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "ivf" and manifest["nlist"] == 2 and not (out / first).exists()
    hits = hits_of(capsys, ["--index", str(out), "--image", str(images / "trip0" / "img000.png"), "--top", "1"])
    assert hits[0]["key"] == "trip0/img000.png"

    from_shards = tmp_path / "shard_index"
    assert index_tool.main(["--student", str(student), "--shards", str(shards), "--split", "val",
                            "--out", str(from_shards)]) == 0
    hits = hits_of(capsys, ["--index", str(from_shards), "--text", "a red circle", "--top", "8",
                            "--png", str(tmp_path / "shards.png")])
    assert len(hits) == 8 and all("#" in h["path"] for h in hits)


def test_bad_input_is_one_line_exit_2(photos, tmp_path, capsys):
    images, _, student, _ = photos
    out = tmp_path / "index"
    assert index_tool.main(["--student", str(student), "--images", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert index_tool.main(["--student", str(tmp_path), "--images", str(images), "--out", str(out)]) == 2
    assert index_tool.main(["--student", str(student), "--images", str(images), "--out", str(out)]) == 0
    other = tmp_path / "other_student"
    from train.models.presets import load_student
    model = load_student(student)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(other)
    assert search_tool.main(["--index", str(out), "--text", "x", "--student", str(other)]) == 2
    assert search_tool.main(["--index", str(out), "--image", str(images), "--against", "captions"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 4 and "not a folder" in errors[0] and "not the one the index was built with" in errors[2]
    assert "no captions indexed" in errors[3]
