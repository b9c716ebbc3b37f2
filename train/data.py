"""Shard streams (training, evaluation), manifests, tokeniser training and loading; one sample's reading
and decoding is train/samples.py.

Shards and manifests are written by tools/make_shards.py (layout in docs/ARCHITECTURE.md).

Training batch (dict), B = batch_size, S = image_size, L = max_length:
    pixels         uint8 [B, 3, S, S]   (models normalise them with model.preprocess_images)
    captions       list[str]            one caption per image, drawn per pass (seeded)
    input_ids      long [B, L]          only with a tokenizer; padded to max_length
    attention_mask long [B, L]          only with a tokenizer
    image_ids      long [B]
    twin_ids       long [B]             -1 when the image has no twin
    groups         long [B]             -1 when the image has no group
Evaluation batch (dict): pixels uint8 [b,3,S,S]; captions list[list[str]]; image_ids long [b];
    twin_ids long [b]; keys list[str].

Corrupt samples (bad image, missing or invalid json, empty or non-UTF-8 caption, zero-size or
extreme images, damaged tar) are skipped and counted by reason, never fatal. Training: the loader
workers send their counts with each batch; `TrainLoader` takes them out of the batch (so batches
keep the contract above) and adds them to `TrainLoader.skipped`, a Counter of totals. Evaluation:
pass a Counter as `skipped=` to `iterate_eval` / `load_eval_split`.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import random
from collections import Counter, deque
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from train import failure
from train.samples import SampleError, decode_sample, pick_caption, read_shard, sample_meta

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                  "sep_token": "[SEP]", "mask_token": "[MASK]"}


class DataError(failure.ReportedError):
    """A missing or malformed shard folder, manifest, shard or tokenizer; the message names the path."""


# ---------------------------------------------------------------- manifests and tokenizers

def load_manifest(shards_dir, split: str) -> dict:
    """The split's manifest, with `paths` (absolute shard paths) and `shard_counts` filled in."""
    folder = Path(shards_dir)
    if not folder.is_dir():
        raise DataError(f"shard folder not found: {folder}")
    path = folder / f"{split}.json"
    if not path.is_file():
        raise DataError(f"no manifest for split '{split}': {path} (run tools/make_shards.py)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"manifest is not valid JSON: {path} ({e})")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list) or not manifest["shards"]:
        raise DataError(f"manifest lists no shards: {path}")
    paths = [folder / name for name in manifest["shards"]]
    for p in paths:
        if not p.is_file():
            raise DataError(f"shard listed in {path} is missing: {p}")
    if len(manifest.get("shard_counts") or []) != len(paths):
        manifest["shard_counts"] = [sum(1 for _ in read_shard(p)) for p in paths]
    manifest["paths"] = [str(p) for p in paths]
    return manifest


def load_tokenizer(path):
    """The data tokenizer folder written by save_pretrained (e.g. `{shards}/tokenizer`); a missing one
    is a DataError (one line) instead of transformers' long OSError."""
    from train.models.common import load_tokenizer as load_saved_tokenizer
    folder = Path(path)
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise DataError(f"no tokenizer in {folder} (tools/make_shards.py writes one to {{out}}/tokenizer)")
    return load_saved_tokenizer(folder)


def train_tokenizer(captions, out_dir, vocab_size: int = 8000, min_frequency: int = 1,
                    model_max_length: int = 64):
    """Train a lower-cased WordPiece tokenizer on captions; save it loadable by AutoTokenizer.

    Saved as a fast tokenizer object: in transformers 5, BertTokenizer(vocab_file=...) silently
    maps every token to [UNK] (docs/platform_notes.md), so it must be loaded with from_pretrained(folder).
    """
    import shutil
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] = 0, as BERT
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=specials, show_progress=False)
    tok.train_from_iterator(captions, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **SPECIAL_TOKENS)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # readers never see a half-written tokenizer folder
    return fast



# ---------------------------------------------------------------- training stream stages
# Each (rank, loader worker) pair is a "slot" that reads a disjoint part of the split forever.
# Stages run inside the loader workers; they are module-level functions bound with partial() so
# that they pickle into worker processes.

_worker_skips = Counter()  # per process; emptied into each batch as batch["skipped"]


def slot_of(rank: int, world_size: int, start_batch: int) -> tuple:
    """(slot, number of slots, logical worker, workers) of the calling loader worker.

    The DataLoader hands out batches round-robin from worker 0. Resuming at batch N, the loader's
    worker w plays the part of worker (w + N) % workers of the fresh run, so that batch N comes
    first from the worker that made it in the fresh run.
    """
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    logical = (worker + start_batch) % workers
    return rank * workers + logical, world_size * workers, logical, workers


def slot_samples(paths: list, counts: list, rank: int, world_size: int, start_batch: int, seed: int,
                 held_out: int = 0):
    """Raw samples of this slot, pass after pass, with `__pass__`; shard order reshuffled per pass.
    The first `held_out` samples of the split (in manifest order) are never yielded: they validate.

    Enough shards: slot s reads shards s, s+slots, ... Fewer shards than slots: every slot reads all
    shards and keeps the samples whose unit (twin group, else index in the split) is s modulo slots.
    Both are disjoint across slots and keep twins (same group, same shard) in one slot.
    """
    slot, slots, _, _ = slot_of(rank, world_size, start_batch)
    offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
    by_shard = len(paths) >= slots
    mine = list(range(slot, len(paths), slots)) if by_shard else list(range(len(paths)))
    for pass_index in itertools.count():
        order = mine[:]
        random.Random(f"shards:{seed}:{slot}:{pass_index}").shuffle(order)
        found = 0
        for shard in order:
            for position, raw in enumerate(read_shard(paths[shard], _worker_skips)):
                if offsets[shard] + position < held_out:
                    continue
                if not by_shard:
                    unit = offsets[shard] + position
                    try:
                        group = sample_meta(raw).get("group")
                        unit = group if isinstance(group, int) else unit
                    except SampleError:
                        pass  # counted when decoded
                    if unit % slots != slot:
                        continue
                raw["__pass__"] = pass_index
                found += 1
                yield raw
        if found == 0:
            raise DataError(f"training slot {slot} of {slots} found no samples in {len(mine)} shards "
                            f"(first: {paths[mine[0]] if mine else 'none'})")


def group_units(samples, twins_in_batch: bool):
    """Lists of samples that travel together: consecutive samples of one twin group, or singles."""
    if not twins_in_batch:
        for s in samples:
            yield [s]
        return
    unit, unit_group = [], None
    for s in samples:
        try:
            group = sample_meta(s).get("group")
        except SampleError:
            group = None
        if unit and (group is None or group != unit_group or s["__pass__"] != unit[0]["__pass__"]):
            yield unit
            unit = []
        unit.append(s)
        unit_group = group
    if unit:
        yield unit


def shuffle_units(units, bufsize: int, seed: int, rank: int, world_size: int, start_batch: int):
    """Buffer shuffle with a seeded per-slot generator, emptied at the end of every pass: each pass
    yields each unit of the slot exactly once (a true permutation when the buffer holds a pass)."""
    slot, _, _, _ = slot_of(rank, world_size, start_batch)
    rng = random.Random(f"shuffle:{seed}:{slot}")
    buf, current_pass = [], None
    for unit in units:
        if unit[0]["__pass__"] != current_pass:
            rng.shuffle(buf)
            yield from buf
            buf, current_pass = [], unit[0]["__pass__"]
        buf.append(unit)
        if len(buf) < bufsize:
            continue
        i = rng.randrange(len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def pack_batches(units, batch_size: int, max_waiting: int = 32):
    """Lists of exactly batch_size raw samples; a unit (twin pair) is never split across batches
    unless nothing else can fill the last places (then the first waiting unit is split)."""
    batch, waiting = [], deque()
    for unit in units:
        waiting.append(unit)
        while True:
            for _ in range(len(waiting)):  # first fit, in arrival order
                u = waiting.popleft()
                if len(batch) + len(u) <= batch_size:
                    batch += u
                else:
                    waiting.append(u)
            if len(batch) < batch_size and len(waiting) > max_waiting:
                u = waiting.popleft()
                room = batch_size - len(batch)
                batch += u[:room]
                waiting.appendleft(u[room:])
            if len(batch) < batch_size:
                break
            yield batch
            batch = []


def skip_and_flatten(batches, start_batch: int, rank: int, world_size: int):
    """Drop the raw batches this worker made before `start_batch` (before any decoding)."""
    _, _, logical, workers = slot_of(rank, world_size, start_batch)
    already = max(0, -(-(start_batch - logical) // workers))  # batches b < N with b % workers == logical
    for batch in itertools.islice(batches, already, None):
        yield from batch


def decode_train(samples, image_size: int, seed: int):
    good_pass = None  # pass of the last decodable sample
    for raw in samples:
        try:
            s = decode_sample(raw, image_size)
        except SampleError as e:
            _worker_skips[e.args[0]] += 1
            if good_pass is None:
                good_pass = raw["__pass__"]
            if raw["__pass__"] >= good_pass + 2:  # a whole pass with nothing readable: fail, never hang
                raise DataError(f"no readable sample in this loader slot's shards for a whole pass "
                                f"(skipped so far: {dict(_worker_skips)})")
            continue
        good_pass = raw["__pass__"]
        s["caption"] = pick_caption(s["captions"], s["key"], seed, raw["__pass__"])
        yield s


def collate_train(samples, batch_size: int, tokenizer=None, max_length: int = 32):
    """Exactly batch_size samples per batch, as the training batch dict (module docstring)."""
    for chunk in iter(lambda: list(itertools.islice(samples, batch_size)), []):
        if len(chunk) < batch_size:
            return
        failure.fault_point("data")  # in the loader worker, where a real data error would be
        batch = {"pixels": torch.from_numpy(np.stack([s["pixels"] for s in chunk])),
                 "captions": [s["caption"] for s in chunk],
                 "image_ids": torch.tensor([s["image_id"] for s in chunk], dtype=torch.long),
                 "twin_ids": torch.tensor([s["twin_id"] for s in chunk], dtype=torch.long),
                 "groups": torch.tensor([s["group"] for s in chunk], dtype=torch.long)}
        if tokenizer is not None:
            enc = tokenizer(batch["captions"], padding="max_length", truncation=True,
                            max_length=max_length, return_tensors="pt")
            batch["input_ids"] = enc["input_ids"].long()
            batch["attention_mask"] = enc["attention_mask"].long()
        batch["skipped"] = dict(_worker_skips)
        _worker_skips.clear()
        yield batch


def _leave_stop_signals_to_the_rank(worker_id: int) -> None:
    """Loader workers ignore SIGTERM / SIGINT. A launcher stopping a run signals the whole process
    tree (deepspeed's launch.py terminates each rank's children too); a worker that died of it would
    make the rank raise before it could save. The rank saves and exits, and shuts its workers down."""
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainLoader:
    """Iterable of training batches from one persistent, endless stream.

    With `batches_per_epoch`, each `iter()` yields that many batches and the next one continues
    where it stopped; without it, iteration never ends. Every rank gets the same number of batches
    (each worker's stream is endless), so a distributed run never waits on a rank out of data.
    `batches_seen` counts batches since the start of the stream (start_batch included): save it
    and pass it back as start_batch to resume. `skipped` totals corrupt samples by reason.
    """

    def __init__(self, loader, batches_per_epoch: int | None, start_batch: int):
        self.loader = loader
        self.batches_per_epoch = batches_per_epoch
        self.batches_seen = start_batch
        self.skipped = Counter()
        self._stream = None

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("endless TrainLoader has no length (pass batches_per_epoch)")
        return self.batches_per_epoch

    def __iter__(self):
        if self._stream is None:
            self._stream = iter(self.loader)
        n = itertools.count() if self.batches_per_epoch is None else range(self.batches_per_epoch)
        for _ in n:
            batch = next(self._stream)
            self.skipped.update(batch.pop("skipped", {}))
            self.batches_seen += 1
            yield batch


def make_train_loader(shards_dir, split: str, batch_size: int, image_size: int, tokenizer=None,
                      max_length: int = 32, num_workers: int = 2, rank: int = 0, world_size: int = 1,
                      seed: int = 0, start_batch: int = 0, twins_in_batch: bool = False,
                      shuffle_buffer: int = 1000, batches_per_epoch: int | None = None,
                      prefetch_factor: int = 4, held_out: int = 0) -> TrainLoader:
    """Endless, deterministic training stream of one rank (see TrainLoader, module docstring).

    Shards are split by global rank and loader worker into disjoint slots (by sample when there are
    fewer shards than slots); each slot repeats its part forever, reshuffled every pass. The same
    (seed, rank, world_size, num_workers) always gives the same batches; `start_batch=N` gives
    batches N, N+1, ... of that sequence, skipping the first N batches' raw samples undecoded
    (exact while those contain no corrupt samples: each one skipped shifts later batches by one).
    `twins_in_batch`: samples of one `group` stay together through shuffling and batching.
    `held_out`: the split's first N samples are left out (train/validation_source.py validates on them).
    """
    manifest = load_manifest(shards_dir, split)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers > 0:  # workers tokenise one batch each; a Rust thread pool per fork only fights them
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    pipeline = wds.DataPipeline(
        partial(slot_samples, manifest["paths"], manifest["shard_counts"], rank, world_size, start_batch, seed,
                held_out),
        partial(group_units, twins_in_batch=twins_in_batch),
        partial(shuffle_units, bufsize=shuffle_buffer, seed=seed, rank=rank, world_size=world_size,
                start_batch=start_batch),
        partial(pack_batches, batch_size=batch_size),
        partial(skip_and_flatten, start_batch=start_batch, rank=rank, world_size=world_size),
        partial(decode_train, image_size=image_size, seed=seed),
        partial(collate_train, batch_size=batch_size, tokenizer=tokenizer, max_length=max_length),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers,
                           prefetch_factor=prefetch_factor if num_workers > 0 else None,
                           persistent_workers=num_workers > 0,
                           worker_init_fn=_leave_stop_signals_to_the_rank if num_workers > 0 else None)
    return TrainLoader(loader, batches_per_epoch, start_batch)


# ---------------------------------------------------------------- evaluation stream

def eval_range(num_images: int, rank: int, world_size: int) -> range:
    """Contiguous part of the split for `rank`: sizes differ by at most one across ranks."""
    return range(rank * num_images // world_size, (rank + 1) * num_images // world_size)


def iterate_eval(shards_dir, split: str, batch_size: int, image_size: int, rank: int = 0,
                 world_size: int = 1, max_images: int | None = None,
                 skipped: Counter | None = None) -> Iterator[dict]:
    """Evaluation batches (module docstring) of this rank's contiguous part of the split.

    Ranks together cover the first `max_images` images (all by default) exactly once, in manifest
    order; concatenating rank 0, 1, ... gives the split in order. Only the shards overlapping this
    rank's part are read. Corrupt samples are left out and counted in `skipped`.
    """
    manifest = load_manifest(shards_dir, split)
    counts = manifest["shard_counts"]
    total = sum(counts) if max_images is None else min(max_images, sum(counts))
    mine = eval_range(total, rank, world_size)
    skips = skipped if skipped is not None else Counter()
    before = Counter(skips)
    chunk, start = [], 0
    for path, count in zip(manifest["paths"], counts):
        end = start + count
        if end > mine.start and start < mine.stop:
            for index, raw in enumerate(read_shard(path, skips), start):
                if index >= mine.stop:
                    break
                if index < mine.start:
                    continue
                try:
                    chunk.append(decode_sample(raw, image_size))
                except SampleError as e:
                    skips[e.args[0]] += 1
                    log.warning("eval %s: skipped %s (%s)", split, raw.get("__key__"), e.args[0])
                    continue
                if len(chunk) == batch_size:
                    yield collate_eval(chunk)
                    chunk = []
        start = end
    if chunk:
        yield collate_eval(chunk)
    mine_skipped = skips - before
    if mine_skipped:
        log.warning("eval %s: skipped %d corrupt samples (%s)", split, sum(mine_skipped.values()),
                    ", ".join(f"{reason} {n}" for reason, n in sorted(mine_skipped.items())))


def collate_eval(samples: list) -> dict:
    return {"pixels": torch.from_numpy(np.stack([s["pixels"] for s in samples])),
            "captions": [s["captions"] for s in samples],
            "image_ids": torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
            "twin_ids": torch.tensor([s["twin_id"] for s in samples], dtype=torch.long),
            "keys": [s["key"] for s in samples]}


def load_eval_split(shards_dir, split: str, image_size: int, max_images: int | None = None,
                    skipped: Counter | None = None) -> dict:
    """A whole (small) split on one process: one eval batch dict of every image, in order."""
    batches = list(iterate_eval(shards_dir, split, 256, image_size, max_images=max_images, skipped=skipped))
    if not batches:
        raise DataError(f"no readable samples in split '{split}' of {shards_dir}")
    return {"pixels": torch.cat([b["pixels"] for b in batches]),
            "captions": [c for b in batches for c in b["captions"]],
            "image_ids": torch.cat([b["image_ids"] for b in batches]),
            "twin_ids": torch.cat([b["twin_ids"] for b in batches]),
            "keys": [k for b in batches for k in b["keys"]]}
