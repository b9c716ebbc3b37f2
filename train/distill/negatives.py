"""Candidate sets for distillation: the student proposes, the teacher ranks, top-K hard negatives.

Indices are positions in the gathered pool (0 .. G-1). All selection runs without gradient: which
candidates are chosen is not differentiable; the student's logits at the chosen columns are taken
afterwards from its (differentiable) B x G logits.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


@torch.no_grad()
def student_proposals(similarity: torch.Tensor, positive_mask: torch.Tensor, M: int) -> torch.Tensor:
    """The student's top-M pool entries per query, every positive excluded.

    Args:
        similarity: [Q, G] student similarity (logits or cosine) of each query to the pool.
        positive_mask: [Q, G] bool, True for the query's positives: its own pair and every other
            entry of the same image (a caption of the same image is not a negative).
    Returns:
        candidate_index [Q, M'] long, sorted by decreasing student similarity, with
        M' = min(M, G - max positives per row): every row gets the same number of genuine negatives
        when the pool is too small for M (M' may be 0 on a degenerate pool of one image).
    """
    G = similarity.shape[1]
    max_positives = int(positive_mask.sum(dim=1).max().item()) if positive_mask.numel() else 0
    m = max(0, min(M, G - max_positives))
    similarity = similarity.detach()
    if similarity.dtype not in (torch.float32, torch.float64):
        similarity = similarity.float()
    masked = similarity.masked_fill(positive_mask, float("-inf"))
    return torch.topk(masked, m, dim=1, largest=True, sorted=True).indices


@torch.no_grad()
def teacher_ranked_negatives(teacher_scores: torch.Tensor, candidate_index: torch.Tensor,
                             K: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The K candidates the teacher scores highest, as hard negatives.

    Args:
        teacher_scores: [Q, M] teacher logits of (query, candidate_index[q, m]).
        candidate_index: [Q, M] pool indices proposed by the student.
        K: number of hard negatives (clipped to M).
    Returns:
        negative_index [Q, K] pool indices and negative_teacher_logits [Q, K], both in decreasing
        teacher score.
    """
    k = min(K, candidate_index.shape[1])
    top = torch.topk(teacher_scores.detach(), k, dim=1, largest=True, sorted=True)
    return candidate_index.gather(1, top.indices), top.values


# Logit of a candidate column left out of a row's set: finite, so that KL and CE stay defined
# (softmax puts exactly 0 there in float32), and low enough that no real logit comes near it.
MASKED_LOGIT = -1.0e4


@torch.no_grad()
def likely_false_negatives(teacher_scores: torch.Tensor, teacher_positive: torch.Tensor,
                           margin: float) -> torch.Tensor:
    """Candidates the teacher scores within `margin` of the query's own positive, or above it.

    On data where many keys match a query besides its own (synthetic captions such as "a red
    circle" are true of ~55 of 1,000 scenes), an accurate teacher scores those as high as the
    positive, so "the K the teacher scores highest" are mostly keys that also match: the hard-
    negative CE then pushes true matches away (measured with the ground-truth teacher: the
    student's top-10 captions went from 47% to 41% true). Leaving these out of the candidate set
    keeps the teacher-ranked negatives ones the teacher actually ranks below the positive.

    Args:
        teacher_scores: [Q, M] teacher logits of the proposals.
        teacher_positive: [Q] teacher logit of each query's positive.
        margin: a proposal counts as a likely false negative when its logit >= positive - margin.
    Returns:
        [Q, M] bool.
    """
    return teacher_scores >= teacher_positive.unsqueeze(1) - margin


def candidate_set_logits(positive_logit: torch.Tensor, negative_logits: torch.Tensor,
                         valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits over the candidate set {positive} + negatives, the positive ALWAYS at column 0.

    Build the teacher's and the student's sets with this one function from the same negative
    columns: column c then means the same (query, key) pair for both, whatever order the teacher
    prefers. (The published code sorted the teacher's scores including the positive and so lost the
    alignment whenever the teacher ranked a negative above the positive.)

    Args:
        positive_logit: [Q] logit of (query, its positive).
        negative_logits: [Q, K] logits of (query, negative k).
        valid: optional [Q, K] bool; False columns get MASKED_LOGIT (no probability, no gradient),
            for rows with fewer than K usable negatives.
    Returns:
        [Q, 1 + K].
    """
    if valid is not None:
        negative_logits = negative_logits.masked_fill(~valid, MASKED_LOGIT)
    return torch.cat([positive_logit.unsqueeze(1), negative_logits], dim=1)


@torch.no_grad()
def random_candidates(candidate_index: torch.Tensor, K: int,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """K of the M proposals per row, uniformly at random without replacement (no teacher ranking).

    The ablation "KD on random candidates": the student still proposes its top-M, the teacher
    still supplies the KD targets, but the teacher does not choose which K of the M are kept.
    (``random_pool_candidates`` draws from the whole pool instead: no hard negatives at all.)

    Args:
        candidate_index: [Q, M] pool indices.
        K: number kept (clipped to M).
        generator: optional seeded generator (on the CPU: the draw happens there).
    Returns:
        [Q, K] pool indices.
    """
    Q, M = candidate_index.shape
    k = min(K, M)
    noise = torch.rand((Q, M), generator=generator)
    keep = torch.topk(noise, k, dim=1).indices.to(candidate_index.device)
    return candidate_index.gather(1, keep)


@torch.no_grad()
def random_pool_candidates(positive_mask: torch.Tensor, K: int,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """K non-positive pool entries per row, uniformly at random without replacement.

    Args:
        positive_mask: [Q, G] bool, True for positives (never drawn).
        K: number drawn (clipped as in ``student_proposals``).
    Returns:
        [Q, K'] pool indices.
    """
    noise = torch.rand(positive_mask.shape, generator=generator).to(positive_mask.device)
    return student_proposals(noise, positive_mask, K)
