"""Clustered training batches for distillation from stored teacher signals.

The stored candidates of a query come from the whole split (the proposer's top-M), so in a batch
drawn at random almost none of them is in the pool, and a candidate absent from the pool cannot be
scored by the student. As TAS-Balanced composes batches from a query's neighbours, each global batch
here is composed from its distilled queries (the first `queries` rows of every rank, the rows
dcd_loss distils) and their stored candidates (the first M the objective reads, of the directions it
distils), the teacher's highest first, taken in turns over the queries and directions until the
W x B rows are full (an image enters once; an i2t candidate brings its image with that caption).
The InfoNCE term sees the same batch, harder than a random one.

Every rank composes the same global batch from (seed, batch number) alone and keeps its own B rows:
no communication, and a resumed run at batch N gets exactly batch N again. The split is held in
memory (uint8 pixels: 20,000 images of 64 px are 245 MB per rank).
"""
from __future__ import annotations

import itertools
from typing import List, Tuple

import torch

from train.distill.stored import StoredSignals, embedded_candidate_rows
from train.eval_split import EvalSplit


def _caption_of(signals: StoredSignals, image: int, g: torch.Generator, starts, counts) -> int:
    return int(starts[image]) + int(torch.randint(int(counts[image]), (1,), generator=g))


def _teacher_ordered(index: torch.Tensor, score: torch.Tensor, rows: List[int], M: int) -> List[List[int]]:
    """The first M stored candidates of each of `rows`, highest teacher score first."""
    index, score = index[rows, :M], score[rows, :M]
    return index.gather(1, score.argsort(dim=1, descending=True)).tolist()


def compose_global_batch(signals: StoredSignals, seeds: List[int], world: int, batch_size: int,
                         queries: int, g: torch.Generator, directions: Tuple[str, ...] = ("i2t", "t2i"),
                         candidates: int | None = None) -> List[Tuple[int, int]]:
    """(image row, caption row) of every row of the global batch, rank-major: rank r's rows are
    r * B ... r * B + B - 1, its first `queries` the seed queries `seeds[r * queries:...]`. Fill rows
    come from the first `candidates` (default: all) stored candidates of `directions` only: a
    candidate the objective never reads would take a row from one it does."""
    counts = torch.bincount(signals.caption_image, minlength=signals.image_ids.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    chosen = {image: _caption_of(signals, image, g, starts, counts) for image in seeds}
    fill_rows = world * (batch_size - queries)
    fills: List[Tuple[int, int]] = []
    # each query's candidates in decreasing teacher score, the directions interleaved; as lists,
    # since the loop below runs in the training process between steps. An i2t candidate is
    # (its caption's image, that caption); a t2i candidate an image whose caption is drawn below.
    M = max(signals.candidates(d) for d in directions) if candidates is None else candidates
    per_query = [[] for _ in seeds]
    if "i2t" in directions:
        for q, captions in enumerate(_teacher_ordered(signals.i2t_index, signals.i2t_score, seeds, M)):
            per_query[q].append([(int(signals.caption_image[c]), c) for c in captions])
    if "t2i" in directions:
        seed_captions = [chosen[s] for s in seeds]
        for q, images in enumerate(_teacher_ordered(signals.t2i_index, signals.t2i_score, seed_captions, M)):
            per_query[q].append([(i, None) for i in images])
    for k in range(M):
        for lists in per_query:
            for candidate_image, candidate_caption in (c[k] for c in lists if k < len(c)):
                if len(fills) == fill_rows:
                    break
                if candidate_image in chosen:
                    continue
                if candidate_caption is None:
                    candidate_caption = _caption_of(signals, candidate_image, g, starts, counts)
                chosen[candidate_image] = candidate_caption
                fills.append((candidate_image, candidate_caption))
    missing = fill_rows - len(fills)  # a split too small for the candidates: random images
    free = [i for i in torch.randperm(counts.shape[0], generator=g).tolist() if i not in chosen] if missing else []
    for image in free[:missing]:
        chosen[image] = _caption_of(signals, image, g, starts, counts)
        fills.append((image, chosen[image]))
    per_rank = batch_size - queries
    rows = []
    for r in range(world):
        rows += [(s, chosen[s]) for s in seeds[r * queries:(r + 1) * queries]]
        rows += fills[r * per_rank:(r + 1) * per_rank]
    return rows


class ClusteredBatches:
    """Endless training batches (train/data.py's batch dict plus `caption_rows`) composed from the
    stored candidates; `skipped` is empty (the split was read whole before training)."""

    def __init__(self, split: EvalSplit, signals: StoredSignals, batch_size: int, queries: int, rank: int,
                 world: int, seed: int, start_batch: int, tokenizer, max_length: int,
                 directions: Tuple[str, ...] = ("i2t", "t2i"), candidates: int | None = None):
        if split.num_images < world * batch_size:
            raise ValueError(f"split '{split.name}' has {split.num_images} images, fewer than a global "
                             f"batch ({world} x {batch_size})")
        self.split, self.signals, self.tokenizer, self.max_length = split, signals, tokenizer, max_length
        self.batch_size, self.queries, self.rank, self.world = batch_size, queries, rank, world
        self.seed, self.start_batch, self.skipped = seed, start_batch, {}
        self.directions, self.candidates = tuple(directions), candidates
        self.seeds_per_batch = world * queries
        self.batches_per_epoch = max(1, split.num_images // self.seeds_per_batch)
        # every caption tokenized once: tokenizing each batch in the training process cost more
        # than the stored loss itself
        self.tokens = tokenizer(split.captions, padding="max_length", truncation=True, max_length=max_length,
                                return_tensors="pt")
        self.twin_ids = torch.where(split.twin_index >= 0, split.image_ids[split.twin_index.clamp(min=0)],
                                    torch.full_like(split.image_ids, -1))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        for index in itertools.count(self.start_batch):
            yield self.batch(index)

    def global_rows(self, index: int) -> List[Tuple[int, int]]:
        epoch, position = divmod(index, self.batches_per_epoch)
        order = torch.randperm(self.split.num_images, generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + epoch)).tolist()
        seeds = order[position * self.seeds_per_batch:(position + 1) * self.seeds_per_batch]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * index + 1)
        return compose_global_batch(self.signals, seeds, self.world, self.batch_size, self.queries, g,
                                    self.directions, self.candidates)

    def batch(self, index: int) -> dict:
        rows = self.global_rows(index)[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        images = torch.tensor([r[0] for r in rows], dtype=torch.long)
        caption_rows = torch.tensor([r[1] for r in rows], dtype=torch.long)
        return {"pixels": self.split.pixels[images], "captions": [self.split.captions[r[1]] for r in rows],
                "input_ids": self.tokens["input_ids"][caption_rows].long(),
                "attention_mask": self.tokens["attention_mask"][caption_rows].long(),
                "image_ids": self.split.image_ids[images], "twin_ids": self.twin_ids[images],
                "groups": torch.full((len(rows),), -1, dtype=torch.long), "caption_rows": caption_rows}


class EmbeddedCandidateBatches(ClusteredBatches):
    """Batches drawn as the contrastive loader draws them (random images, each with its twin scene
    when the split has one), plus the stored candidates the distilled queries keep, for the student
    to embed beside the batch (train/distill/stored.py ``EmbeddedCandidates``): the InfoNCE term
    sees what a contrastive run sees, and every candidate of the loss is found.

    Batch keys added: candidate_caption_rows, candidate_input_ids, candidate_attention_mask (i2t
    candidates) and candidate_image_rows, candidate_pixels (t2i candidates)."""

    def __init__(self, *args, hard_negatives: int = 7, **kwargs):
        super().__init__(*args, **kwargs)
        self.hard_negatives = hard_negatives
        self.seeds_per_batch = self.world * self.batch_size
        self.batches_per_epoch = max(1, self.split.num_images // self.seeds_per_batch)
        twin = self.split.twin_index
        image = torch.arange(twin.shape[0])
        self.unit_of = torch.where(twin >= 0, torch.minimum(image, twin), image)  # a scene and its twin: one unit

    def global_rows(self, index: int) -> List[Tuple[int, int]]:
        epoch, position = divmod(index, self.batches_per_epoch)
        units = torch.unique(self.unit_of)
        units = units[torch.randperm(units.numel(), generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + epoch))]
        # each unit's images together, in the units' random order (argsort of the unit's rank)
        rank_of_unit = torch.empty(int(self.unit_of.max()) + 1, dtype=torch.long)
        rank_of_unit[units] = torch.arange(units.numel())
        order = torch.argsort(rank_of_unit[self.unit_of] * 2 + (torch.arange(self.unit_of.numel()) != self.unit_of))
        images = order[position * self.seeds_per_batch:(position + 1) * self.seeds_per_batch].tolist()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * index + 1)
        counts = torch.bincount(self.signals.caption_image, minlength=self.signals.image_ids.shape[0])
        starts = torch.cumsum(counts, 0) - counts
        return [(image, _caption_of(self.signals, image, g, starts, counts)) for image in images]

    def batch(self, index: int) -> dict:
        batch = super().batch(index)
        queries = slice(0, self.queries)
        rows = embedded_candidate_rows(self.signals, self.signals.image_rows(batch["image_ids"][queries]),
                                       batch["caption_rows"][queries], self.directions,
                                       self.candidates or self.signals.i2t_index.shape[1], self.hard_negatives)
        batch.update(candidate_caption_rows=rows["i2t"], candidate_image_rows=rows["t2i"],
                     candidate_input_ids=self.tokens["input_ids"][rows["i2t"]].long(),
                     candidate_attention_mask=self.tokens["attention_mask"][rows["i2t"]].long(),
                     candidate_pixels=self.split.pixels[rows["t2i"]])
        return batch
