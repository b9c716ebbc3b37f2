"""train/data.py: manifests, tokenizer, the distributed training stream, the evaluation stream."""
import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tests import fixtures
from train import data, samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 train images in 8 shards of 8 (4 twin pairs each), 20 val images in 3 shards, tokenizer."""
    return fixtures.make_synthetic_shards(tmp_path_factory.mktemp("syn"), train=64, val=20, maxcount=8,
                                          tokenizer=True, image_size=32)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """Fewer shards (1) than slots: the loader must split by sample."""
    return fixtures.make_synthetic_shards(tmp_path_factory.mktemp("one"), train=48, val=0, maxcount=100,
                                          image_size=16)


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def ids(batches):
    return [b["image_ids"].tolist() for b in batches]


def test_manifest_and_tokenizer_errors_name_the_path(tmp_path, shards):
    with pytest.raises(data.DataError, match="no_dir"):
        data.load_manifest(tmp_path / "no_dir", "train")
    with pytest.raises(data.DataError, match=r"test\.json"):
        data.load_manifest(shards, "test")
    fixtures.write_manifest(tmp_path, "train", ["train-00000.tar"], [3])
    with pytest.raises(data.DataError, match="train-00000.tar"):
        data.load_manifest(tmp_path, "train")
    with pytest.raises(data.DataError, match="nothing_here"):
        data.load_tokenizer(tmp_path / "nothing_here")
    m = data.load_manifest(shards, "train")
    assert m["num_samples"] == 64 and len(m["paths"]) == 8


def test_train_batch_contract_with_tokenizer(shards):
    tok = data.load_tokenizer(shards / "tokenizer")
    loader = data.make_train_loader(shards, "train", batch_size=6, image_size=24, tokenizer=tok, max_length=20,
                                    num_workers=0, batches_per_epoch=3)
    batches = list(loader)
    assert len(batches) == len(loader) == 3 and loader.batches_seen == 3
    b = batches[0]
    assert set(b) == {"pixels", "captions", "input_ids", "attention_mask", "image_ids", "twin_ids", "groups"}
    assert b["pixels"].dtype == torch.uint8 and b["pixels"].shape == (6, 3, 24, 24)
    assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (6, 20)
    assert b["attention_mask"].dtype == torch.long and b["attention_mask"].shape == (6, 20)
    assert tok.unk_token_id not in b["input_ids"].tolist()
    assert isinstance(b["captions"], list) and all(isinstance(c, str) and c for c in b["captions"])
    assert b["twin_ids"].tolist() == [i ^ 1 for i in b["image_ids"].tolist()]
    assert b["groups"].tolist() == [i // 2 for i in b["image_ids"].tolist()]
    # the next epoch continues the stream rather than restarting it
    more = list(loader)
    assert loader.batches_seen == 6 and ids(more) != ids(batches)


@pytest.mark.parametrize("fixture_name", ["shards", "one_shard"])
def test_two_ranks_two_workers_disjoint_equal_counts(request, fixture_name):
    folder = request.getfixturevalue(fixture_name)
    total = data.load_manifest(folder, "train")["num_samples"]
    seen = []
    for rank in range(2):
        loader = data.make_train_loader(folder, "train", batch_size=4, image_size=16, num_workers=2, rank=rank,
                                        world_size=2, seed=1, batches_per_epoch=12)
        batches = list(loader)
        assert len(batches) == 12 and all(len(b["captions"]) == 4 for b in batches)
        by_worker = [set(sum(ids(batches[w::2]), [])) for w in range(2)]  # batch b comes from worker b % 2
        assert not by_worker[0] & by_worker[1]
        seen.append(by_worker[0] | by_worker[1])
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == total  # 12 batches of 4 per rank cover every image


def test_deterministic_and_seed_dependent(shards):
    make = lambda seed: data.make_train_loader(shards, "train", batch_size=5, image_size=16, num_workers=2,
                                               seed=seed, batches_per_epoch=6)
    a, b, c = list(make(0)), list(make(0)), list(make(1))
    assert ids(a) == ids(b) and all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(a, b))
    assert [x["captions"] for x in a] == [y["captions"] for y in b]
    assert ids(a) != ids(c)


def test_caption_drawn_per_pass(shards):
    loader = data.make_train_loader(shards, "train", batch_size=8, image_size=16, num_workers=0,
                                    batches_per_epoch=40, shuffle_buffer=4)
    drawn = {}
    for b in loader:
        for i, c in zip(b["image_ids"].tolist(), b["captions"]):
            drawn.setdefault(i, set()).add(c)
    assert np.mean([len(v) for v in drawn.values()]) > 1.5  # 5 passes: several captions per image


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers,start", [(0, 3), (2, 3), (2, 4), (3, 7)])
def test_start_batch_resumes_at_the_same_position(shards, workers, start):
    kw = dict(batch_size=6, image_size=16, num_workers=workers, rank=1, world_size=2, seed=5)
    fresh = take(data.make_train_loader(shards, "train", **kw), start + 5)
    resumed = take(data.make_train_loader(shards, "train", start_batch=start, **kw), 5)
    assert ids(resumed) == ids(fresh[start:])
    assert [b["captions"] for b in resumed] == [b["captions"] for b in fresh[start:]]
    assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(resumed, fresh[start:]))


@pytest.mark.parametrize("fixture_name", ["shards", "one_shard"])
def test_twins_in_batch(request, fixture_name):
    folder = request.getfixturevalue(fixture_name)
    loader = data.make_train_loader(folder, "train", batch_size=6, image_size=16, num_workers=2, rank=0,
                                    world_size=2, twins_in_batch=True, batches_per_epoch=10)
    for b in loader:
        present = set(b["image_ids"].tolist())
        assert all(t in present for t in b["twin_ids"].tolist()), b["image_ids"]
    # without it, shuffling separates most pairs
    loader = data.make_train_loader(folder, "train", batch_size=6, image_size=16, num_workers=0,
                                    batches_per_epoch=10)
    apart = sum(t not in set(b["image_ids"].tolist()) for b in loader for t in b["twin_ids"].tolist())
    assert apart > 0


def good_sample(i, caption="a red circle", size=(20, 20)):
    img = Image.new("RGB", size, (200, 10, 10))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    meta = {"image_id": i, "key": f"{i:09d}", "captions": [caption], "twin_id": None, "group": None, "source": {}}
    return f"{i:09d}", {"jpg": buf.getvalue(), "txt": caption.encode(), "json": json.dumps(meta).encode()}


@pytest.fixture
def corrupt_shards(tmp_path):
    good = [good_sample(i) for i in range(10)]
    bad = []
    key, f = good_sample(100); f["jpg"] = fixtures.CORRUPT_JPEG; bad.append((key, f))            # bad_image
    key, f = good_sample(101); del f["json"]; bad.append((key, f))                                # bad_json
    key, f = good_sample(102); f["json"] = b"{oops"; bad.append((key, f))                         # bad_json
    key, f = good_sample(103, caption=" "); bad.append((key, f))                                  # empty_caption
    key, f = good_sample(104); f["json"] = json.dumps({"image_id": 104}).encode(); f["txt"] = b"\xff\xfe"
    bad.append((key, f))                                                                          # bad_text
    key, f = good_sample(105, size=(1, 1)); bad.append((key, f))                                  # bad_image_size
    key, f = good_sample(106, size=(400, 4)); bad.append((key, f))                                # bad_image_size
    key, f = good_sample(107); del f["jpg"]; bad.append((key, f))                                 # missing_image
    samples = good[:5] + bad + good[5:]
    fixtures.write_raw_shard(tmp_path / "train-00000.tar", samples)
    fixtures.write_manifest(tmp_path, "train", ["train-00000.tar"], [len(samples)])
    return tmp_path


EXPECTED_SKIPS = {"bad_image": 1, "bad_json": 2, "empty_caption": 1, "bad_text": 1, "bad_image_size": 2,
                  "missing_image": 1}


def test_corrupt_samples_skipped_and_counted(corrupt_shards):
    loader = data.make_train_loader(corrupt_shards, "train", batch_size=5, image_size=16, num_workers=1,
                                    batches_per_epoch=2, shuffle_buffer=1)
    batches = list(loader)  # 2 batches of 5 = exactly one pass over the 10 good samples
    assert sorted(sum(ids(batches), [])) == list(range(10))
    assert dict(loader.skipped) == EXPECTED_SKIPS
    assert all("skipped" not in b for b in batches)
    skipped = Counter()
    ev = data.load_eval_split(corrupt_shards, "train", 16, skipped=skipped)
    assert ev["image_ids"].tolist() == list(range(10)) and dict(skipped) == EXPECTED_SKIPS


def test_eval_covers_split_once_in_order_across_ranks(shards):
    parts = [list(data.iterate_eval(shards, "val", batch_size=3, image_size=16, rank=r, world_size=2))
             for r in range(2)]
    got = [i for part in parts for b in part for i in b["image_ids"].tolist()]
    assert got == list(range(20))
    b = parts[0][0]
    assert set(b) == {"pixels", "captions", "image_ids", "twin_ids", "keys"}
    assert b["pixels"].dtype == torch.uint8 and b["pixels"].shape == (3, 3, 16, 16)
    assert all(len(c) == 5 for c in b["captions"]) and b["keys"][0] == "000000000"
    three = [i for r in range(3) for b in data.iterate_eval(shards, "val", 4, 16, r, 3, max_images=11)
             for i in b["image_ids"].tolist()]
    assert three == list(range(11))
    full = data.load_eval_split(shards, "val", 16)
    assert full["pixels"].shape == (20, 3, 16, 16) and full["twin_ids"].tolist() == [i ^ 1 for i in range(20)]
    whole = torch.cat([b["pixels"] for part in parts for b in part])
    assert torch.equal(whole, full["pixels"])


def test_decode_resizes_centre_crops_and_never_flips():
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = (255, 0, 0)  # left half red
    img[:, 20:] = (0, 0, 255)  # right half blue
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    out = samples.decode_image(buf.getvalue(), 10)
    assert out.shape == (3, 10, 10) and out.dtype == np.uint8
    assert out[0, 5, 0] > 200 and out[2, 5, 9] > 200  # red stays left, blue right
    gray = io.BytesIO()
    Image.fromarray(img[:, :, 0]).convert("L").save(gray, format="PNG")
    assert samples.decode_image(gray.getvalue(), 8).shape == (3, 8, 8)
