"""Hand-computed values of the pure DCD losses and weights on tiny tensors."""
import math

import pytest
import torch

from train.distill.losses import (WSL_EPS, dynamic_weights, hard_negative_ce_per_sample, info_nce,
                                  kd_loss_per_sample, multi_positive_cross_entropy_per_sample,
                                  normalize_weights)

LN3 = math.log(3.0)


def test_entropy_weights_by_hand():
    # softmax([0, 0]) = [1/2, 1/2] -> ln 2; softmax([ln 3, 0]) = [3/4, 1/4].
    teacher = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    expected = [math.log(2.0), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    got = dynamic_weights(teacher, torch.zeros(2, 2), "entropy")
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_wsl_weights_by_hand():
    # teacher softmax [3/4, 1/4]: CE_t = ln(4/3); student uniform: CE_s = ln 2.
    teacher = torch.tensor([[LN3, 0.0]])
    student = torch.tensor([[0.0, 0.0]])
    expected = 1.0 - math.exp(-math.log(2.0) / math.log(4.0 / 3.0))
    assert dynamic_weights(teacher, student, "wsl").item() == pytest.approx(expected, abs=1e-6)


def test_wsl_guard_when_teacher_is_certain():
    # CE_t = 0 exactly (float32 softmax saturates): clamped to WSL_EPS, no nan / inf.
    certain_teacher = torch.tensor([[100.0, -100.0], [100.0, -100.0]])
    student = torch.tensor([[100.0, -100.0],    # also certain and right: nothing to learn -> 0
                            [-5.0, 5.0]])       # wrong while the teacher is certain -> 1
    w = dynamic_weights(certain_teacher, student, "wsl")
    assert torch.isfinite(w).all()
    assert w.tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    assert WSL_EPS > 0


def test_none_weights_are_ones():
    assert dynamic_weights(torch.randn(3, 4), torch.randn(3, 4), "none").tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("scheme", ["entropy", "wsl", "none"])
def test_weights_carry_no_gradient(scheme):
    teacher = torch.randn(3, 4, requires_grad=True)
    student = torch.randn(3, 4, requires_grad=True)
    w = dynamic_weights(teacher, student, scheme)
    assert not w.requires_grad
    normalized = normalize_weights(w, w.sum(), 3)
    assert not normalized.requires_grad


def test_unknown_scheme_raises():
    with pytest.raises(ValueError):
        dynamic_weights(torch.zeros(1, 2), torch.zeros(1, 2), "focal")


def test_kd_kl_by_hand():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[LN3, 0.0]])
    # KL([3/4, 1/4] || [1/2, 1/2]) = 3/4 ln(3/2) + 1/4 ln(1/2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss_per_sample(student, teacher, 1.0, "kl").item() == pytest.approx(expected, abs=1e-6)
    # T = 2: teacher softmax([ln3 / 2, 0]) = [sqrt3, 1] / (sqrt3 + 1); times T^2 = 4.
    p = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)
    expected_t2 = 4.0 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))
    assert kd_loss_per_sample(student, teacher, 2.0, "kl").item() == pytest.approx(expected_t2, abs=1e-6)


def test_kd_kl_is_zero_when_student_matches_teacher_and_per_row():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    assert kd_loss_per_sample(logits, logits + 7.0, 1.0, "kl").tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_kd_mse_by_hand():
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 4.0], [3.0, 0.0]])
    # row 0: (1 + 4) / 2; row 1: 9 / 2
    assert kd_loss_per_sample(student, teacher, 4.0, "mse").tolist() == pytest.approx([2.5, 4.5])


def test_kd_gradient_reaches_student_only():
    student = torch.randn(2, 3, requires_grad=True)
    teacher = torch.randn(2, 3, requires_grad=True)
    kd_loss_per_sample(student, teacher, 2.0, "kl").sum().backward()
    assert student.grad is not None and teacher.grad is None


def test_hard_negative_ce_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    expected = [math.log(math.exp(2) + 2) - 2, math.log(1 + 2 * math.e)]
    assert hard_negative_ce_per_sample(logits).tolist() == pytest.approx(expected, abs=1e-6)


def test_multi_positive_ce_by_hand():
    # Pool of 3 captions: captions 0 and 1 show image A, caption 2 image B.
    logits = torch.tensor([[1.0, 1.0, 0.0]])
    positives = torch.tensor([[True, True, False]])
    # -log((e + e) / (e + e + 1))
    expected = math.log((2 * math.e + 1) / (2 * math.e))
    got = multi_positive_cross_entropy_per_sample(logits, positives).item()
    assert got == pytest.approx(expected, abs=1e-6)
    # With a single positive it is the ordinary cross-entropy.
    single = torch.tensor([[True, False, False]])
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([0])).item()
    assert multi_positive_cross_entropy_per_sample(logits, single).item() == pytest.approx(ce, abs=1e-6)


def test_other_positives_are_never_negatives():
    # Raising the logit of another caption of the same image must not increase the loss
    # (it would if it sat among the negatives); raising a negative's logit must increase it.
    logits = torch.tensor([[1.0, 0.5, 0.2, -0.3]], requires_grad=True)
    positives = torch.tensor([[True, True, False, False]])
    multi_positive_cross_entropy_per_sample(logits, positives).sum().backward()
    grad = logits.grad[0]
    assert (grad[:2] <= 0).all() and (grad[2:] > 0).all()


def test_info_nce_several_captions_per_image():
    # Two local images (ids 7, 8); pool of 3 captions with image ids [7, 7, 8].
    # Two local captions (ids 7, 8); pool of 2 images [7, 8].
    logits_i2t = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    mask_i2t = torch.tensor([[True, True, False], [False, False, True]])
    logits_t2i = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    mask_t2i = torch.tensor([[True, False], [False, True]])
    e = math.exp
    i2t = [-math.log((e(2) + e(1)) / (e(2) + e(1) + e(0))), -math.log(e(3) / (e(0) + e(1) + e(3)))]
    t2i = [-math.log(e(1) / (e(1) + e(0))), math.log(2.0)]
    expected = 0.5 * (sum(i2t) / 2 + sum(t2i) / 2)
    assert info_nce(logits_i2t, logits_t2i, mask_i2t, mask_t2i).item() == pytest.approx(expected, abs=1e-6)


def test_normalize_weights_to_global_mean_one():
    # Two "ranks" with raw weights [1, 3] and [2, 4]: global sum 10, count 4, mean 2.5.
    rank0, rank1 = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 4.0])
    global_sum = rank0.sum() + rank1.sum()
    w0 = normalize_weights(rank0, global_sum, 4)
    w1 = normalize_weights(rank1, global_sum, 4)
    assert w0.tolist() == pytest.approx([0.4, 1.2])
    assert torch.cat([w0, w1]).mean().item() == pytest.approx(1.0)


def test_normalize_all_zero_weights_falls_back_to_ones():
    w = normalize_weights(torch.zeros(3), torch.tensor(0.0), torch.tensor(6.0))
    assert w.tolist() == [1.0, 1.0, 1.0]


def test_half_precision_logits_are_computed_in_float32():
    logits = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.bfloat16)
    out = hard_negative_ce_per_sample(logits)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(math.log(math.exp(2) + 2) - 2, abs=1e-6)


# ------------------------------------------------------------------ the objective variants

def test_standardized_rows_keep_order_and_left_out_columns():
    from train.distill.losses import standardized_rows
    logits = torch.tensor([[10.0, 4.0, 1.0, -1.0e4], [2.0, 2.0, 2.0, 2.0]])
    got = standardized_rows(logits)
    kept = got[0, :3]
    # mean 5, std sqrt(((5)^2 + 1 + 16) / 3) = sqrt(14)
    assert kept.tolist() == pytest.approx([5 / 14 ** 0.5, -1 / 14 ** 0.5, -4 / 14 ** 0.5], abs=1e-5)
    assert got[0, 3].item() == -1.0e4  # a left-out column stays left out
    assert torch.isfinite(got[1]).all() and got[1].abs().max() < 1e-3  # a constant row: zeros, no nan


def test_margin_mse_by_hand_and_ignores_offsets():
    from train.distill.losses import margin_mse_per_sample
    student = torch.tensor([[3.0, 1.0, 0.0]])      # margins 2, 3
    teacher = torch.tensor([[5.0, 4.0, 1.0]])      # margins 1, 4
    assert margin_mse_per_sample(student, teacher).item() == pytest.approx((1 + 1) / 2)
    assert margin_mse_per_sample(student + 7.0, teacher - 2.0).item() == pytest.approx(1.0)
    # a left-out teacher column does not count; a row with none kept is 0
    masked = torch.tensor([[5.0, 4.0, -1.0e4], [5.0, -1.0e4, -1.0e4]])
    got = margin_mse_per_sample(torch.tensor([[3.0, 1.0, 0.0], [3.0, 1.0, 0.0]]), masked)
    assert got.tolist() == pytest.approx([1.0, 0.0])


def test_margin_floor_pushes_only_where_the_teacher_separates_more():
    from train.distill.losses import margin_floor_per_sample
    # student row [3, 1, 0]: mean 4/3, std sqrt(14/9); the teacher's row [4, 1, 4] standardised is
    # [1, -2, 1] / sqrt(2), so in the student's units its margins are 0 (negative 2: the teacher
    # scores it as high as the positive) and 3 * sqrt(14/9) / sqrt(2) = 2.6458 (negative 1).
    student = torch.tensor([[3.0, 1.0, 0.0]], requires_grad=True)   # margins 2, 3
    teacher = torch.tensor([[4.0, 1.0, 4.0]])
    loss = margin_floor_per_sample(student, teacher)
    # negative 1: floor 2.6458 > the student's margin 2: (0.6458)^2; negative 2: floor 0 < 3: none
    assert loss.item() == pytest.approx((3 * (14 / 9) ** 0.5 / 2 ** 0.5 - 2) ** 2 / 2, rel=1e-5)
    loss.sum().backward()
    assert student.grad[0, 2].item() == 0.0       # negative 2 is left where it is
    assert student.grad[0, 0].item() < 0 < student.grad[0, 1].item()
    # only the teacher's order and relative gaps count: an affine change of its logits is the same
    same = margin_floor_per_sample(student.detach(), 7.0 * teacher - 3.0)
    assert same.item() == pytest.approx(loss.item(), rel=1e-5)
    # a student whose margins are already wider than the rescaled teacher's: nothing to learn
    assert margin_floor_per_sample(torch.tensor([[9.0, 0.0, 0.0]]), teacher).item() == 0.0
    # a left-out teacher column does not count; a row with none kept is 0
    masked = torch.tensor([[4.0, 1.0, -1.0e4], [5.0, -1.0e4, -1.0e4]])
    got = margin_floor_per_sample(torch.tensor([[3.0, 2.0, 0.0], [3.0, 1.0, 0.0]]), masked)
    # row 0 over its two kept columns: student [3, 2] std 0.5, teacher standardised [1, -1]:
    # floor 2 * 0.5 = 1 = the student's margin 1, so no shortfall
    assert got.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_denoised_ce_counts_teacher_near_positives_as_positives():
    from train.distill.losses import denoised_ce_per_sample
    student = torch.tensor([[1.0, 1.0, 0.0]])
    teacher = torch.tensor([[2.0, 1.5, -3.0]])
    # margin 0: only the positive; the second column scores below it
    plain = denoised_ce_per_sample(student, teacher, 0.0)
    assert plain.item() == pytest.approx(hard_negative_ce_per_sample(student).item())
    # margin 1: column 1 (1.5 >= 2 - 1) joins the positives: -log((e + e) / (e + e + 1))
    e = math.e
    assert denoised_ce_per_sample(student, teacher, 1.0).item() == pytest.approx(-math.log(2 * e / (2 * e + 1)))
    # the gradient never pushes an extra positive down
    s = student.clone().requires_grad_(True)
    denoised_ce_per_sample(s, teacher, 1.0).sum().backward()
    assert s.grad[0, 1] <= 0


@pytest.mark.parametrize("objective", ["published", "listwise", "denoised", "margin"])
def test_every_objective_gives_finite_terms_and_gradients(objective):
    from train.distill.dcd import DCDConfig, distillation_terms
    torch.manual_seed(0)
    student = torch.randn(5, 8, requires_grad=True)
    teacher = torch.randn(5, 8) * 4
    teacher[1, 3:] = -1.0e4  # a row with left-out columns
    kd, hard = distillation_terms(student, teacher, DCDConfig(objective=objective, positive_margin=0.5))
    assert kd.shape == hard.shape == (5,)
    (kd.sum() + hard.sum()).backward()
    assert torch.isfinite(kd).all() and torch.isfinite(hard).all() and torch.isfinite(student.grad).all()
    if objective == "published":
        assert kd.tolist() == pytest.approx(kd_loss_per_sample(student, teacher).tolist())


def test_unknown_objective_is_refused():
    from train.distill.dcd import DCDConfig
    with pytest.raises(ValueError, match="objective"):
        DCDConfig(objective="magic")
