"""DCD from stored teacher signals: the table a scoring pass writes (tools/score_teacher.py) and the
objective that reads it instead of calling the teacher.

The scoring pass proposes, for every image of a split, the proposer's top-M captions of the WHOLE
split, and for every caption its top-M images (``exact_top_candidates``), and stores the teacher's
score of each of those pairs and of every positive (``StoredSignals``). In a training step
``stored_dcd_loss`` looks the distilled queries' stored candidates up in the gathered pool and hands
their stored scores to the same candidate-set, terms and weights code as the online objective
(``dcd.distill_from_scores``): the teacher's top K of the M, KD / hard CE of every objective variant,
the margins, dynamic weights from the CURRENT student's logits. A stored candidate that is not in
this step's pool ranks last (score -inf) and is left out of its row's set like a dropped false
negative; the clustered sampler (train/clustered.py) composes batches so that few are missing.
Pure tensor functions: nothing here knows about files or ranks beyond the injected Collectives.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

import torch

from .dcd import DCDConfig, _contrastive_pool, _distilled_queries, _TeacherScores, distill_from_scores
from .gather import Collectives, local_logits

TABLE_KEYS = ("image_ids", "caption_image", "i2t_index", "i2t_score", "t2i_index", "t2i_score",
              "positive_score")


class StoredSignals(NamedTuple):
    """One split's stored signals. Rows: images in split order, captions flattened in split order
    (an image's captions are consecutive). Candidates are sorted by the proposer's similarity."""
    image_ids: torch.Tensor       # long [N] dataset image id of each image row
    caption_image: torch.Tensor   # long [C] image row of each caption row
    i2t_index: torch.Tensor       # long [N, M] caption rows proposed for each image (own excluded)
    i2t_score: torch.Tensor       # float [N, M] teacher logit of (image, proposed caption)
    t2i_index: torch.Tensor       # long [C, M] image rows proposed for each caption (own excluded)
    t2i_score: torch.Tensor       # float [C, M] teacher logit of (proposed image, caption)
    positive_score: torch.Tensor  # float [C] teacher logit of (own image, caption)

    def candidates(self, direction: str) -> int:
        """M stored for a direction; 0 for a direction the pass did not score (--directions)."""
        return int((self.i2t_index if direction == "i2t" else self.t2i_index).shape[1])

    def caption_start(self) -> torch.Tensor:
        """[N] the first caption row of each image."""
        counts = torch.bincount(self.caption_image, minlength=self.image_ids.shape[0])
        return torch.cumsum(counts, 0) - counts

    def image_rows(self, image_ids: torch.Tensor) -> torch.Tensor:
        """Image row of each dataset image id; -1 for ids the table does not hold."""
        sorted_ids, order = torch.sort(self.image_ids)
        at = torch.searchsorted(sorted_ids, image_ids).clamp(max=max(0, sorted_ids.numel() - 1))
        found = sorted_ids[at] == image_ids
        return torch.where(found, order[at], torch.full_like(image_ids, -1))


@torch.no_grad()
def exact_top_candidates(query_emb: torch.Tensor, key_emb: torch.Tensor, query_owner: torch.Tensor,
                         key_owner: torch.Tensor, M: int, chunk: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each query's top-M keys by dot product, keys of the query's own image excluded.

    Exact: chunks of queries against every key (one [chunk, K] matrix product and a topk each), so
    memory is chunk x keys whatever the split's size.
    Args:
        query_emb [Q, D], key_emb [K, D]: L2-normalised embeddings.
        query_owner [Q], key_owner [K]: image row of each query / key (equal = a positive).
        M: candidates per query (clipped to the keys that are not positives of every query).
    Returns:
        (index [Q, M'] long, similarity [Q, M']) sorted by decreasing similarity.
    """
    most_positives = int(torch.bincount(key_owner).max()) if key_owner.numel() else 0
    m = max(0, min(M, key_emb.shape[0] - most_positives))
    indices, values = [], []
    for start in range(0, query_emb.shape[0], chunk):
        similarity = query_emb[start:start + chunk] @ key_emb.t()
        own = query_owner[start:start + chunk].view(-1, 1) == key_owner.view(1, -1)
        top = torch.topk(similarity.masked_fill(own, float("-inf")), m, dim=1)
        indices.append(top.indices)
        values.append(top.values)
    if not indices:
        return torch.empty(0, m, dtype=torch.long), torch.empty(0, m)
    return torch.cat(indices), torch.cat(values)


class EmbeddedCandidates(NamedTuple):
    """Stored candidates this rank's student embedded beside its batch (``embedded_candidate_rows``):
    they are keys of the distilled queries only, never InfoNCE rows."""
    caption_rows: torch.Tensor   # long [Ec] table caption rows (i2t candidates)
    text_emb: torch.Tensor       # [Ec, D] their student embeddings (with gradient unless --stored-candidate-grad false)
    image_rows: torch.Tensor     # long [Ei] table image rows (t2i candidates)
    image_emb: torch.Tensor      # [Ei, D]


def stored_dcd_loss(image_emb_local: torch.Tensor, text_emb_local: torch.Tensor, logit_scale: torch.Tensor,
                    image_ids_local: torch.Tensor, caption_rows_local: torch.Tensor, signals: StoredSignals,
                    comm: Collectives, cfg: DCDConfig, distill_weight: float = 1.0,
                    embedded: EmbeddedCandidates | None = None) -> Tuple[torch.Tensor, Dict]:
    """``dcd.dcd_loss`` with the teacher's scores read from ``signals``: no teacher call.

    Args are dcd_loss's, less the raw inputs and the teacher, plus:
        caption_rows_local: [B] long, the signals' caption row of each local caption.
        signals: the split's stored table (on the device of the embeddings).
        embedded: stored candidates the student embedded beside the batch; they extend the distilled
            queries' rows of the pool (InfoNCE is computed before, on the batch alone).
    The candidates are the stored ones (the proposer's top ``cfg.candidates`` of the split), found
    in the pool or among ``embedded``, those in neither left out; with ``negatives_from`` other
    than teacher there is nothing stored to draw from, so it must be "teacher" (train/config.py checks).
    """
    before = dict(comm.bytes_moved)
    pool = _contrastive_pool(image_emb_local, text_emb_local, logit_scale, image_ids_local, comm)
    queries = _distilled_queries(pool, cfg, image_emb_local.device)
    image_rows = comm.all_gather_no_grad(signals.image_rows(image_ids_local), tag="signals.rows")
    caption_rows = comm.all_gather_no_grad(caption_rows_local, tag="signals.rows")
    if embedded is not None:
        pool = _with_embedded_keys(pool, image_emb_local, text_emb_local, logit_scale, embedded)
    proposals, scored, teacher = stored_candidates_in_pool(image_rows, caption_rows, queries.own, signals, cfg,
                                                           embedded)
    loss, logs = distill_from_scores(pool, queries, proposals, scored, teacher, comm, cfg, distill_weight, before)
    present = [torch.isfinite(teacher.pair_logits[s:s + queries.n * m]).float().mean()
               for s, m in teacher.spans.values()]
    logs["stored_candidates_in_pool"] = torch.stack(present).mean()
    return loss, logs


def _with_embedded_keys(pool, image_emb_local, text_emb_local, logit_scale, embedded: EmbeddedCandidates):
    """The pool's local logits with the embedded candidates as extra key columns (positions G...):
    captions after the caption pool for i2t, images after the image pool for t2i."""
    logits = dict(pool.logits)
    if embedded.caption_rows.numel():
        logits["i2t"] = torch.cat([logits["i2t"], local_logits(image_emb_local, embedded.text_emb, logit_scale)], 1)
    if embedded.image_rows.numel():
        logits["t2i"] = torch.cat([logits["t2i"], local_logits(text_emb_local, embedded.image_emb, logit_scale)], 1)
    return pool._replace(logits=logits)


def stored_candidates_in_pool(pool_image_rows: torch.Tensor, pool_caption_rows: torch.Tensor,
                              own: torch.Tensor, signals: StoredSignals, cfg: DCDConfig,
                              embedded: EmbeddedCandidates | None = None):
    """The distilled queries' stored candidates as pool positions, and their stored scores.

    Args:
        pool_image_rows, pool_caption_rows: [G] the table rows of the pool's images and captions.
        own: [n] pool positions of the distilled queries.
        embedded: candidates embedded beside the batch, at positions G, G + 1, ... of their
            direction's keys (a candidate that is also in the pool is taken from the pool).
    Returns:
        (proposals {dir: [n, M] pool positions in the proposer's order, -1 where absent},
        scored: the same with 0 where absent (a column the masked rows may gather), _TeacherScores whose pair logits are
        the positives' scores, then each direction's [n * M] scores, -inf where absent).
    """
    G = pool_image_rows.shape[0]
    positions = torch.arange(G, device=pool_image_rows.device)
    image_at = torch.full((signals.image_ids.shape[0],), -1, dtype=torch.long, device=positions.device)
    caption_at = torch.full((signals.caption_image.shape[0],), -1, dtype=torch.long, device=positions.device)
    if embedded is not None:
        image_at[embedded.image_rows] = G + torch.arange(embedded.image_rows.numel(), device=positions.device)
        caption_at[embedded.caption_rows] = G + torch.arange(embedded.caption_rows.numel(), device=positions.device)
    image_at[pool_image_rows] = positions
    caption_at[pool_caption_rows] = positions
    query_images, query_captions = pool_image_rows[own], pool_caption_rows[own]
    pieces = [signals.positive_score[query_captions]]
    proposals, scored, spans, start = {}, {}, {}, own.shape[0]
    for d in cfg.directions:
        M = min(cfg.candidates, signals.candidates(d))
        if d == "i2t":
            rows, scores, at = signals.i2t_index[query_images, :M], signals.i2t_score[query_images, :M], caption_at
        else:
            rows, scores, at = signals.t2i_index[query_captions, :M], signals.t2i_score[query_captions, :M], image_at
        position = at[rows]
        present = position >= 0
        proposals[d], scored[d] = position, position.clamp(min=0)
        pieces.append(scores.masked_fill(~present, float("-inf")).flatten())
        spans[d] = (start, M)
        start += own.shape[0] * M
    pair_logits = torch.cat(pieces)
    if pair_logits.dtype not in (torch.float32, torch.float64):
        pair_logits = pair_logits.float()
    return proposals, scored, _TeacherScores(pair_logits, spans, 0)


def embedded_candidate_rows(signals: StoredSignals, query_image_rows: torch.Tensor, query_caption_rows: torch.Tensor,
                            directions, M: int, K: int) -> Dict[str, torch.Tensor]:
    """What the student embeds beside a batch so that every candidate its loss keeps is found: the
    teacher's top K of each distilled query's first M stored candidates (the set
    ``teacher_ranked_negatives`` picks when all are present), unique table rows per direction:
    {"i2t": caption rows, "t2i": image rows} (empty for a direction not distilled)."""
    rows = {"i2t": query_image_rows.new_empty(0), "t2i": query_image_rows.new_empty(0)}
    for d in directions:
        index, score, queries = ((signals.i2t_index, signals.i2t_score, query_image_rows) if d == "i2t"
                                 else (signals.t2i_index, signals.t2i_score, query_caption_rows))
        m = min(M, index.shape[1])
        top = score[queries, :m].topk(min(K, m), dim=1).indices
        rows[d] = torch.unique(index[queries, :m].gather(1, top))
    return rows


def signal_pairs(i2t_index: torch.Tensor, t2i_index: torch.Tensor,
                 caption_image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every (image row, caption row) pair a table scores, in its fixed order: the i2t candidates
    (image-major), the t2i candidates (caption-major), then each caption's positive."""
    N, M = i2t_index.shape
    C = caption_image.shape[0]
    images = torch.cat([torch.arange(N).repeat_interleave(M), t2i_index.flatten(), caption_image])
    captions = torch.cat([i2t_index.flatten(), torch.arange(C).repeat_interleave(t2i_index.shape[1]),
                          torch.arange(C)])
    return images, captions


def table_from_scores(image_ids: torch.Tensor, caption_image: torch.Tensor, i2t_index: torch.Tensor,
                      t2i_index: torch.Tensor, pair_scores: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> StoredSignals:
    """The table, from the scores of ``signal_pairs`` in that order."""
    n_i2t, n_t2i = i2t_index.numel(), t2i_index.numel()
    scores = pair_scores.to(dtype)
    return StoredSignals(image_ids=image_ids.long(), caption_image=caption_image.long(),
                         i2t_index=i2t_index.long(), i2t_score=scores[:n_i2t].view(i2t_index.shape),
                         t2i_index=t2i_index.long(), t2i_score=scores[n_i2t:n_i2t + n_t2i].view(t2i_index.shape),
                         positive_score=scores[n_i2t + n_t2i:])
