"""Pure loss and weighting functions of DCD: InfoNCE, KD (kl | mse), hard-negative CE, dynamic weights.

No collectives in here: where a quantity must be global (the mean of the weights over the global
batch), the caller all-reduces and passes the result in. Per-sample functions return [Q] so that the
caller can weight samples and choose the reduction. Losses are computed in at least float32 whatever
the dtype of the logits (bf16 / fp16 log-softmax over a pool loses too much precision); float64
stays float64.

Candidate-set convention: ``[Q, C]`` logits over a candidate set have the positive at column 0 and
the C - 1 hard negatives after it, for teacher and student alike (see ``negatives.candidate_set_logits``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHTING_SCHEMES = ("entropy", "wsl", "none")
KD_KINDS = ("kl", "mse")
# What the two distillation terms are (dcd.py combines them as alpha * KD + (1 - alpha) * HARD):
#   published: KD = kl | mse of the raw teacher logits;      HARD = CE with the positive as target
#   listwise:  KD = KL to the row-standardised teacher;      HARD = as published
#   denoised:  KD = as published;                            HARD = CE over the positive and every
#              candidate the teacher scores at least (positive - positive_margin): extra positives
#   margin:    KD = Margin-MSE of student vs teacher margins; HARD = as published
#   margin_floor: KD = the teacher's margins as a floor (one-sided Margin-MSE); HARD = as published
# Each variant changes one thing of the published objective, so the ablation reads as a diff.
OBJECTIVES = ("published", "listwise", "denoised", "margin", "margin_floor")
# Logits at or below this are columns left out of a candidate set (negatives.MASKED_LOGIT is -1e4).
_LEFT_OUT = -1.0e3

# Guard for CE_t -> 0 in the wsl weight (a teacher certain of the positive). With CE_t clamped to
# 1e-6, a student that is also right (CE_s ~ 0) gets w ~ 0 (nothing left to learn from that sample)
# and a student that is wrong gets w = 1 (the largest weight), which is the limit of the formula.
WSL_EPS = 1e-6


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def multi_positive_cross_entropy_per_sample(logits: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
    """-log(sum over positives of softmax(logits)) per row.

    Args:
        logits: [Q, G] a query against every key of the pool.
        positive_mask: [Q, G] bool, True where the key is a positive of the query (every caption of
            the query's image, every copy of the caption's image). Each row needs at least one.
    Returns:
        [Q] losses.

    Why this multi-positive form rather than the mean of -log softmax over positives (SupCon's
    "out" form): here positives only sum in the numerator, so a positive never pushes another
    positive away, which is what "captions of the same image are positives, never negatives" asks.
    With one positive per row it is the ordinary cross-entropy.
    """
    logits = _at_least_float32(logits)
    positive_logits = logits.masked_fill(~positive_mask, float("-inf"))
    return torch.logsumexp(logits, dim=1) - torch.logsumexp(positive_logits, dim=1)


def info_nce(logits_i2t: torch.Tensor, logits_t2i: torch.Tensor,
             positive_mask_i2t: torch.Tensor, positive_mask_t2i: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the pool, averaged over this rank's queries and the two directions.

    Args:
        logits_i2t: [B, G] local images against the caption pool.
        logits_t2i: [B, G] local captions against the image pool.
        positive_mask_i2t, positive_mask_t2i: [B, G] bool, True where image ids match.
    Returns:
        scalar: 0.5 * (mean_i CE_i2t,i + mean_i CE_t2i,i) (a local mean: see dcd.py for why the
        ranks' local means give the global gradient).
    """
    loss_i2t = multi_positive_cross_entropy_per_sample(logits_i2t, positive_mask_i2t).mean()
    loss_t2i = multi_positive_cross_entropy_per_sample(logits_t2i, positive_mask_t2i).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def kd_loss_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0, kind: str = "kl") -> torch.Tensor:
    """Distillation loss per query over its candidate set.

    Args:
        student_logits: [Q, C] student logits (scale * cos), positive at column 0.
        teacher_logits: [Q, C] teacher matching logits at the same columns (no gradient taken).
        temperature: T of the softened distributions (``kl`` only).
        kind: ``"kl"``: T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) (the T^2 keeps the gradient
            scale independent of T, as in Hinton et al.); ``"mse"``: mean over the C columns of
            (z_s - z_t)^2 (the published code's logit MSE).
    Returns:
        [Q] losses.
    """
    student_logits = _at_least_float32(student_logits)
    teacher_logits = _at_least_float32(teacher_logits.detach())
    if kind == "kl":
        log_p_student = F.log_softmax(student_logits / temperature, dim=1)
        log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
        return temperature ** 2 * kl
    if kind == "mse":
        return (student_logits - teacher_logits).pow(2).mean(dim=1)
    raise ValueError(f"unknown kd loss {kind!r} (one of {KD_KINDS})")


def standardized_rows(logits: torch.Tensor) -> torch.Tensor:
    """Each row shifted and scaled to mean 0 and standard deviation 1 over its kept columns; left-out
    columns (logits <= -1e3) stay far below every kept one.

    Why: a cross-encoder's logits live on its own scale (the FiLM teacher's span ~10-20 logits, so
    softmax(z_t) is nearly one-hot and says little beyond the argmax), while the student's are
    scale * cos. Standardising per row keeps the teacher's ORDER and relative gaps and makes the
    target's sharpness a choice (the KD temperature), not an accident of the teacher's training.
    """
    logits = _at_least_float32(logits)
    kept, mean, std = _row_moments(logits)
    return torch.where(kept, (logits - mean) / std.clamp_min(1e-6), logits)


def _row_moments(logits: torch.Tensor, kept: torch.Tensor | None = None):
    """(kept [Q, C] bool, mean [Q, 1], standard deviation [Q, 1]) of each row over its kept columns
    (by default logits > -1e3; `kept` names them when another tensor decides)."""
    kept = logits > _LEFT_OUT if kept is None else kept
    count = kept.sum(dim=1, keepdim=True).clamp_min(1)
    mean = torch.where(kept, logits, 0.0).sum(dim=1, keepdim=True) / count
    var = torch.where(kept, (logits - mean) ** 2, 0.0).sum(dim=1, keepdim=True) / count
    return kept, mean, var.sqrt()


def _margin_gaps(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """(s_0 - s_k) - (t_0 - t_k) per negative k [Q, C-1], and which negatives are kept (float 0/1):
    the student's margin over each negative minus the teacher's (no gradient into the teacher)."""
    student_logits = _at_least_float32(student_logits)
    teacher_logits = _at_least_float32(teacher_logits.detach())
    kept = (teacher_logits[:, 1:] > _LEFT_OUT).to(student_logits.dtype)
    student_margin = student_logits[:, :1] - student_logits[:, 1:]
    teacher_margin = teacher_logits[:, :1] - teacher_logits[:, 1:]
    return student_margin - teacher_margin, kept


def _mean_over_kept(values: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Row means of `values` over the kept (1.0) columns; 0 for a row with none kept."""
    return (values * kept).sum(dim=1) / kept.sum(dim=1).clamp_min(1.0)


def margin_mse_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Margin-MSE (Hofstaetter et al.): mean over the kept negatives k of
    ((s_0 - s_k) - (t_0 - t_k))^2, positive at column 0.

    Only differences are matched, so the two models' offsets do not matter; where the teacher sees
    two candidates as equally good (margin ~0, e.g. a caption true of both images) the student is
    not pushed to separate them, and where it separates a twin by a wide margin the student must too.

    Args:
        student_logits, teacher_logits: [Q, C] (left-out columns <= -1e3 in the teacher's set).
    Returns:
        [Q] losses (0 for a row with no kept negative).
    """
    gap, kept = _margin_gaps(student_logits, teacher_logits)
    return _mean_over_kept(gap.pow(2), kept)


def margin_floor_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """One-sided Margin-MSE against the teacher rescaled to the student's spread: mean over the kept
    negatives k of relu((t'_0 - t'_k) - (s_0 - s_k))^2, where t' is the teacher's row standardised
    and multiplied by the standard deviation of the student's row (no gradient through either).

    Why one-sided: KL and Margin-MSE also pull the student's margins DOWN wherever it separates a
    negative more than the teacher does, which undoes what the contrastive loss learns whenever the
    teacher is the less certain model (measured here: over a whole gallery the student out-ranks the
    teacher, and every two-sided term cost 18-24 RSUM). The floor only pushes a negative away where
    the teacher separates it from the positive by more than the student does (e.g. a twin that
    differs in binding), and leaves the student's own, wider margins alone.
    Why rescaled: the teacher's raw margins are 10-20 logits where the student's are ~1 early on, so
    a raw floor is hundreds of units of loss that the student meets by inflating its logit scale,
    not by reordering; in the student's own units the floor asks for the teacher's ORDER and
    relative gaps only.

    Args:
        student_logits, teacher_logits: [Q, C], positive at column 0 (left-out columns <= -1e3 in
            the teacher's set).
    Returns:
        [Q] losses (0 for a row with no kept negative).
    """
    student_logits = _at_least_float32(student_logits)
    teacher_logits = _at_least_float32(teacher_logits.detach())
    kept = teacher_logits > _LEFT_OUT
    # the student's spread over the same kept columns, as a constant: the target's unit, not a lever
    _, _, student_std = _row_moments(student_logits.detach(), kept)
    teacher_rescaled = torch.where(kept, standardized_rows(teacher_logits) * student_std, teacher_logits)
    gap, kept_negatives = _margin_gaps(student_logits, teacher_rescaled)
    return _mean_over_kept(torch.relu(-gap).pow(2), kept_negatives)


def denoised_ce_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           positive_margin: float) -> torch.Tensor:
    """Multi-positive CE over the candidate set: the positive and every candidate the teacher scores
    at least (its positive - positive_margin) are targets (RocketQA's cross-encoder denoising, in
    ALBEF's multi-positive form: positives only sum in the numerator).

    Args:
        student_logits, teacher_logits: [Q, C], positive at column 0.
        positive_margin: logits below the positive that still count as a positive (0: only
            candidates the teacher scores as high as the positive).
    Returns:
        [Q] losses.
    """
    teacher_logits = _at_least_float32(teacher_logits.detach())
    extra = teacher_logits[:, 1:] >= teacher_logits[:, :1] - positive_margin
    positives = torch.cat([torch.ones_like(extra[:, :1]), extra], dim=1)
    return multi_positive_cross_entropy_per_sample(student_logits, positives)


def hard_negative_ce_per_sample(student_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the candidate set with the positive (column 0) as target.

    Args:
        student_logits: [Q, C], positive at column 0.
    Returns:
        [Q] losses.
    """
    student_logits = _at_least_float32(student_logits)
    return torch.logsumexp(student_logits, dim=1) - student_logits[:, 0]


@torch.no_grad()
def dynamic_weights(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                    scheme: str = "entropy") -> torch.Tensor:
    """Raw per-sample weights, without gradient (normalise them with ``normalize_weights``).

    Args:
        teacher_logits: [Q, C], positive at column 0.
        student_logits: [Q, C], positive at column 0.
        scheme: ``"entropy"``: H(softmax(z_t)) per row (nats): samples the teacher finds ambiguous
            weigh more (the published code); ``"wsl"``: 1 - exp(-CE_s / CE_t) with
            CE = -log softmax(z)[0], CE_t clamped to ``WSL_EPS``: large where the student is far
            behind a confident teacher, small where the student already does as well as the teacher
            (weighted soft labels); ``"none"``: ones (the ablation).
    Returns:
        [Q] weights (float32, or float64 for float64 logits), detached.
    """
    teacher_logits = _at_least_float32(teacher_logits.detach())
    student_logits = _at_least_float32(student_logits.detach())
    if scheme == "entropy":
        log_p = F.log_softmax(teacher_logits, dim=1)
        return -(log_p.exp() * log_p).sum(dim=1)
    if scheme == "wsl":
        ce_student = -F.log_softmax(student_logits, dim=1)[:, 0]
        ce_teacher = -F.log_softmax(teacher_logits, dim=1)[:, 0]
        return 1.0 - torch.exp(-ce_student / ce_teacher.clamp_min(WSL_EPS))
    if scheme == "none":
        return torch.ones(teacher_logits.shape[0], dtype=teacher_logits.dtype, device=teacher_logits.device)
    raise ValueError(f"unknown weighting {scheme!r} (one of {WEIGHTING_SCHEMES})")


@torch.no_grad()
def normalize_weights(raw: torch.Tensor, global_sum: torch.Tensor, global_count) -> torch.Tensor:
    """Scale raw weights so that their mean over the GLOBAL batch is 1.

    Args:
        raw: [Q] this rank's raw weights.
        global_sum: scalar, sum of the raw weights over every rank (the caller all-reduces it).
        global_count: scalar, number of weights over every rank.
    Returns:
        [Q] raw * count / sum. When the global sum is 0 (every raw weight 0, e.g. a one-hot teacher
        under ``entropy``), the weights carry no information: returns ones so that the step still
        trains on its KD and hard terms instead of silently switching them off.
    """
    raw = _at_least_float32(raw)
    global_sum = torch.as_tensor(global_sum, dtype=raw.dtype, device=raw.device)
    global_count = torch.as_tensor(global_count, dtype=raw.dtype, device=raw.device)
    mean = global_sum / global_count.clamp_min(1.0)
    return torch.where(mean > 0, raw / mean.clamp_min(torch.finfo(raw.dtype).tiny), torch.ones_like(raw))
