"""Candidate selection: the student proposes, the teacher ranks, the positive stays at column 0."""
import pytest
import torch

from train.distill.dcd import DCDConfig, dcd_loss
from train.distill.gather import SingleProcess
from train.distill.losses import hard_negative_ce_per_sample, kd_loss_per_sample
from train.distill.negatives import (MASKED_LOGIT, candidate_set_logits, likely_false_negatives,
                                     random_candidates, random_pool_candidates,
                                     student_proposals, teacher_ranked_negatives)


def test_proposals_exclude_positives_and_same_image_captions():
    # Pool of 5 captions, image ids [0, 0, 1, 2, 3]; the query is image 0, whose two captions
    # (columns 0, 1) are the most similar: neither may be proposed.
    similarity = torch.tensor([[9.0, 8.0, 1.0, 3.0, 2.0]])
    positive_mask = torch.tensor([[True, True, False, False, False]])
    assert student_proposals(similarity, positive_mask, 2).tolist() == [[3, 4]]
    assert student_proposals(similarity, positive_mask, 3).tolist() == [[3, 4, 2]]


def test_proposals_when_the_pool_has_fewer_negatives_than_M():
    similarity = torch.tensor([[9.0, 8.0, 1.0, 3.0], [0.0, 5.0, 6.0, 7.0]])
    positive_mask = torch.tensor([[True, True, False, False], [False, True, False, False]])
    # Row 0 has only 2 negatives: every row gets M' = 2 genuine negatives, none is a positive.
    index = student_proposals(similarity, positive_mask, 16)
    assert index.tolist() == [[3, 2], [3, 2]]
    assert not positive_mask.gather(1, index).any()


def test_teacher_top_k_comes_out_of_the_student_top_m():
    candidate_index = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    teacher_scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [3.0, 2.0, 1.0, 4.0]])
    negative_index, negative_logits = teacher_ranked_negatives(teacher_scores, candidate_index, 2)
    assert negative_index.tolist() == [[11, 13], [23, 20]]
    assert torch.allclose(negative_logits, torch.tensor([[0.9, 0.7], [4.0, 3.0]]))
    for row, proposed in zip(negative_index.tolist(), candidate_index.tolist()):
        assert set(row) <= set(proposed)
    # K larger than M is clipped to M.
    assert teacher_ranked_negatives(teacher_scores, candidate_index, 9)[0].shape == (2, 4)


def test_positive_stays_at_column_zero_when_the_teacher_prefers_a_negative():
    # The teacher scores the positive 1.0 and candidate 12 at 5.0 (ranked above the positive).
    candidate_index = torch.tensor([[11, 12, 13]])
    teacher_candidates = torch.tensor([[0.5, 5.0, 0.0]])
    teacher_positive = torch.tensor([1.0])
    negative_index, teacher_negatives = teacher_ranked_negatives(teacher_candidates, candidate_index, 2)
    teacher_set = candidate_set_logits(teacher_positive, teacher_negatives)
    assert negative_index.tolist() == [[12, 11]]
    assert teacher_set.tolist() == [[1.0, 5.0, 0.5]]  # positive first, NOT the teacher's maximum
    # The student's set taken at the same pool columns lines up column by column.
    student_row = torch.arange(20, dtype=torch.float32).unsqueeze(0) / 10  # logit of column j = j/10
    positive_column = 3
    student_set = candidate_set_logits(student_row[:, positive_column], student_row.gather(1, negative_index))
    assert torch.allclose(student_set, torch.tensor([[0.3, 1.2, 1.1]]))
    # The hard CE targets column 0, the positive, for the student.
    assert hard_negative_ce_per_sample(student_set).item() == pytest.approx(
        torch.logsumexp(torch.tensor([0.3, 1.2, 1.1]), 0).item() - 0.3)


def test_random_candidates_come_from_the_proposals_and_are_reproducible():
    candidate_index = torch.arange(40).view(2, 20)
    a = random_candidates(candidate_index, 5, torch.Generator().manual_seed(3))
    b = random_candidates(candidate_index, 5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (2, 5)
    for row, proposed in zip(a.tolist(), candidate_index.tolist()):
        assert len(set(row)) == 5 and set(row) <= set(proposed)
    assert a.tolist() != candidate_index[:, :5].tolist()  # not simply the student's top-K


def test_random_pool_candidates_exclude_positives():
    positive_mask = torch.zeros(4, 10, dtype=torch.bool)
    positive_mask[torch.arange(4), torch.arange(4)] = True
    positive_mask[0, 9] = True
    index = random_pool_candidates(positive_mask, 6, torch.Generator().manual_seed(0))
    assert index.shape == (4, 6)
    assert not positive_mask.gather(1, index).any()


# ---------------------------------------------------------------------------------------------------
# End to end through dcd_loss on one process: a lookup-table teacher that ranks a negative above the
# positive for some queries. Pixels and token ids carry the pool position, so the teacher can look up
# which pair it was given.

def _lookup_teacher(table):
    def score(images, texts, image_index, text_index):
        return table[images[image_index, 0, 0, 0].long(), texts["input_ids"][text_index, 0]]
    return score


def _toy_pool(G, D):
    """Seeded unit embeddings; pixels and token ids that carry the pool position (_lookup_teacher)."""
    torch.manual_seed(0)
    image_emb = torch.nn.functional.normalize(torch.randn(G, D), dim=1).requires_grad_()
    text_emb = torch.nn.functional.normalize(torch.randn(G, D), dim=1)
    pixels = torch.arange(G, dtype=torch.uint8).view(G, 1, 1, 1).expand(G, 3, 2, 2).contiguous()
    texts = {"input_ids": torch.arange(G).view(G, 1), "attention_mask": torch.ones(G, 1, dtype=torch.long)}
    return image_emb, text_emb, torch.tensor(3.0), pixels, texts


def test_dcd_keeps_teacher_and_student_aligned_when_the_teacher_prefers_a_negative():
    G, D, M, K = 5, 4, 3, 2
    image_emb, text_emb, scale, pixels, texts = _toy_pool(G, D)
    table = torch.randn(G, G)  # table[image, caption]
    table[0, 0], table[0, 1:] = 1.0, torch.tensor([-1.0, 5.0, 4.0, -2.0])  # query 0 prefers captions 2, 3
    cfg = DCDConfig(candidates=M, hard_negatives=K, alpha=1.0, lambda_itc=0.0, weighting="none",
                    directions=("i2t",), kd_temperature=1.0)
    loss, logs = dcd_loss(image_emb, text_emb, scale, torch.arange(G), pixels, texts,
                          _lookup_teacher(table), SingleProcess(), cfg)

    # By hand: the student's top-M captions, the teacher's top-K of them, positive first.
    student = scale * image_emb.detach() @ text_emb.t()
    expected, buggy = [], []
    for i in range(G):
        others = [j for j in range(G) if j != i]
        proposed = sorted(others, key=lambda j: -student[i, j].item())[:M]
        negatives = sorted(proposed, key=lambda j: -table[i, j].item())[:K]
        columns = [i] + negatives
        teacher_set = table[i, columns].view(1, -1)
        student_set = student[i, columns].view(1, -1)
        expected.append(kd_loss_per_sample(student_set, teacher_set, 1.0, "kl"))
        # The published bug: the teacher's set sorted by score, student's kept positive-first.
        buggy.append(kd_loss_per_sample(student_set, teacher_set.sort(dim=1, descending=True).values, 1.0, "kl"))
    assert loss.item() == pytest.approx(torch.cat(expected).mean().item(), abs=1e-5)
    assert abs(torch.cat(buggy).mean().item() - loss.item()) > 1e-3  # the test can tell them apart
    assert logs["teacher_accuracy"].item() < 1.0
    assert logs["pool_size"] == G and logs["bytes_moved"] == 0


@pytest.mark.parametrize("bad", [dict(kd_loss="l1"), dict(weighting="focal"), dict(directions=("i2i",)),
                                 dict(negatives_from="student"), dict(distill_queries=0), dict(alpha=1.5)])
def test_dcd_config_rejects_unknown_settings(bad):
    with pytest.raises(ValueError):
        DCDConfig(**bad)


def test_likely_false_negatives_and_masked_candidate_columns():
    teacher = torch.tensor([[2.0, 0.5, 1.9, -1.0]])
    assert likely_false_negatives(teacher, torch.tensor([1.8]), 0.0).tolist() == [[True, False, True, False]]
    assert likely_false_negatives(teacher, torch.tensor([1.8]), 1.5).tolist() == [[True, True, True, False]]
    student = torch.tensor([[3.0, 1.0, 2.0]], requires_grad=True)
    valid = torch.tensor([[True, False]])
    masked = candidate_set_logits(student[:, 0], student[:, 1:], valid)
    assert masked[0, 2].item() == MASKED_LOGIT
    # the masked column carries no probability and no gradient; KL and CE stay finite
    loss = hard_negative_ce_per_sample(masked) + kd_loss_per_sample(masked, masked.detach() + 0.5)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and student.grad[0, 2].item() == 0.0
    assert hard_negative_ce_per_sample(masked).item() == pytest.approx(
        hard_negative_ce_per_sample(student[:, :2]).item(), abs=1e-6)


def test_dcd_false_negative_margin_leaves_out_what_the_teacher_scores_like_the_positive():
    """Query 0's teacher scores captions 2 and 3 (like) above its positive: with the margin they leave
    the candidate set and the next-best proposals the teacher ranks below the positive are taken."""
    G, D, M, K = 5, 4, 4, 2
    image_emb, text_emb, scale, pixels, texts = _toy_pool(G, D)
    table = torch.randn(G, G) - 3.0  # every other pair well below ...
    table[torch.arange(G), torch.arange(G)] = 1.0  # ... each positive
    table[0, 1:] = torch.tensor([-1.0, 5.0, 1.2, -2.0])  # query 0: captions 2 and 3 score >= 1 - 0.5
    cfg = DCDConfig(candidates=M, hard_negatives=K, alpha=0.5, lambda_itc=0.0, weighting="none",
                    directions=("i2t",), false_negative_margin=0.5)
    loss, logs = dcd_loss(image_emb, text_emb, scale, torch.arange(G), pixels, texts,
                          _lookup_teacher(table), SingleProcess(), cfg)
    student = scale * image_emb.detach() @ text_emb.t()
    expected, dropped = [], 0
    for i in range(G):
        proposed = sorted([j for j in range(G) if j != i], key=lambda j: -student[i, j].item())[:M]
        kept = [j for j in proposed if table[i, j] < table[i, i] - 0.5]
        dropped += M - len(kept)
        negatives = sorted(kept, key=lambda j: -table[i, j].item())[:K]
        teacher_set = table[i, [i] + negatives].view(1, -1)
        student_set = student[i, [i] + negatives].view(1, -1)
        expected.append(0.5 * kd_loss_per_sample(student_set, teacher_set) +
                        0.5 * hard_negative_ce_per_sample(student_set))
    assert dropped == 2
    assert loss.item() == pytest.approx(torch.cat(expected).mean().item(), abs=1e-5)
    assert logs["false_negatives_dropped"].item() == pytest.approx(dropped / (G * M))
    assert logs["teacher_accuracy"].item() == 1.0  # what is left, the teacher ranks below the positive
    with pytest.raises(ValueError):
        DCDConfig(negatives_from="random", false_negative_margin=0.0)
