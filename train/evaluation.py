"""Evaluation at scale: embed a split with the student, teacher all-pairs, retrieve-then-rerank.

The split is held in memory as an `EvalSplit` (train/eval_split.py; uint8 pixels, flat caption
list): 1,000 images at 64 px are 12 MB, COCO 5K at 224 px ~750 MB. Every function here works on that
object, so the same code serves the CLI tools, the trainer's periodic evaluation and the tests (which
build splits from tensors).

Distributed teacher scoring: each rank scores a contiguous block of rows (images) or pairs, the blocks
are padded to equal length and exchanged with `all_gather`, so every rank ends with the full result,
identical to a 1-rank run. Models are called through `model(...)` (forward) so a DeepSpeed ZeRO-3
inference engine gathers its parameters through its hooks; `preprocess_images` and `tokenize` are
read from `model.module` when the model is wrapped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from train import comm
from train.comm import gather_blocks
from train.eval_split import EvalSplit
from train.metrics import RECALL_KS, retrieval_metrics_from_ranked

# ----------------------------------------------------------------------------------------------
# Fingerprint of a model (cache key; the split's is EvalSplit.fingerprint)


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of a model's configuration and every parameter and buffer (names, shapes, values)."""
    model = _unwrap(model)
    digest = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else getattr(config, "__dict__", config)
        digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    digest.update(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Model plumbing


def _unwrap(model):
    """The module that holds preprocess_images / tokenize (a DeepSpeed engine keeps it in .module)."""
    return getattr(model, "module", model)


def _device_of(model) -> torch.device:
    for parameter in _unwrap(model).parameters():
        return parameter.device
    return torch.device("cpu")


@contextlib.contextmanager
def _evaluating(model):
    """eval() and no autograd for the duration; the caller's train/eval flag is restored after."""
    module = _unwrap(model)
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        module.train(was_training)


def _tokens(model, captions: Sequence[str], device) -> Tuple[torch.Tensor, torch.Tensor]:
    encoded = _unwrap(model).tokenize(list(captions))
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def _pixels(model, pixels_uint8: torch.Tensor, device) -> torch.Tensor:
    return _unwrap(model).preprocess_images(pixels_uint8.to(device))


def _by_length(captions: Sequence[str]) -> List[int]:
    """Caption order by length: batches of similar lengths pad less (results are put back after)."""
    return sorted(range(len(captions)), key=lambda t: len(captions[t]))


def _in_listed_order(in_length_order: torch.Tensor, order: List[int]) -> torch.Tensor:
    """Rows computed in `order` (from _by_length) put back in the listed order."""
    listed = torch.empty_like(in_length_order)
    listed[torch.tensor(order, dtype=torch.long, device=in_length_order.device)] = in_length_order
    return listed


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="pair", unit_scale=True, disable=not enabled,
                dynamic_ncols=True, mininterval=1.0)


# ----------------------------------------------------------------------------------------------
# Student


@dataclass
class SplitEmbeddings:
    images: torch.Tensor  # float [I, D], L2-normalised, on CPU
    texts: torch.Tensor   # float [T, D]
    from_cache: bool = False


def embedding_cache_path(cache_dir, split: EvalSplit, student) -> Path:
    """Cache file keyed by split name, data fingerprint and model fingerprint: a change to either
    gives a new key, so a stale file is simply never read again."""
    safe_name = "".join(c if c.isalnum() or c in "-_" else "_" for c in split.name)
    return Path(cache_dir) / f"{safe_name}-{split.fingerprint[:16]}-{model_fingerprint(student)[:16]}.pt"


def embed_images(student, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings [N, D] on CPU from uint8 pixels, in batches."""
    device = _device_of(student)
    with _evaluating(student):
        return torch.cat([_unwrap(student).encode_image(
            _pixels(student, pixels[start:start + batch_size], device)).float().cpu()
            for start in range(0, pixels.shape[0], batch_size)])


def embed_texts(student, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised caption embeddings [N, D] on CPU, in batches of similar length, input order."""
    device = _device_of(student)
    order = _by_length(captions)
    pieces = []
    with _evaluating(student):
        for start in range(0, len(order), batch_size):
            batch = [captions[t] for t in order[start:start + batch_size]]
            pieces.append(_unwrap(student).encode_text(*_tokens(student, batch, device)).float().cpu())
    return _in_listed_order(torch.cat(pieces), order)


def embed_split(student, split: EvalSplit, batch_size: int = 256, cache_dir=None) -> SplitEmbeddings:
    """Embed every image and caption once (batched), reading/writing a disk cache when given."""
    cache_path = embedding_cache_path(cache_dir, split, student) if cache_dir else None
    if cache_path is not None and cache_path.is_file():
        cached = torch.load(cache_path, map_location="cpu", weights_only=True)
        return SplitEmbeddings(cached["images"], cached["texts"], from_cache=True)
    images = embed_images(student, split.pixels, batch_size)
    texts = embed_texts(student, split.captions, batch_size)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"images": images, "texts": texts, "split": split.name}, partial)
        partial.replace(cache_path)  # atomic: concurrent ranks never read half a file
    return SplitEmbeddings(images, texts)


def student_scores(embeddings: SplitEmbeddings) -> torch.Tensor:
    """Cosine similarities [I, T] (embeddings are L2-normalised; the temperature does not change ranks)."""
    return embeddings.images @ embeddings.texts.t()


# ----------------------------------------------------------------------------------------------
# Distribution helpers


def block_of_rank(count: int, rank: int, world_size: int) -> Tuple[int, int]:
    """[start, end) of this rank's contiguous block; every block but the last has ceil(count/world)."""
    per_rank = -(-count // world_size)
    start = min(rank * per_rank, count)
    return start, min(start + per_rank, count)


# ----------------------------------------------------------------------------------------------
# Teacher


def _side_scorer(teacher):
    """The unwrapped teacher when it scores pairs from cached unimodal sides (``splits_unimodal``)
    and holds its whole parameters on this rank; None otherwise (a ZeRO-3-partitioned module must
    run through its engine's forward, which gathers the parameters)."""
    module = _unwrap(teacher)
    if not getattr(module, "splits_unimodal", False):
        return None
    partitioned = getattr(module, "zero3_partitioned", None)
    return None if partitioned is not None and partitioned() else module


def _concat_sides(parts: List[tuple]) -> tuple:
    """Batches of encoded sides joined row-wise; no batches (nothing to encode) give ()."""
    return tuple(torch.cat(rows) for rows in zip(*parts))


def encode_teacher_sides(module, split: EvalSplit, images: torch.Tensor, captions: torch.Tensor,
                         batch_size: int = 256) -> Tuple[tuple, tuple]:
    """The teacher's image side of `images` and text side of `captions` (split indices), row n of
    each side = n-th listed index. Captions are encoded in length-sorted batches (less padding)
    and put back in the listed order. Call inside ``_evaluating``."""
    device = _device_of(module)
    images, captions = images.tolist(), captions.tolist()
    image_side = _concat_sides([
        module.encode_image_side(_pixels(module, split.pixels[images[s:s + batch_size]], device))
        for s in range(0, len(images), batch_size)])
    texts = [split.captions[t] for t in captions]
    order = _by_length(texts)
    text_side = _concat_sides([
        module.encode_text_side(*_tokens(module, [texts[i] for i in order[s:s + batch_size]], device))
        for s in range(0, len(order), batch_size)])
    return image_side, tuple(_in_listed_order(part, order) for part in text_side)


def teacher_all_pairs(teacher, split: EvalSplit, images_per_chunk: int = 4,
                      captions_per_chunk: int = 64, rank: Optional[int] = None,
                      world_size: Optional[int] = None, progress: bool = True) -> torch.Tensor:
    """Score every (image, caption) pair: float [I, T] on CPU, the same on every rank.

    Each call scores a grid of `images_per_chunk` images x `captions_per_chunk` captions through the
    index form of forward, so the cross-encoder encodes each image and caption of the grid once.
    Small calls win on CPU: with the FiLM teacher on 1 thread, 256-pair grids (4 x 64) ran at
    ~4,300 pairs/s against ~2,800 for 1,024-pair grids (the per-pair activations stay in cache).
    Captions are tokenized once (sorted by length to pad less); images are split across ranks.
    A teacher that splits off its unimodal parts (``splits_unimodal``: FiLM) encodes each image of
    the rank's block and each caption once for the whole gallery, and only the per-pair part runs
    per grid.
    """
    rank, world_size = comm.context(rank, world_size)
    device = _device_of(teacher)
    start, end = block_of_rank(split.num_images, rank, world_size)
    order = _by_length(split.captions)
    caption_chunks = [order[i:i + captions_per_chunk] for i in range(0, len(order), captions_per_chunk)]
    local = torch.empty(end - start, split.num_captions)
    bar = _progress((end - start) * split.num_captions, f"teacher all pairs (rank {rank})",
                    progress and rank == 0)
    columns = [torch.tensor(chunk, dtype=torch.long) for chunk in caption_chunks]
    scorer = _side_scorer(teacher)
    with _evaluating(teacher):
        if scorer is not None:
            image_side, text_side = encode_teacher_sides(scorer, split, torch.arange(start, end),
                                                         torch.arange(split.num_captions))

            def grid_logits(image_start, image_end, c):
                image_index, text_index = _grid(image_end - image_start, len(columns[c]), device)
                return scorer.score_encoded(image_side, text_side, image_index + (image_start - start),
                                            columns[c].to(device)[text_index])
        else:
            tokens = [_tokens(teacher, [split.captions[t] for t in chunk], device) for chunk in caption_chunks]

            def grid_logits(image_start, image_end, c):
                pixel_values = _pixels(teacher, split.pixels[image_start:image_end], device)
                image_index, text_index = _grid(image_end - image_start, len(columns[c]), device)
                return teacher(pixel_values, *tokens[c], image_index=image_index, text_index=text_index)

        for image_start in range(start, end, images_per_chunk):
            image_end = min(image_start + images_per_chunk, end)
            num_images = image_end - image_start
            for c, column in enumerate(columns):
                logits = grid_logits(image_start, image_end, c)
                local[image_start - start:image_end - start, column] = \
                    logits.float().reshape(num_images, len(column)).cpu()
                bar.update(num_images * len(column))
    bar.close()
    return gather_blocks(local.to(device), split.num_images, world_size).cpu()


def _grid(num_images: int, num_texts: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Index pairs of every image with every text, image-major (row n = image n // T, text n % T)."""
    image_index = torch.arange(num_images, device=device).repeat_interleave(num_texts)
    text_index = torch.arange(num_texts, device=device).repeat(num_images)
    return image_index, text_index


def teacher_pair_scores(teacher, split: EvalSplit, image_index: torch.Tensor,
                        caption_index: torch.Tensor, pairs_per_call: int = 256,
                        rank: Optional[int] = None, world_size: Optional[int] = None,
                        progress: bool = False) -> torch.Tensor:
    """Teacher scores of the listed (image, caption) pairs: float [P], the same on every rank.

    Pairs are sorted image-major and ranks take contiguous blocks of them. A teacher that splits
    off its unimodal parts (FiLM) encodes every distinct image and caption of the block once, then
    scores `pairs_per_call` pairs a call from those; any other teacher encodes a call's distinct
    images and captions per call (256 pairs per call ran ~30% faster than 1,024 and twice as fast
    as 4,096 on CPU for the FiLM teacher before it had the cached path).
    """
    rank, world_size = comm.context(rank, world_size)
    device = _device_of(teacher)
    image_index = torch.as_tensor(image_index, dtype=torch.long).flatten()
    caption_index = torch.as_tensor(caption_index, dtype=torch.long).flatten()
    total = image_index.numel()
    order = torch.argsort(image_index * max(split.num_captions, 1) + caption_index, stable=True)
    start, end = block_of_rank(total, rank, world_size)
    local = torch.empty(end - start)
    bar = _progress(end - start, f"teacher pairs (rank {rank})", progress and rank == 0)
    local_order = order[start:end]
    scorer = _side_scorer(teacher)
    with _evaluating(teacher):
        if scorer is not None:
            # Each distinct image and caption of this rank's pairs is encoded once: a rerank's
            # caption appears in ~k pairs spread over many images, so per-call encoding re-encoded
            # it in almost every call (rerank of 1,000 x 5,000 ran at ~3,600 pairs/s that way).
            images, image_pos = torch.unique(image_index[local_order], return_inverse=True)
            captions, caption_pos = torch.unique(caption_index[local_order], return_inverse=True)
            image_side, text_side = encode_teacher_sides(scorer, split, images, captions)
            image_pos, caption_pos = image_pos.to(device), caption_pos.to(device)
            for chunk_start in range(0, end - start, pairs_per_call):
                chunk = slice(chunk_start, min(chunk_start + pairs_per_call, end - start))
                local[chunk] = scorer.score_encoded(image_side, text_side, image_pos[chunk],
                                                    caption_pos[chunk]).float().cpu()
                bar.update(chunk.stop - chunk.start)
        else:
            for chunk_start in range(0, end - start, pairs_per_call):
                chunk = local_order[chunk_start:chunk_start + pairs_per_call]
                images, image_pos = torch.unique(image_index[chunk], return_inverse=True)
                captions, caption_pos = torch.unique(caption_index[chunk], return_inverse=True)
                pixel_values = _pixels(teacher, split.pixels[images], device)
                input_ids, attention_mask = _tokens(
                    teacher, [split.captions[t] for t in captions.tolist()], device)
                logits = teacher(pixel_values, input_ids, attention_mask,
                                 image_index=image_pos.to(device), text_index=caption_pos.to(device))
                local[chunk_start:chunk_start + len(chunk)] = logits.float().cpu()
                bar.update(len(chunk))
    bar.close()
    scores_sorted = gather_blocks(local.to(device), total, world_size).cpu()
    scores = torch.empty(total)
    scores[order] = scores_sorted
    return scores


def teacher_binding_scores(teacher, split: EvalSplit, **pair_options) -> Tuple[torch.Tensor, torch.Tensor]:
    """(own image score, twin image score) per caption whose image has a twin in the gallery:
    2 teacher pairs per caption, cheap enough to report even when all pairs are skipped."""
    from train.metrics import twin_pairs
    captions, own, twin = twin_pairs(split.caption_image_index, split.twin_index)
    scores = teacher_pair_scores(teacher, split, torch.cat([own, twin]), torch.cat([captions, captions]),
                                 **pair_options)
    return scores[:len(captions)], scores[len(captions):]


# ----------------------------------------------------------------------------------------------
# Retrieve, then rerank


def ranked_top(scores: torch.Tensor, depth: int) -> torch.Tensor:
    """Indices of each row's `depth` best columns, best first; ties keep the lower index first
    (what a stable sort of the whole row gives, so the order is deterministic).

    topk, then a stable order inside the top: a full sort of 1,000 x 5,000 both ways took 0.84 s
    of a 16 s rerank, topk 0.06 s. Rows where a score outside the top ties the depth-th one (topk
    may pick either) fall back to the full stable sort, so the result is exact."""
    depth = min(depth, scores.shape[1])
    top = torch.topk(scores, depth, dim=1, sorted=False)
    by_index = torch.argsort(top.indices, dim=1)                  # lower index first ...
    indices, values = top.indices.gather(1, by_index), top.values.gather(1, by_index)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices  # ... within equal scores
    indices = indices.gather(1, order)
    boundary_tie = (scores >= values.amin(dim=1, keepdim=True)).sum(dim=1) > depth
    if boundary_tie.any():
        indices[boundary_tie] = torch.sort(scores[boundary_tie], dim=1, descending=True,
                                           stable=True).indices[:, :depth]
    return indices


def rerank_rows(candidates: torch.Tensor, teacher_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Reorder each row's first k candidates by teacher score (descending, ties keep the student's
    order); the candidates after k keep the student's order."""
    k = min(k, candidates.shape[1])
    reorder = torch.sort(teacher_scores, dim=1, descending=True, stable=True).indices
    return torch.cat([candidates[:, :k].gather(1, reorder), candidates[:, k:]], dim=1)


@dataclass
class RerankResult:
    metrics: Dict[str, float]
    ranked_captions_per_image: torch.Tensor  # long [I, n]: reranked top-k, then the student's order
    ranked_images_per_caption: torch.Tensor  # long [T, m]
    teacher_pairs: int                       # distinct pairs the teacher scored


def rerank(scores: torch.Tensor, teacher, split: EvalSplit, k: int = 16,
           pairs_per_call: int = 256, rank: Optional[int] = None, world_size: Optional[int] = None,
           progress: bool = False, ks: Sequence[int] = RECALL_KS) -> RerankResult:
    """Student top-k per query in both directions, reordered by the teacher.

    The ranked lists are max(k, max(ks)) deep (reranked top-k, then the student's next candidates), so
    Recall@K is exact against the full gallery. A pair proposed by both directions is scored once:
    at most (I + T) * k teacher pairs instead of I * T.
    """
    depth = max(k, max(ks))
    captions_per_image = ranked_top(scores, depth)        # [I, n]
    images_per_caption = ranked_top(scores.t(), depth)    # [T, m]
    k_text, k_image = min(k, captions_per_image.shape[1]), min(k, images_per_caption.shape[1])
    num_images, num_captions = scores.shape
    image_query_pairs = (torch.arange(num_images).repeat_interleave(k_text),
                         captions_per_image[:, :k_text].reshape(-1))
    caption_query_pairs = (images_per_caption[:, :k_image].reshape(-1),
                           torch.arange(num_captions).repeat_interleave(k_image))
    linear = torch.cat([image_query_pairs[0] * num_captions + image_query_pairs[1],
                        caption_query_pairs[0] * num_captions + caption_query_pairs[1]])
    distinct, position = torch.unique(linear, return_inverse=True)
    distinct_scores = teacher_pair_scores(teacher, split, distinct // num_captions, distinct % num_captions,
                                          pairs_per_call=pairs_per_call, rank=rank,
                                          world_size=world_size, progress=progress)
    pair_scores = distinct_scores[position]
    text_scores = pair_scores[:num_images * k_text].reshape(num_images, k_text)
    image_scores = pair_scores[num_images * k_text:].reshape(num_captions, k_image)
    by_image = rerank_rows(captions_per_image, text_scores, k_text)
    by_caption = rerank_rows(images_per_caption, image_scores, k_image)
    metrics = retrieval_metrics_from_ranked(by_image, by_caption, split.caption_image_index, ks)
    return RerankResult(metrics, by_image, by_caption, teacher_pairs=int(distinct.numel()))
