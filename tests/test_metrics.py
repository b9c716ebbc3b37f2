"""Recall@K, RSUM and binding accuracy on hand-made score matrices."""
import pytest
import torch

from train.metrics import (MISSING_RANK, binding_accuracy, binding_accuracy_from_scores,
                           format_table, image_to_text_ranks, retrieval_metrics,
                           retrieval_metrics_from_ranked, text_to_image_ranks, truth_aware_metrics,
                           twin_pairs)

# 3 images, 2 captions each: captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2.
CAPTION_IMAGE = torch.tensor([0, 0, 1, 1, 2, 2])


def test_perfect_scores_give_full_recall():
    scores = torch.full((3, 6), -1.0)
    scores[CAPTION_IMAGE, torch.arange(6)] = 1.0
    metrics = retrieval_metrics(scores, CAPTION_IMAGE)
    assert metrics["rsum"] == pytest.approx(600.0)
    assert all(metrics[key] == pytest.approx(100.0) for key in ("tr_r1", "ir_r1", "ir_r10"))


def test_image_query_is_correct_if_any_of_its_captions_is_on_top():
    scores = torch.tensor([
        # c0   c1   c2   c3   c4   c5
        [0.1, 0.9, 0.5, 0.4, 0.0, 0.0],   # image 0: its caption c1 is best -> rank 0
        [0.0, 0.0, 0.2, 0.3, 0.8, 0.1],   # image 1: c4 (image 2) beats c3 -> rank 1
        [0.9, 0.8, 0.7, 0.0, 0.6, 0.5],   # image 2: c0, c1, c2 beat c4 -> rank 3
    ])
    assert image_to_text_ranks(scores, CAPTION_IMAGE).tolist() == [0, 1, 3]
    metrics = retrieval_metrics(scores, CAPTION_IMAGE)
    assert metrics["tr_r1"] == pytest.approx(100 / 3)
    assert metrics["tr_r5"] == pytest.approx(100.0)


def test_caption_query_ranks_its_own_image():
    scores = torch.tensor([
        [0.9, 0.1, 0.5, 0.0, 0.0, 0.3],
        [0.5, 0.2, 0.6, 0.1, 0.1, 0.2],
        [0.1, 0.3, 0.4, 0.5, 0.2, 0.1],
    ])
    # c0: img0 best -> 0; c1: img2 (0.3) and img1 (0.2) beat img0 (0.1) -> 2; c2: img1 best -> 0;
    # c3: img2 beats img1 -> 1; c4: img1 0.1 < img2 0.2 -> 0; c5: img0 0.3 and img1 0.2 beat 0.1 -> 2
    assert text_to_image_ranks(scores, CAPTION_IMAGE).tolist() == [0, 2, 0, 1, 0, 2]
    metrics = retrieval_metrics(scores, CAPTION_IMAGE)
    assert metrics["ir_r1"] == pytest.approx(50.0)
    assert metrics["ir_r5"] == pytest.approx(100.0)


def test_ties_count_against_the_query():
    # Constant scores: every negative ties with the positive, so nothing is retrieved at 1.
    scores = torch.zeros(3, 6)
    assert image_to_text_ranks(scores, CAPTION_IMAGE).tolist() == [4, 4, 4]
    assert text_to_image_ranks(scores, CAPTION_IMAGE).tolist() == [2] * 6
    metrics = retrieval_metrics(scores, CAPTION_IMAGE)
    assert metrics["tr_r1"] == 0.0 and metrics["ir_r1"] == 0.0
    assert metrics["tr_r5"] == 100.0 and metrics["ir_r5"] == 100.0


def test_tied_positives_do_not_hurt_each_other():
    scores = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 1.0, 1.0, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]])
    assert image_to_text_ranks(scores, CAPTION_IMAGE).tolist() == [0, 0, 0]


def test_metrics_do_not_depend_on_gallery_order():
    torch.manual_seed(0)
    scores = torch.randint(0, 3, (3, 6)).float()  # many ties
    permutation = torch.tensor([2, 0, 1])
    inverse = torch.argsort(permutation)
    permuted = retrieval_metrics(scores[permutation], inverse[CAPTION_IMAGE])
    assert permuted == retrieval_metrics(scores, CAPTION_IMAGE)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        retrieval_metrics(torch.zeros(3, 5), CAPTION_IMAGE)
    with pytest.raises(ValueError):  # image 2 has no caption
        image_to_text_ranks(torch.zeros(3, 2), torch.tensor([0, 1]))


def test_ranked_lists_match_full_matrix_and_truncation_is_a_miss():
    torch.manual_seed(1)
    scores = torch.randn(3, 6)
    by_image = torch.sort(scores, dim=1, descending=True).indices
    by_caption = torch.sort(scores.t(), dim=1, descending=True).indices
    full = retrieval_metrics(scores, CAPTION_IMAGE)
    assert retrieval_metrics_from_ranked(by_image, by_caption, CAPTION_IMAGE) == pytest.approx(full)
    # Lists cut to one entry: only first-place hits count.
    cut = retrieval_metrics_from_ranked(by_image[:, :1], by_caption[:, :1], CAPTION_IMAGE)
    assert cut["tr_r1"] == pytest.approx(full["tr_r1"])
    assert cut["tr_r10"] == pytest.approx(full["tr_r1"])
    assert cut["ir_r5"] == pytest.approx(full["ir_r1"])


def test_ranked_lists_are_read_in_the_given_order():
    by_image = torch.tensor([[2, 0], [3, 0], [0, 1]])   # image 0 hits at 1, image 1 at 0, image 2 never
    by_caption = torch.tensor([[0], [1], [1], [0], [2], [0]])
    metrics = retrieval_metrics_from_ranked(by_image, by_caption, CAPTION_IMAGE)
    assert metrics["tr_r1"] == pytest.approx(100 / 3)
    assert metrics["tr_r5"] == pytest.approx(200 / 3)
    assert metrics["ir_r1"] == pytest.approx(50.0)
    empty = retrieval_metrics_from_ranked(torch.zeros(3, 0, dtype=torch.long),
                                          torch.zeros(6, 0, dtype=torch.long), CAPTION_IMAGE)
    assert empty["rsum"] == 0.0
    assert MISSING_RANK > 10


def test_binding_accuracy_ties_are_wrong():
    own = torch.tensor([0.9, 0.5, 0.2, 0.4])
    twin = torch.tensor([0.1, 0.5, 0.3, 0.0])
    assert binding_accuracy(own, twin) == pytest.approx(50.0)
    assert binding_accuracy(torch.tensor([]), torch.tensor([])) is None


def test_binding_accuracy_from_scores_uses_twins_in_the_gallery():
    # images 0 and 1 are twins; image 2 has none.
    twin_index = torch.tensor([1, 0, -1])
    captions, own, twin = twin_pairs(CAPTION_IMAGE, twin_index)
    assert captions.tolist() == [0, 1, 2, 3]
    assert own.tolist() == [0, 0, 1, 1] and twin.tolist() == [1, 1, 0, 0]
    scores = torch.tensor([[0.9, 0.2, 0.1, 0.5, 0.0, 0.0],
                           [0.1, 0.2, 0.8, 0.7, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]])
    # c0: 0.9 > 0.1 right; c1: 0.2 == 0.2 wrong; c2: 0.8 > 0.1 right; c3: 0.7 > 0.5 right
    assert binding_accuracy_from_scores(scores, CAPTION_IMAGE, twin_index) == pytest.approx(75.0)
    assert binding_accuracy_from_scores(scores, CAPTION_IMAGE, torch.tensor([-1, -1, -1])) is None


def test_format_table_shows_missing_values_as_dash():
    table = format_table({"student": {"tr_r1": 50.0}}, keys=["tr_r1", "ir_r1"])
    assert "50.00" in table and "-" in table.splitlines()[-1]


def test_truth_aware_recall_counts_a_true_caption_of_another_image_as_a_hit():
    scores = torch.tensor([
        # c0   c1   c2   c3   c4   c5
        [0.1, 0.2, 0.9, 0.4, 0.0, 0.0],   # image 0: c2 (image 1's) on top, and true of image 0
        [0.0, 0.0, 0.2, 0.3, 0.8, 0.1],   # image 1: c4 on top, false of it -> rank 1 both ways
        [0.5, 0.8, 0.7, 0.0, 0.6, 0.9],   # image 2: its own c5 on top
    ])
    truth = torch.zeros(3, 6, dtype=torch.bool)
    truth[0, 2] = True  # c2 is true of image 0 too; own pairs count without being marked
    own = retrieval_metrics(scores, CAPTION_IMAGE)
    aware = truth_aware_metrics(scores, truth, CAPTION_IMAGE)
    assert own["tr_r1"] == pytest.approx(100 / 3) and aware["tr_r1"] == pytest.approx(200 / 3)
    # caption query c2: image 0 (0.9) is above its own image 1 (0.2) and is a hit once truth counts
    assert own["ir_r1"] < aware["ir_r1"]
    assert aware["ir_r1"] == pytest.approx(100 * 2 / 6)  # c2 -> image 0, c5 -> image 2
    # with no truth beyond the own captions the two agree, ties included
    for matrix in (scores, torch.zeros(3, 6)):
        assert truth_aware_metrics(matrix, torch.zeros(3, 6), CAPTION_IMAGE) == retrieval_metrics(matrix, CAPTION_IMAGE)
