"""The scene-oracle teacher: ground truth of the synthetic scenes through the teacher contract."""
import json
import tarfile

import pytest
import torch

from tests.fixtures import make_karpathy, make_synthetic_shards
from train.eval_split import read_eval_split
from train.models.presets import build_teacher


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("oracle") / "shards", train=16, val=8, test=8,
                                 maxcount=8)


def test_own_captions_true_twin_captions_follow_the_false_for_twin_flags(shards):
    oracle = build_teacher(f"scene-oracle:{shards}")
    split = read_eval_split(shards, "val")
    encoded = oracle.tokenize(split.captions)
    pixels = oracle.preprocess_images(split.pixels)
    captions = torch.arange(split.num_captions)
    own = oracle(pixels, encoded["input_ids"], encoded["attention_mask"], split.caption_image_index, captions)
    assert torch.all(own == 5.0)
    # the flags make_shards stored: a caption flagged false for the twin must score false on it
    flags = []
    for shard in sorted(shards.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if member.name.endswith(".json"):
                    flags += json.loads(tar.extractfile(member).read())["source"]["false_for_twin"]
    twin = split.twin_index[split.caption_image_index]
    on_twin = oracle(pixels, encoded["input_ids"], encoded["attention_mask"], twin, captions)
    assert (on_twin < 0).tolist() == flags
    # all pairs: each image's own captions are among the captions true of it
    truth = oracle.truth(pixels, encoded["input_ids"], torch.arange(split.num_images).repeat_interleave(
        split.num_captions), captions.repeat(split.num_images)).view(split.num_images, -1)
    assert truth[split.caption_image_index, captions].all()


def test_ids_agree_between_builds_and_unknown_inputs_are_named(shards, tmp_path):
    a, b = build_teacher(f"scene-oracle:{shards}"), build_teacher(f"scene-oracle:{shards}")
    split = read_eval_split(shards, "train")
    assert torch.equal(a.tokenize(split.captions)["input_ids"], b.tokenize(split.captions)["input_ids"])
    with pytest.raises(ValueError, match="'a pink hexagon' is not in the shards"):
        a.tokenize(["a pink hexagon"])
    unseen = torch.zeros(1, 3, a.image_size, a.image_size)
    with pytest.raises(ValueError, match="image that is not in the shards"):
        a(unseen, a.tokenize(split.captions[:1])["input_ids"], torch.ones(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="scene-oracle:nowhere.*not a folder"):
        build_teacher("scene-oracle:nowhere")


def test_shards_without_scenes_are_refused_in_one_line(tmp_path):
    from tools import make_shards
    json_path, images = make_karpathy(tmp_path / "raw")
    out = tmp_path / "karpathy_shards"
    make_shards.main(["--source", "karpathy", "--input", str(json_path), "--images", str(images),
                      "--out", str(out), "--no-tokenizer", "--quiet"])
    with pytest.raises(ValueError, match=r"is not made by make_shards --source synthetic"):
        build_teacher(f"scene-oracle:{out}")


def test_ambiguity_report_on_a_hand_made_gallery():
    from tools.false_negatives import ambiguity_report
    # 2 images x 4 captions (0, 1 of image 0; 2, 3 of image 1); caption 2 is also true of image 0
    own = torch.tensor([0, 0, 1, 1])
    truth = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    # the student ranks caption 3 (false for image 0) first for image 0, and image 0 first for caption 3
    student = torch.tensor([[0.1, 0.2, 0.3, 0.9], [0.0, 0.1, 0.5, 0.4]])
    report = ambiguity_report(truth, student, own, seeds=2)
    assert report["true_captions_per_image"] == 2.5 and report["captions_true_of_other_images"] == 0.25
    assert report["student"]["tr_r1"] == 50.0 and report["student"]["ir_r1"] == 75.0
    # truth first fixes caption 3 (-> image 1); image 0's best true caption is caption 2, which is
    # true of it but not its own: a TR miss that no teacher can turn into a hit
    assert report["truth_then_student"]["tr_r1"] == 50.0 and report["truth_then_student"]["ir_r1"] == 100.0
    assert report["student_top10_true"] == 5 / 8
    # truth-aware: image 0's top caption 3 is false of it, caption 3's top image 0 too: the same misses
    assert report["student_truth_aware"]["tr_r1"] == 50.0 and report["student_truth_aware"]["ir_r1"] == 75.0
    assert 0.0 <= report["truth_random_ties"]["rsum"] <= 600.0
