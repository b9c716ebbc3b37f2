"""Where a run's validation gallery comes from.

A shard folder written from one source (a CSV of photos, a COCO annotation file, an img2dataset
folder) may have no validation split. Rather than dying at the first validation, the run says so in
one line and validates on the first images of the training split, which the training stream then
skips (held out, so the numbers are not measured on what the student trained on). `--eval-every 0`
turns validation off altogether.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from train.config import RunConfig
from train.data import DataError, load_manifest

# At most this share of a training split is held out for validation, and never fewer images than
# MIN_HELD_OUT (Recall@K over a handful of images says nothing).
MAX_HELD_OUT_SHARE = 0.1
MIN_HELD_OUT = 8


@dataclass(frozen=True)
class ValidationSource:
    split: str | None   # None: no validation
    images: int         # the gallery: the first `images` images of `split`
    held_out: int = 0   # images at the start of the training split that training skips
    note: str = ""      # one line for the log when validation is not the usual val split


def validation_source(cfg: RunConfig) -> ValidationSource:
    """The val split when the folder has one, else a held-out slice of train (DataError when train is
    too small to spare one), or nothing with eval_every 0."""
    d, t = cfg.data, cfg.train
    if t.eval_every == 0:
        return ValidationSource(None, 0)  # asked for: nothing to say
    if (Path(d.shards) / f"{d.val_split}.json").is_file():
        return ValidationSource(d.val_split, t.eval_images)
    train = load_manifest(d.shards, d.train_split)
    total = sum(train["shard_counts"])
    held_out = min(t.eval_images, int(total * MAX_HELD_OUT_SHARE))
    if held_out < MIN_HELD_OUT:
        raise DataError(f"{d.shards} has no split '{d.val_split}' and its '{d.train_split}' split ({total} "
                        f"images) is too small to hold {MIN_HELD_OUT} out for validation; make one "
                        f"(tools/make_shards.py --val-images N) or pass --eval-every 0")
    return ValidationSource(d.train_split, held_out, held_out, note=(
        f"{d.shards} has no split '{d.val_split}': validating on the first {held_out} images of "
        f"'{d.train_split}', held out of training (--eval-every 0: no validation)"))
