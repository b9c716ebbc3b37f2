"""The DCD objective for one step on one rank, as pure functions of tensors, a teacher callable and
a :class:`~train.distill.gather.Collectives`.

    L = lambda_itc * L_itc + alpha * mean_i(w_i L_kd,i) + (1 - alpha) * mean_i(w_i L_hard,i)

each distillation term averaged over the directions (i2t, t2i). See docs/ARCHITECTURE.md and
docs/method.md, steps 2-6.

Loss scale across ranks (why no term is multiplied by the world size W)
-------------------------------------------------------------------------
Let ell_i be the loss of query i of the global batch (G = W * B queries per direction) and L_r the
loss this function returns on rank r: a LOCAL mean, (1/B) sum_{i on r} ell_i, so that
(1/W) sum_r L_r = (1/G) sum_i ell_i = L_global, the 1-rank loss on the global batch.
Each ell_i depends on the parameters theta through the embeddings of every rank q (the pool).
The autograd all-gather's backward gives rank q's embeddings the SUM over ranks r of dL_r/d(emb_q),
so the backward on rank q yields g_q = sum_r dL_r/dtheta|through emb_q. The trainer (DeepSpeed)
AVERAGES gradients over ranks: (1/W) sum_q g_q = (1/W) sum_r sum_q dL_r/dtheta|through emb_q
= (1/W) sum_r dL_r/dtheta = dL_global/dtheta. So local means + autograd gather + gradient averaging
reproduce the 1-rank gradient exactly (tests/test_dcd_distributed.py checks it on 2 gloo ranks).
The weighted distillation terms use sum_{i on r} w_i ell_i * W / N_global (N_global = number of
distilled queries over all ranks, all-reduced with the weights): the local mean when every rank
distils the same number of queries, and still exactly the global mean after averaging if not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import torch

from .gather import (Collectives, fetch_pool_rows, gathered_offset, local_logits,
                     pad_to_common_length)
from .losses import (KD_KINDS, OBJECTIVES, WEIGHTING_SCHEMES, denoised_ce_per_sample, dynamic_weights,
                     hard_negative_ce_per_sample, info_nce, kd_loss_per_sample, margin_floor_per_sample,
                     margin_mse_per_sample, normalize_weights, standardized_rows)
from .negatives import (MASKED_LOGIT, candidate_set_logits, likely_false_negatives, random_candidates,
                        random_pool_candidates, student_proposals, teacher_ranked_negatives)

DIRECTIONS = ("i2t", "t2i")
NEGATIVE_SOURCES = ("teacher", "random", "random_pool")
TRANSPORTS = ("all_to_all", "all_gather")

# teacher_score(raw_images [I,...] uint8, raw_texts {name: [T,...]}, image_index [N], text_index [N])
#   -> logits [N] of the pairs (raw_images[image_index[n]], caption text_index[n]); called under no_grad.
TeacherScore = Callable[[torch.Tensor, Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DCDConfig:
    """Hyper-parameters of the DCD objective.

    candidates: M, the student's top-M proposals per query (positives excluded).
    hard_negatives: K, the teacher's top-K of the M kept as hard negatives (candidate set 1 + K).
    alpha: share of KD in the distillation terms; (1 - alpha) goes to the hard-negative CE.
    kd_temperature: T of the KL. Default 1.0: the student's logits already carry a learned
        temperature (logit_scale) that adapts its sharpness to the teacher's, and the candidate set
        is small (1 + K = 8), so the teacher's full distribution over it is the target; a T > 1
        mostly flattens an already informative 8-way distribution. (T^2 keeps the gradient scale.)
    kd_loss: "kl" | "mse" (logit MSE, the published code).
    lambda_itc: weight of the contrastive loss.
    weighting: "entropy" (published code) | "wsl" (the paper) | "none".
    directions: subset of ("i2t", "t2i") that are distilled (InfoNCE is always symmetric).
    distill_queries: None = every local query; N = the FIRST N local queries of each direction.
        First rather than random N: the loader already shuffles, so the first N are a random subset,
        and it needs no generator state (reproducible, nothing to checkpoint). It bounds the
        teacher's cost, which docs/platform_notes.md records as the step's dominant share.
    negatives_from: "teacher" (DCD) | "random" (ablation: K random of the student's M proposals,
        no teacher ranking) | "random_pool" (K random non-positives from the whole pool).
    false_negative_margin: None = the method as published; X = proposals the teacher scores at
        least (positive - X) are left out before the top K are taken (``likely_false_negatives``):
        rows with fewer than K left keep only those. Teacher ranking only.
    candidate_transport: "all_to_all" (only the selected candidates' raw inputs move) |
        "all_gather" (every rank's raw inputs move; simpler).
    objective: what the KD and hard terms are (``losses.OBJECTIVES``): "published" (the reference),
        "listwise" (KD to the row-standardised teacher), "denoised" (candidates the teacher scores
        near the positive are extra positives of the hard CE), "margin" (KD = Margin-MSE),
        "margin_floor" (KD = one-sided Margin-MSE: the teacher's margins as a floor).
    positive_margin: the "denoised" objective's margin, in teacher logits.
    """

    candidates: int = 16
    hard_negatives: int = 7
    alpha: float = 0.2
    kd_temperature: float = 1.0
    kd_loss: str = "kl"
    lambda_itc: float = 1.0
    weighting: str = "entropy"
    directions: Tuple[str, ...] = DIRECTIONS
    distill_queries: Optional[int] = None
    negatives_from: str = "teacher"
    false_negative_margin: Optional[float] = None
    candidate_transport: str = "all_to_all"
    objective: str = "published"
    positive_margin: float = 0.0

    def __post_init__(self):
        self.directions = tuple(self.directions)
        checks = [
            (self.kd_loss in KD_KINDS, f"kd_loss {self.kd_loss!r} not in {KD_KINDS}"),
            (self.objective in OBJECTIVES, f"objective {self.objective!r} not in {OBJECTIVES}"),
            (self.weighting in WEIGHTING_SCHEMES, f"weighting {self.weighting!r} not in {WEIGHTING_SCHEMES}"),
            (all(d in DIRECTIONS for d in self.directions), f"directions {self.directions} not in {DIRECTIONS}"),
            (len(set(self.directions)) == len(self.directions), "directions repeated"),
            (self.negatives_from in NEGATIVE_SOURCES,
             f"negatives_from {self.negatives_from!r} not in {NEGATIVE_SOURCES}"),
            (self.false_negative_margin is None or self.negatives_from == "teacher",
             "false_negative_margin needs negatives_from 'teacher'"),
            (self.candidate_transport in TRANSPORTS,
             f"candidate_transport {self.candidate_transport!r} not in {TRANSPORTS}"),
            (self.candidates >= 1 and self.hard_negatives >= 1, "candidates and hard_negatives must be >= 1"),
            (self.distill_queries is None or self.distill_queries >= 1, "distill_queries must be None or >= 1"),
            (0.0 <= self.alpha <= 1.0, "alpha must be in [0, 1]"),
            (self.kd_temperature > 0, "kd_temperature must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class _Pool(NamedTuple):
    logits: Dict[str, torch.Tensor]      # "i2t": [B, G] local images x caption pool; "t2i": [B, G]
    positive_mask: torch.Tensor          # [B, G] bool: same image id (for both directions)
    offset: int                          # pool position of this rank's first row
    loss_itc: torch.Tensor


def _contrastive_pool(image_emb_local, text_emb_local, logit_scale, image_ids_local, comm) -> _Pool:
    """Steps 2-3: gather with gradient, B x G local logits, InfoNCE masked by image id."""
    image_pool = comm.all_gather_with_grad(image_emb_local, tag="embeddings")
    text_pool = comm.all_gather_with_grad(text_emb_local, tag="embeddings")
    image_ids_pool = comm.all_gather_no_grad(image_ids_local, tag="image_ids")
    # Queries use the LOCAL embeddings (their own autograd path); keys come from the pool.
    logits_i2t = local_logits(image_emb_local, text_pool, logit_scale)
    logits_t2i = local_logits(text_emb_local, image_pool, logit_scale)
    # A caption is paired with an image id, so image i's positives in the caption pool and caption
    # i's positives in the image pool are the same mask: every entry of the same image id.
    positive_mask = image_ids_local.view(-1, 1) == image_ids_pool.view(1, -1)
    loss_itc = info_nce(logits_i2t, logits_t2i, positive_mask, positive_mask)
    offset = gathered_offset(comm.rank, image_emb_local.shape[0])
    return _Pool({"i2t": logits_i2t, "t2i": logits_t2i}, positive_mask, offset, loss_itc)


def distillation_terms(student_set: torch.Tensor, teacher_set: torch.Tensor,
                       cfg: DCDConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-query (KD, HARD) losses [Q] over candidate sets [Q, C] (positive at column 0) for the
    configured objective; see ``losses.OBJECTIVES`` for what each variant changes."""
    if cfg.objective == "listwise":
        kd = kd_loss_per_sample(student_set, standardized_rows(teacher_set), cfg.kd_temperature, "kl")
    elif cfg.objective == "margin":
        kd = margin_mse_per_sample(student_set, teacher_set)
    elif cfg.objective == "margin_floor":
        kd = margin_floor_per_sample(student_set, teacher_set)
    else:
        kd = kd_loss_per_sample(student_set, teacher_set, cfg.kd_temperature, cfg.kd_loss)
    if cfg.objective == "denoised":
        hard = denoised_ce_per_sample(student_set, teacher_set, cfg.positive_margin)
    else:
        hard = hard_negative_ce_per_sample(student_set)
    return kd, hard


def _bytes_since(comm: Collectives, before: Mapping[str, int]) -> Dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in comm.bytes_moved.items() if v - before.get(k, 0)}


def contrastive_loss(image_emb_local: torch.Tensor, text_emb_local: torch.Tensor, logit_scale: torch.Tensor,
                     image_ids_local: torch.Tensor, comm: Collectives) -> Tuple[torch.Tensor, Dict]:
    """The baseline (``--stage student``): symmetric InfoNCE over the gathered pool.

    Args:
        image_emb_local, text_emb_local: [B, D] L2-normalised, B equal on every rank.
        logit_scale: scalar tensor, the already clamped exp(logit_scale).
        image_ids_local: [B] long.
        comm: the ranks' collectives.
    Returns:
        (loss, logs) with logs = {loss, loss_itc (0-dim detached tensors), pool_size, bytes_moved (ints)}.
    """
    before = dict(comm.bytes_moved)
    pool = _contrastive_pool(image_emb_local, text_emb_local, logit_scale, image_ids_local, comm)
    loss = pool.loss_itc
    logs = {"loss": loss.detach(), "loss_itc": loss.detach(), "pool_size": pool.positive_mask.shape[1],
            "bytes_moved": sum(_bytes_since(comm, before).values())}
    return loss, logs


def dcd_loss(image_emb_local: torch.Tensor, text_emb_local: torch.Tensor, logit_scale: torch.Tensor,
             image_ids_local: torch.Tensor, raw_images_local: torch.Tensor,
             raw_texts_local: Mapping[str, torch.Tensor], teacher_score: TeacherScore,
             comm: Collectives, cfg: DCDConfig,
             generator: Optional[torch.Generator] = None,
             distill_weight: float = 1.0) -> Tuple[torch.Tensor, Dict]:
    """The whole DCD objective for one step on this rank.

    Args:
        image_emb_local, text_emb_local: [B, D] student embeddings (L2-normalised, with gradient);
            row i of both is pair i; B equal on every rank.
        logit_scale: scalar tensor, the already clamped exp(logit_scale) (gets a gradient).
        image_ids_local: [B] long image ids (equal ids = the same image: positives of each other).
        raw_images_local: [B, 3, S, S] uint8 pixels for the teacher.
        raw_texts_local: the teacher's token tensors of the B captions, e.g. input_ids and
            attention_mask [B, L]; L may differ between ranks (padded here with 0 to the longest).
        teacher_score: frozen teacher, see ``TeacherScore``. Called exactly ONCE per call on every
            rank when a direction is distilled (a ZeRO-3 teacher gathers its parameters inside its
            forward, so every rank must call it equally often); the pairs are de-duplicated first.
        comm: the ranks' collectives.
        cfg: hyper-parameters.
        generator: seeds the draws of the random-negative ablations (None: global RNG).
        distill_weight: multiplies the two distillation terms (the trainer's ramp-in; InfoNCE keeps
            lambda_itc): L = lambda_itc * L_itc + distill_weight * (alpha * KD + (1 - alpha) * hard).
    Returns:
        (loss, logs). logs: loss, loss_itc, loss_kd, loss_hard (and loss_kd_<dir>, loss_hard_<dir>),
        weight_mean, weight_std, teacher_margin, teacher_accuracy, teacher_student_agreement
        (``negatives_from="teacher"`` only) as 0-dim detached tensors (no device sync here);
        weights: [n] detached normalised weights of this rank's distilled queries (for a histogram);
        pool_size, teacher_pairs, bytes_moved, bytes_moved_candidates: ints.
    """
    before = dict(comm.bytes_moved)
    pool = _contrastive_pool(image_emb_local, text_emb_local, logit_scale, image_ids_local, comm)
    queries = _distilled_queries(pool, cfg, image_emb_local.device)
    proposals, scored = _propose(pool, queries, cfg, generator)
    if not cfg.directions:
        loss = cfg.lambda_itc * pool.loss_itc
        return loss, dict(pool_size=pool.positive_mask.shape[1], loss=loss.detach(),
                          loss_itc=pool.loss_itc.detach(), **_traffic(comm, before))
    inputs = _fetch_teacher_inputs(scored, queries.own, pool.offset, raw_images_local, raw_texts_local,
                                   comm, cfg)
    teacher = _score_with_teacher(scored, queries, inputs, teacher_score, cfg.directions,
                                  image_emb_local.device)
    return distill_from_scores(pool, queries, proposals, scored, teacher, comm, cfg, distill_weight, before)


def distill_from_scores(pool: "_Pool", queries: "_Queries", proposals, scored, teacher: "_TeacherScores",
                        comm: Collectives, cfg: DCDConfig, distill_weight: float,
                        before: Mapping[str, int]) -> Tuple[torch.Tensor, Dict]:
    """Steps 5-7 from the teacher's scores of the scored candidates, wherever the scores came from:
    the teacher's forward (``dcd_loss``) or a stored table (``train/distill/stored.py``), so every
    objective variant, weighting and margin is the same code in both modes."""
    per_direction, false_negative_fraction = _candidate_sets(pool, queries, scored, teacher, cfg)
    loss_kd, loss_hard, weights = _weighted_terms(per_direction, queries.n, comm)
    mean_kd = torch.stack(list(loss_kd.values())).mean()
    mean_hard = torch.stack(list(loss_hard.values())).mean()
    loss = cfg.lambda_itc * pool.loss_itc + distill_weight * (cfg.alpha * mean_kd + (1.0 - cfg.alpha) * mean_hard)
    logs = _dcd_logs(per_direction, proposals, false_negative_fraction, cfg)
    logs.update(pool_size=pool.positive_mask.shape[1], loss=loss.detach(), loss_itc=pool.loss_itc.detach(),
                loss_kd=mean_kd.detach(), loss_hard=mean_hard.detach(), weight_mean=weights.mean(),
                weight_std=weights.std(unbiased=False), weights=weights, teacher_pairs=teacher.unique_pairs,
                **_traffic(comm, before))
    for d in cfg.directions:
        logs[f"loss_kd_{d}"], logs[f"loss_hard_{d}"] = loss_kd[d].detach(), loss_hard[d].detach()
    return loss, logs


def _traffic(comm: Collectives, before: Mapping[str, int]) -> Dict[str, int]:
    """Bytes this rank received during the step: all of them, and the candidates' raw inputs."""
    moved = _bytes_since(comm, before)
    return dict(bytes_moved=sum(moved.values()),
                bytes_moved_candidates=sum(v for k, v in moved.items() if k.startswith("candidates")))


# ----------------------------------------------------------------------------------------------
# dcd_loss's steps (the numbers of docs/method.md)

class _Queries(NamedTuple):
    n: int                        # distilled queries per direction on this rank (the first n)
    index: torch.Tensor           # [n] their local rows
    own: torch.Tensor             # [n] pool position of each query's own pair (its positive)
    positive_mask: torch.Tensor   # [n, G] bool


def _distilled_queries(pool: _Pool, cfg: DCDConfig, device) -> _Queries:
    B = pool.positive_mask.shape[0]
    n_queries = B if cfg.distill_queries is None else min(cfg.distill_queries, B)
    query = torch.arange(n_queries, device=device)
    return _Queries(n_queries, query, pool.offset + query, pool.positive_mask[:n_queries])


def _propose(pool: _Pool, queries: _Queries, cfg: DCDConfig, generator):
    """Step 4a: the student proposes (without gradient), or the ablations draw at random.
    Returns (proposals {dir: [n, M]} sorted by student similarity, scored {dir: [n, S]} pool indices
    the teacher scores per query)."""
    proposals: Dict[str, torch.Tensor] = {}
    scored: Dict[str, torch.Tensor] = {}
    for d in cfg.directions:
        if cfg.negatives_from == "random_pool":
            scored[d] = random_pool_candidates(queries.positive_mask, cfg.hard_negatives, generator)
            continue
        proposals[d] = student_proposals(pool.logits[d][:queries.n].detach(), queries.positive_mask,
                                         cfg.candidates)
        scored[d] = (proposals[d] if cfg.negatives_from == "teacher"
                     else random_candidates(proposals[d], cfg.hard_negatives, generator))
    return proposals, scored


class _TeacherInputs(NamedTuple):
    image_needed: torch.Tensor          # sorted unique pool positions of the images the teacher sees
    text_needed: torch.Tensor           # the same for captions
    images: torch.Tensor                # their raw pixels, in that order
    texts: Dict[str, torch.Tensor]      # their token tensors, in that order


def _fetch_teacher_inputs(scored, own, offset, raw_images_local, raw_texts_local, comm, cfg) -> _TeacherInputs:
    """Step 4b: the raw inputs the teacher needs, as sorted unique pool positions: the queries' own
    images and captions (query and positive), the i2t candidate captions, the t2i candidate images.
    Branches depend on cfg only, so every rank runs the same collectives."""
    image_needed = torch.unique(torch.cat([own] + ([scored["t2i"].flatten()] if "t2i" in scored else [])))
    text_needed = torch.unique(torch.cat([own] + ([scored["i2t"].flatten()] if "i2t" in scored else [])))
    if "t2i" in scored:
        images = fetch_pool_rows({"pixels": raw_images_local}, image_needed, comm,
                                 cfg.candidate_transport, tag="candidates.images")["pixels"]
    else:  # only this rank's own images are needed
        images = raw_images_local[(image_needed - offset).to(raw_images_local.device)]
    if "i2t" in scored:
        padded_texts = pad_to_common_length(raw_texts_local, comm, tag="candidates.text_lengths")
        texts = fetch_pool_rows(padded_texts, text_needed, comm, cfg.candidate_transport,
                                tag="candidates.texts")
    else:
        texts = {k: v[(text_needed - offset).to(v.device)] for k, v in raw_texts_local.items()}
    return _TeacherInputs(image_needed, text_needed, images, texts)


class _TeacherScores(NamedTuple):
    pair_logits: torch.Tensor     # [n + sum_d n * S_d]: the positives, then each direction's pairs
    spans: Dict[str, Tuple[int, int]]   # direction -> (first row in pair_logits, S_d)
    unique_pairs: int             # pairs the teacher actually scored


def _score_with_teacher(scored, queries: _Queries, inputs: _TeacherInputs, teacher_score,
                        directions, device) -> _TeacherScores:
    """Step 4c: one teacher call over unique (image, caption) pairs: the positives first (shared by
    both directions), then (query image, candidate caption) and (candidate image, query caption)."""
    own, n_queries = queries.own, queries.n
    pair_images, pair_texts, spans = [own], [own], {}
    start = n_queries
    for d in directions:
        n_scored = scored[d].shape[1]
        repeated_own = own.view(-1, 1).expand(-1, n_scored)
        images_d, texts_d = (repeated_own, scored[d]) if d == "i2t" else (scored[d], repeated_own)
        pair_images.append(images_d.flatten())
        pair_texts.append(texts_d.flatten())
        spans[d] = (start, n_scored)
        start += n_queries * n_scored
    n_texts = inputs.text_needed.shape[0]
    image_rows = torch.searchsorted(inputs.image_needed, torch.cat(pair_images))
    text_rows = torch.searchsorted(inputs.text_needed, torch.cat(pair_texts))
    unique_pairs, pair_of = torch.unique(image_rows * n_texts + text_rows, return_inverse=True)
    with torch.no_grad():
        unique_scores = teacher_score(inputs.images, inputs.texts, unique_pairs // n_texts,
                                      unique_pairs % n_texts)
    unique_scores = unique_scores.detach()
    if unique_scores.dtype != torch.float64:  # half-precision teachers: losses run in float32
        unique_scores = unique_scores.float()
    return _TeacherScores(unique_scores.to(device)[pair_of.to(device)], spans, int(unique_pairs.shape[0]))


def _candidate_sets(pool: _Pool, queries: _Queries, scored, teacher: _TeacherScores, cfg: DCDConfig):
    """Step 5: candidate sets, positive at column 0 for teacher and student alike, and their
    per-query terms. Returns ({dir: student_set, teacher_set, negative_index, raw_weights, kd, hard},
    [fraction of proposals dropped as likely false negatives, per direction])."""
    n_queries, own, K = queries.n, queries.own, cfg.hard_negatives
    teacher_positive = teacher.pair_logits[:n_queries]
    per_direction, false_negative_fraction = {}, []
    for d in cfg.directions:
        start, n_scored = teacher.spans[d]
        # -inf: a stored candidate absent from the pool; it ranks last and is masked like a dropped one
        teacher_scored = teacher.pair_logits[start:start + n_queries * n_scored].view(n_queries, n_scored)
        valid = None
        if cfg.negatives_from != "teacher":
            negative_index, teacher_negatives = scored[d], teacher_scored
        elif cfg.false_negative_margin is None:
            negative_index, teacher_negatives = teacher_ranked_negatives(teacher_scored, scored[d], K)
            if not bool(torch.isfinite(teacher_negatives).all()):  # stored candidates not in the pool
                valid = torch.isfinite(teacher_negatives)
        else:  # likely false negatives rank last (-inf) and are masked where they still fill a row
            dropped = likely_false_negatives(teacher_scored, teacher_positive, cfg.false_negative_margin)
            false_negative_fraction.append(dropped.float().mean())
            negative_index, teacher_negatives = teacher_ranked_negatives(
                teacher_scored.masked_fill(dropped, float("-inf")), scored[d], K)
            valid = torch.isfinite(teacher_negatives)
        student_rows = pool.logits[d][:n_queries]  # with gradient
        student_set = candidate_set_logits(student_rows[queries.index, own],
                                           student_rows.gather(1, negative_index), valid)
        teacher_set = candidate_set_logits(teacher_positive, teacher_negatives, valid)
        kd, hard = distillation_terms(student_set, teacher_set, cfg)
        per_direction[d] = dict(
            student_set=student_set, teacher_set=teacher_set, negative_index=negative_index,
            raw_weights=dynamic_weights(teacher_set, student_set, cfg.weighting), kd=kd, hard=hard)
    return per_direction, false_negative_fraction


def _weighted_terms(per_direction, n_queries: int, comm: Collectives):
    """Step 6: weights normalised to mean 1 per direction over the GLOBAL batch (one all-reduce of
    [sum_d, count_d] for every direction); returns ({dir: KD}, {dir: hard}, weights [n x dirs])."""
    local_stats = torch.stack([torch.stack([p["raw_weights"].sum(), p["raw_weights"].new_tensor(float(n_queries))])
                               for p in per_direction.values()])
    global_stats = comm.all_reduce_sum(local_stats, tag="weights")
    loss_kd, loss_hard, weights = {}, {}, []
    for (d, p), (global_sum, global_count) in zip(per_direction.items(), global_stats):
        w = normalize_weights(p["raw_weights"], global_sum, global_count)
        scale = comm.world_size / global_count  # see the module docstring: averaging over ranks
        loss_kd[d] = (w * p["kd"]).sum() * scale
        loss_hard[d] = (w * p["hard"]).sum() * scale
        weights.append(w)
    return loss_kd, loss_hard, torch.cat(weights)


def _dcd_logs(per_direction, proposals, false_negative_fraction, cfg: DCDConfig) -> Dict:
    """What the teacher's candidate sets say: its margin and accuracy, its agreement with the student."""
    logs: Dict = {}
    teacher_sets = torch.cat([p["teacher_set"] for p in per_direction.values()])
    if false_negative_fraction:
        logs["false_negatives_dropped"] = torch.stack(false_negative_fraction).mean()
    if teacher_sets.shape[1] > 1:
        best_negative = teacher_sets[:, 1:].max(dim=1).values
        has_negative = best_negative > MASKED_LOGIT / 2  # rows whose every negative was left out
        if bool(has_negative.any()):
            logs["teacher_margin"] = (teacher_sets[:, 0] - best_negative)[has_negative].mean()
            logs["teacher_accuracy"] = (teacher_sets[has_negative, 0] > best_negative[has_negative]).float().mean()
    if cfg.negatives_from == "teacher":
        # Fraction of the teacher's top-K that are also among the student's top-K of the M
        # proposals (the proposals are sorted by student similarity).
        agree = [(p["negative_index"].unsqueeze(2) == proposals[d][:, :p["negative_index"].shape[1]].unsqueeze(1))
                 .any(dim=2).float() for d, p in per_direction.items()]
        logs["teacher_student_agreement"] = torch.cat(agree).mean()
    return logs
