"""Retrieval metrics: Recall@K both ways, RSUM, binding (twin) accuracy. Pure tensor functions.

Conventions (Flickr30K 1K / COCO 5K test, as in open_clip and VSE++):
- `scores[i, t]` is the similarity of image i and caption t; `caption_image_index[t]` is the gallery
  index of caption t's image. Several captions per image are allowed.
- Text retrieval (TR, image query): correct at K if ANY of the image's captions is in the top K.
- Image retrieval (IR, caption query): correct at K if the caption's own image is in the top K.
- Results are percentages; `rsum` is the sum of the six recalls (600 at best).

Ties count against the query (pessimistic): the rank of a query's best positive is the number of
NEGATIVES scoring greater than OR EQUAL to it. A model that gives every pair the same score therefore
gets recall 0 (not 100), and the result does not depend on the order of the gallery. Positives tied
with each other do not hurt each other (any positive in the top K is a hit).

Partial rankings (retrieve-then-rerank scores only a top-k per query) go through
`retrieval_metrics_from_ranked`, which reads the given order as is.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import torch

RECALL_KS = (1, 5, 10)
METRIC_KEYS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum")

# Rows compared at once: bounds the [rows, gallery] boolean temporaries for big galleries
# (COCO 5K x 25K would otherwise allocate ~125M booleans per comparison).
_ROW_CHUNK = 1024
# Rank given to a query whose positive is not in its (truncated) ranked list: a miss at every K.
MISSING_RANK = torch.iinfo(torch.long).max


def _check_inputs(scores: torch.Tensor, caption_image_index: torch.Tensor) -> torch.Tensor:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [images, captions], got shape {tuple(scores.shape)}")
    caption_image_index = torch.as_tensor(caption_image_index, dtype=torch.long, device=scores.device)
    num_images, num_captions = scores.shape
    if caption_image_index.shape != (num_captions,):
        raise ValueError(f"caption_image_index must have {num_captions} entries, "
                         f"got shape {tuple(caption_image_index.shape)}")
    if num_captions and (caption_image_index.min() < 0 or caption_image_index.max() >= num_images):
        raise ValueError("caption_image_index points outside the image gallery")
    return caption_image_index


def image_to_text_ranks(scores: torch.Tensor, caption_image_index: torch.Tensor) -> torch.Tensor:
    """0-based rank of each image's best caption among the OTHER images' captions: long [I].

    rank = #(negative captions with score >= the best positive score). Every image needs a caption.
    """
    caption_image_index = _check_inputs(scores, caption_image_index)
    num_images = scores.shape[0]
    counts = torch.bincount(caption_image_index, minlength=num_images)
    if num_images and counts.min() == 0:
        raise ValueError("every image needs at least one caption for text retrieval")
    return _best_positive_ranks(scores, lambda rows: caption_image_index.unsqueeze(0) == rows.unsqueeze(1))


def _best_positive_ranks(scores: torch.Tensor, positives_of) -> torch.Tensor:
    """Per row of scores, in chunks of rows: #(non-positives scored >= the row's best positive)
    (ties count against the query); MISSING_RANK for a row without positives.
    positives_of(rows) -> bool [len(rows), columns]."""
    num_rows = scores.shape[0]
    ranks = torch.empty(num_rows, dtype=torch.long, device=scores.device)
    for start in range(0, num_rows, _ROW_CHUNK):
        rows = torch.arange(start, min(start + _ROW_CHUNK, num_rows), device=scores.device)
        chunk, positive = scores[rows].float(), positives_of(rows)
        best_positive = chunk.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
        counted = ((chunk >= best_positive) & ~positive).sum(dim=1)
        ranks[rows] = torch.where(positive.any(dim=1), counted, torch.full_like(counted, MISSING_RANK))
    return ranks


def text_to_image_ranks(scores: torch.Tensor, caption_image_index: torch.Tensor) -> torch.Tensor:
    """0-based rank of each caption's own image among the other images: long [T].

    rank = #(other images with score >= the own image's score).
    """
    caption_image_index = _check_inputs(scores, caption_image_index)
    by_caption = scores.t()  # [T, I]
    num_captions = by_caption.shape[0]
    ranks = torch.empty(num_captions, dtype=torch.long, device=scores.device)
    for start in range(0, num_captions, _ROW_CHUNK):
        rows = torch.arange(start, min(start + _ROW_CHUNK, num_captions), device=scores.device)
        chunk = by_caption[rows].float()
        own = caption_image_index[rows]
        own_score = chunk.gather(1, own.unsqueeze(1))
        not_own = torch.ones_like(chunk, dtype=torch.bool).scatter_(1, own.unsqueeze(1), False)
        ranks[rows] = ((chunk >= own_score) & not_own).sum(dim=1)
    return ranks


def recall_at(ranks: torch.Tensor, k: int) -> float:
    """Percentage of queries whose 0-based rank is below k (0.0 for no queries)."""
    if ranks.numel() == 0:
        return 0.0
    return 100.0 * (ranks < k).float().mean().item()


def metrics_from_ranks(image_ranks: torch.Tensor, caption_ranks: torch.Tensor,
                       ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
    """tr_r{k} from image-query ranks, ir_r{k} from caption-query ranks, and rsum."""
    out = {f"tr_r{k}": recall_at(image_ranks, k) for k in ks}
    out.update({f"ir_r{k}": recall_at(caption_ranks, k) for k in ks})
    out["rsum"] = sum(out.values())
    return out


def retrieval_metrics(scores: torch.Tensor, caption_image_index: torch.Tensor) -> Dict[str, float]:
    """Recall@1/5/10 both ways and RSUM from a full [images, captions] score matrix (percentages)."""
    return metrics_from_ranks(image_to_text_ranks(scores, caption_image_index),
                              text_to_image_ranks(scores, caption_image_index))


def _first_hit_ranks(ranked: torch.Tensor, is_positive: torch.Tensor) -> torch.Tensor:
    """Position of the first positive in each ranked row; MISSING_RANK when there is none."""
    num_queries, length = ranked.shape
    if length == 0:
        return torch.full((num_queries,), MISSING_RANK, dtype=torch.long, device=ranked.device)
    positions = torch.arange(length, device=ranked.device).expand_as(ranked)
    not_found = torch.full_like(positions, MISSING_RANK)
    return torch.where(is_positive, positions, not_found).min(dim=1).values


def retrieval_metrics_from_ranked(ranked_captions_per_image: torch.Tensor,
                                  ranked_images_per_caption: torch.Tensor,
                                  caption_image_index: torch.Tensor,
                                  ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
    """Recall@K and RSUM from ranked lists (best first), e.g. after reranking a top-k.

    ranked_captions_per_image: long [I, n] caption ids for image query i; ranked_images_per_caption:
    long [T, m] image ids for caption query t. Lists may be truncated: a positive beyond the end is a
    miss, so lists of length >= max(ks) give the exact full-gallery recall for that ordering.
    The order is taken as given (the caller decides how ties were broken).
    """
    caption_image_index = torch.as_tensor(caption_image_index, dtype=torch.long)
    ranked_captions_per_image = torch.as_tensor(ranked_captions_per_image, dtype=torch.long)
    ranked_images_per_caption = torch.as_tensor(ranked_images_per_caption, dtype=torch.long)
    num_images = ranked_captions_per_image.shape[0]
    if ranked_images_per_caption.shape[0] != caption_image_index.shape[0]:
        raise ValueError("one ranked image list per caption is needed")
    image_of_ranked_caption = caption_image_index[ranked_captions_per_image]
    image_hits = image_of_ranked_caption == torch.arange(num_images).unsqueeze(1)
    caption_hits = ranked_images_per_caption == caption_image_index.unsqueeze(1)
    return metrics_from_ranks(_first_hit_ranks(ranked_captions_per_image, image_hits),
                              _first_hit_ranks(ranked_images_per_caption, caption_hits), ks)


def truth_aware_metrics(scores: torch.Tensor, truth: torch.Tensor, caption_image_index: torch.Tensor,
                        ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
    """Recall@K both ways and RSUM where a hit is any caption true of the image query, and any image
    the caption query is true of (own pairs always count): the own-caption labels completed by ground
    truth, like ECCV Caption's plausible matches. truth: bool [images, captions]. Where captions are
    true of many images, own-caption recall counts a true caption written for another image as a
    miss; this does not. Ties count against the query, as in the own-caption ranks."""
    caption_image_index = _check_inputs(scores, caption_image_index)
    own = caption_image_index.unsqueeze(0) == torch.arange(scores.shape[0], device=scores.device).unsqueeze(1)
    hits = truth.to(device=scores.device, dtype=torch.bool) | own
    return metrics_from_ranks(_best_positive_ranks(scores, lambda rows: hits[rows]),
                              _best_positive_ranks(scores.t(), lambda rows: hits.t()[rows]), ks)


def binding_accuracy(own_scores: torch.Tensor, twin_scores: torch.Tensor) -> Optional[float]:
    """Percentage of captions whose own image scores strictly above its twin image (ties are wrong).

    own_scores[n] = score(caption n, its image); twin_scores[n] = score(caption n, its image's twin).
    Returns None when there is no caption with a twin (the split names no twins).
    """
    own_scores = torch.as_tensor(own_scores).float().flatten()
    twin_scores = torch.as_tensor(twin_scores).float().flatten()
    if own_scores.shape != twin_scores.shape:
        raise ValueError("own_scores and twin_scores must have the same length")
    if own_scores.numel() == 0:
        return None
    return 100.0 * (own_scores > twin_scores).float().mean().item()


def twin_pairs(caption_image_index: torch.Tensor, image_twin_index: torch.Tensor):
    """(caption ids, own image ids, twin image ids) for captions whose image has a twin in the gallery.

    image_twin_index[i] is the gallery index of image i's twin, or -1 when it has none (or the twin
    is outside the gallery, e.g. with a subset evaluation).
    """
    caption_image_index = torch.as_tensor(caption_image_index, dtype=torch.long)
    image_twin_index = torch.as_tensor(image_twin_index, dtype=torch.long)
    twin_of_caption = image_twin_index[caption_image_index]
    captions = torch.nonzero(twin_of_caption >= 0).flatten()
    return captions, caption_image_index[captions], twin_of_caption[captions]


def binding_accuracy_from_scores(scores: torch.Tensor, caption_image_index: torch.Tensor,
                                 image_twin_index: torch.Tensor) -> Optional[float]:
    """Binding accuracy read off a full [images, captions] score matrix (see `binding_accuracy`)."""
    captions, own, twin = twin_pairs(caption_image_index, image_twin_index)
    return binding_accuracy(scores[own, captions], scores[twin, captions])


def format_table(rows: Dict[str, Dict[str, float]], keys: Iterable[str] = METRIC_KEYS) -> str:
    """A plain-text table: one row per named result, one column per metric."""
    keys = list(keys)
    name_width = max([len("model")] + [len(name) for name in rows])
    header = "model".ljust(name_width) + "".join(f"{key:>9}" for key in keys)
    lines = [header, "-" * len(header)]
    for name, values in rows.items():
        cells = "".join(f"{values[key]:9.2f}" if values.get(key) is not None else f"{'-':>9}"
                        for key in keys)
        lines.append(name.ljust(name_width) + cells)
    return "\n".join(lines)
