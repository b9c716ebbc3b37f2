"""tools/make_shards.py on every source, in the real input formats (tests/fixtures.py)."""
import io
import json
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from tests import fixtures
from tools import make_shards


def run(argv, capsys=None):
    code = make_shards.main([str(a) for a in argv] + ["--quiet"])
    return code


def read_split(out, split):
    """(manifest, [(json meta, PIL image, txt)]) of a written split, in shard order."""
    manifest = json.loads((out / f"{split}.json").read_text())
    samples = []
    for name in manifest["shards"]:
        with tarfile.open(out / name) as tar:
            files = {}
            for m in tar:
                key, ext = m.name.split(".", 1)
                files.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, f in files.items():
            assert set(f) == {"jpg", "txt", "json"}, f.keys()
            meta = json.loads(f["json"])
            assert meta["key"] == key
            samples.append((meta, Image.open(io.BytesIO(f["jpg"])), f["txt"].decode()))
    return manifest, samples


def test_synthetic_shards_manifest_twins_and_tokenizer(tmp_path):
    out = fixtures.make_synthetic_shards(tmp_path / "syn", train=40, val=10, test=6, maxcount=8, tokenizer=True)
    manifest, samples = read_split(out, "train")
    assert manifest["num_samples"] == 40 and manifest["num_captions"] == 200
    assert manifest["shard_counts"] == [8] * 5 and manifest["image_size"] == 32 and manifest["skipped"] == {}
    assert [m["image_id"] for m, _, _ in samples] == list(range(40))
    for (a, img, txt), (b, _, _) in zip(samples[0::2], samples[1::2]):  # twins consecutive
        assert a["group"] == b["group"] and a["twin_id"] == b["image_id"] and b["twin_id"] == a["image_id"]
        assert img.size == (32, 32) and img.mode == "RGB" and txt == a["captions"][0]
        assert a["source"]["dataset"] == "synthetic" and len(a["source"]["false_for_twin"]) == 5
    for split, n in (("val", 10), ("test", 6)):
        assert read_split(out, split)[0]["num_samples"] == n
    # val scenes are not train scenes
    train_caps = {tuple(m["captions"]) for m, _, _ in samples}
    assert not train_caps & {tuple(m["captions"]) for m, _, _ in read_split(out, "val")[1]}

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    words = {w for m, _, _ in samples for c in m["captions"] for w in c.split()}
    ids = tok(" ".join(sorted(words)))["input_ids"]
    assert tok.unk_token_id not in ids
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.pad_token_id == 0
    assert tok.tokenize("A RED Circle") == ["a", "red", "circle"]


def test_karpathy_splits_odd_modes_and_skips(tmp_path):
    path, images = fixtures.make_karpathy(tmp_path)
    out = tmp_path / "out"
    assert run(["--source", "karpathy", "--input", path, "--images", images, "--out", out]) == 0
    train, samples = read_split(out, "train")
    # restval joins train; corrupt image and blank captions are skipped and counted by reason
    assert train["skipped"] == {"unreadable_image": 1, "no_caption": 1}
    names = {m["source"]["filename"] for m, _, _ in samples}
    assert names == {"rgb.jpg", "gray.png", "rgba.png", "cmyk.jpg", "deep.png", "pal.png"}
    for meta, img, txt in samples:
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (24, 16)
        assert len(meta["captions"]) == 2 and txt == meta["captions"][0]
        assert meta["twin_id"] is None and meta["group"] is None
    assert len({m["image_id"] for m, _, _ in samples}) == 6
    assert read_split(out, "val")[0]["num_samples"] == 1 and read_split(out, "test")[0]["num_samples"] == 1
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_coco_captions(tmp_path):
    path, images = fixtures.make_coco(tmp_path)
    out = tmp_path / "out"
    assert run(["--source", "coco", "--input", path, "--images", images, "--out", out, "--split", "val",
                "--no-tokenizer"]) == 0
    manifest, samples = read_split(out, "val")
    assert manifest["skipped"] == {"no_caption": 1} and manifest["num_captions"] == 3
    assert {m["image_id"]: len(m["captions"]) for m, _, _ in samples} == {139: 2, 285: 1}
    assert all(img.mode == "RGB" for _, img, _ in samples)
    assert not (out / "tokenizer").exists()


@pytest.mark.parametrize("kind", ["tsv", "csv", "jsonl"])
def test_caption_tables(tmp_path, kind):
    path, images = fixtures.make_table(tmp_path, kind)
    out = tmp_path / "out"
    assert run(["--source", "csv", "--input", path, "--images", images, "--out", out, "--split", "train"]) == 0
    manifest, samples = read_split(out, "train")
    assert manifest["skipped"] == {"no_caption": 1, "missing_image": 1}
    got = {m["source"]["path"]: m["captions"] for m, _, _ in samples}
    assert got == {"a.jpg": ["a dog on the grass", "the dog runs"], "b.png": ["a cat, sleeping"]}
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_img2dataset_folder_is_resharded(tmp_path):
    folder = fixtures.make_img2dataset(tmp_path)
    out = tmp_path / "out"
    assert run(["--source", "img2dataset", "--input", folder, "--out", out, "--maxcount", "2"]) == 0
    manifest, samples = read_split(out, "train")
    assert manifest["num_samples"] == 5 and manifest["shard_counts"] == [2, 2, 1]
    assert manifest["skipped"] == {"unreadable_image": 1, "no_caption": 1}
    assert [m["captions"] for m, _, _ in samples] == [["a red car"], ["a gray sky"], ["a boat"], ["two boats"],
                                                       ["a harbour at night"]]
    assert samples[0][0]["source"]["url"] == "http://example.com/000000000.jpg"
    assert samples[1][1].mode == "RGB"


def test_max_side_resizes_shorter_side(tmp_path):
    path, images = fixtures.make_coco(tmp_path)
    out = tmp_path / "out"
    assert run(["--source", "coco", "--input", path, "--images", images, "--out", out, "--split", "val",
                "--max-side", "8", "--no-tokenizer"]) == 0
    _, samples = read_split(out, "val")
    assert all(img.size == (12, 8) for _, img, _ in samples)


@pytest.mark.parametrize("case", ["missing_json", "missing_images", "not_json", "wrong_format", "no_tars",
                                  "no_caption_column", "empty_table"])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    out = tmp_path / "out"
    bad = tmp_path / "bad.json"
    if case == "missing_json":
        argv = ["--source", "karpathy", "--input", tmp_path / "nope.json", "--images", tmp_path]
    elif case == "missing_images":
        path, _ = fixtures.make_coco(tmp_path)
        argv = ["--source", "coco", "--input", path, "--images", tmp_path / "no_such_dir"]
    elif case == "not_json":
        bad.write_text("{not json")
        argv = ["--source", "coco", "--input", bad, "--images", tmp_path]
    elif case == "wrong_format":
        bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}]}))  # no annotations
        argv = ["--source", "coco", "--input", bad, "--images", tmp_path]
    elif case == "no_tars":
        (tmp_path / "empty").mkdir()
        argv = ["--source", "img2dataset", "--input", tmp_path / "empty"]
    elif case == "empty_table":
        table = tmp_path / "empty.jsonl"
        table.write_text("\n")
        argv = ["--source", "csv", "--input", table, "--images", tmp_path]
    else:
        table = tmp_path / "t.tsv"
        table.write_text("image\twords\na.jpg\thello\n")
        argv = ["--source", "csv", "--input", table, "--images", tmp_path]
    assert run(argv + ["--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("make_shards: error:"), err
    named = {"missing_json": "nope.json", "missing_images": "no_such_dir", "not_json": "bad.json",
             "wrong_format": "annotations", "no_tars": "empty", "no_caption_column": "caption",
             "empty_table": "empty.jsonl"}[case]
    assert named in err[0]


def test_cli_missing_input_one_line_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "tools/make_shards.py", "--source", "karpathy", "--input",
                           str(tmp_path / "missing.json"), "--images", str(tmp_path), "--out", str(tmp_path / "o")],
                          cwd=fixtures.REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"make_shards: error: Karpathy split JSON not found: "
                                                f"{tmp_path / 'missing.json'}"]


def test_killed_run_leaves_no_partial_shard_and_resume_completes(tmp_path, monkeypatch):
    out = tmp_path / "syn"
    argv = ["--source", "synthetic", "--out", out, "--train-images", 40, "--val-images", 0, "--test-images", 0,
            "--maxcount", 8, "--image-size", 16, "--no-tokenizer"]
    real_add = make_shards.ShardWriter.add
    calls = {"n": 0}

    def dying_add(self, samples):
        calls["n"] += 1
        if calls["n"] == 11:  # the middle of the third shard (4 pairs per shard)
            raise KeyboardInterrupt("killed")
        real_add(self, samples)

    monkeypatch.setattr(make_shards.ShardWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        run(argv)
    finals = sorted(p.name for p in out.glob("train-*.tar"))
    assert finals == ["train-00000.tar", "train-00001.tar"]  # complete ones only
    assert (out / "train-00002.tar.tmp").exists() and not (out / "train.json").exists()
    for name in finals:
        with tarfile.open(out / name) as tar:
            assert len(tar.getmembers()) == 8 * 3
    kept_inode = (out / "train-00000.tar").stat().st_ino

    monkeypatch.setattr(make_shards.ShardWriter, "add", real_add)
    assert run(argv + ["--resume"]) == 0
    manifest, samples = read_split(out, "train")
    assert manifest["num_samples"] == 40 and manifest["num_captions"] == 200
    assert sorted(m["image_id"] for m, _, _ in samples) == list(range(40))
    assert (out / "train-00000.tar").stat().st_ino == kept_inode  # kept, not rewritten
    assert not list(out.glob("*.tmp")) and not (out / "train.progress.json").exists()
    # resuming a complete split does nothing; a fresh run of other input replaces it all
    assert run(argv + ["--resume"]) == 0
    assert run([a if a != 40 else 24 for a in argv]) == 0
    assert read_split(out, "train")[0]["num_samples"] == 24 and len(list(out.glob("train-*.tar"))) == 3


def test_parallel_workers_write_the_same_samples(tmp_path):
    base = ["--source", "synthetic", "--train-images", 16, "--val-images", 0, "--test-images", 0,
            "--image-size", 16, "--no-tokenizer"]
    assert run(base + ["--out", tmp_path / "one"]) == 0
    assert run(base + ["--out", tmp_path / "two", "--workers", 2]) == 0
    one, two = read_split(tmp_path / "one", "train")[1], read_split(tmp_path / "two", "train")[1]
    assert [m for m, _, _ in one] == [m for m, _, _ in two]
