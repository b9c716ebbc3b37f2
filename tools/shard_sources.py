"""The sources make_shards.py reads: each turns its input into {split: (make_units, unit count)}, where
a unit is a list of Items (one per image; a synthetic twin pair is one unit of two). A new source is
one function here and one entry in SOURCES.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

log = logging.getLogger("make_shards")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class InputError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


# ---------------------------------------------------------------- items (one per image)

@dataclass
class Item:
    """One image to write. `load` returns the encoded image bytes (or a uint8 HxWx3 array)."""
    image_id: int
    load: Callable[[], object]
    captions: list
    source: dict = field(default_factory=dict)
    twin_id: int | None = None
    group: int | None = None
    name: str = ""  # for log lines about skipped items


def sample_key(image_id: int) -> str:
    # no dots: webdataset splits a member name at its first dot into key and extension
    return f"{image_id:09d}"


def clean_captions(captions: Iterable) -> list:
    return [" ".join(c.split()) for c in captions if isinstance(c, str) and c.strip()]


@dataclass
class FileLoader:
    """Picklable image loader (units travel to encoding processes)."""
    path: Path

    def __call__(self) -> bytes:
        return Path(self.path).read_bytes()


@dataclass
class BytesLoader:
    data: bytes | None

    def __call__(self) -> bytes:
        if self.data is None:
            raise FileNotFoundError("no image in the sample")
        return self.data


@dataclass
class ArrayLoader:
    pixels: np.ndarray

    def __call__(self) -> np.ndarray:
        return self.pixels


# ---------------------------------------------------------------- sources -> {split: units}
# A source returns {split: (iterator factory of units, number of units or None)}; a unit is a list
# of items that must land in the same shard, consecutively (a twin pair; a single image otherwise).

def load_json(path: Path, what: str):
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e})")


def require_dir(path, what: str) -> Path:
    if path is None:
        raise InputError(f"--images is required for this source ({what})")
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{what} not found: {path}")
    return path


def synthetic_source(args) -> dict:
    from train.synthetic import scenes
    sizes = {"train": args.train_images, "val": args.val_images, "test": args.test_images}
    out = {}
    for offset, (split, n) in enumerate(sizes.items()):
        if n <= 0:
            continue
        if n % 2:
            raise InputError(f"--{split}-images must be even (twins come in pairs), got {n}")
        split_seed = args.seed * 1000 + offset  # distinct scenes per split

        def units(start=0, n=n, split_seed=split_seed):
            return (SyntheticPair(split_seed, group, args.image_size, args.captions)
                    for group in range(start, n // 2))
        out[split] = (units, n // 2)
    return out


@dataclass
class SyntheticPair:
    """A twin pair, rendered where it is encoded (in the encoding process when --workers > 1)."""
    seed: int
    group: int
    image_size: int
    captions: str = "specific"

    def __call__(self) -> list:
        from train.synthetic import scenes
        pairs = scenes.generate_pair(self.seed, self.group, self.image_size, style=self.captions)
        return [Item(rec["image_id"], ArrayLoader(pixels), rec["captions"],
                     {"dataset": "synthetic", "seed": self.seed, "captions_style": self.captions,
                      "objects": rec["objects"],
                      "twin_type": rec["twin_type"], "false_for_twin": rec["false_for_twin"]}, rec["twin_id"], rec["group"], str(rec["image_id"]))
                for pixels, rec in pairs]


def karpathy_source(args) -> dict:
    path = Path(args.input)
    data = load_json(path, "Karpathy split JSON")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{path}: not a Karpathy split JSON (no 'images' list)")
    images_dir = require_dir(args.images, "image folder")
    by_split = {}
    for index, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or "filename" not in entry or "sentences" not in entry:
            raise InputError(f"{path}: images[{index}] lacks 'filename' or 'sentences'")
        split = {"restval": "train"}.get(entry.get("split", "train"), entry.get("split", "train"))
        captions = clean_captions(s.get("raw") if isinstance(s, dict) else s for s in entry["sentences"])
        image_id = int(entry["imgid"]) if isinstance(entry.get("imgid"), int) else index
        relative = Path(entry.get("filepath") or "") / entry["filename"]
        file = images_dir / relative
        if not file.exists() and (images_dir / entry["filename"]).exists():
            file = images_dir / entry["filename"]  # flat folder though the JSON names a subfolder
        meta = {"dataset": data.get("dataset", "karpathy"), "filename": str(relative),
                "split": entry.get("split")}
        for extra in ("cocoid", "sentids"):
            if extra in entry:
                meta[extra] = entry[extra]
        by_split.setdefault(split, []).append(
            [Item(image_id, FileLoader(file), captions, meta, name=str(relative))])
    return {s: (list_units(u), len(u)) for s, u in by_split.items()}


def list_units(units: list):
    return lambda start=0: iter(units[start:])


def coco_source(args) -> dict:
    path = Path(args.input)
    data = load_json(path, "COCO captions JSON")
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise InputError(f"{path}: not a COCO captions JSON (no '{key}' list)")
    images_dir = require_dir(args.images, "image folder")
    captions = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise InputError(f"{path}: annotations[{i}] lacks 'image_id' or 'caption'")
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    units = []
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise InputError(f"{path}: images[{i}] lacks 'id' or 'file_name'")
        meta = {"dataset": "coco", "file_name": img["file_name"], "coco_id": img["id"]}
        for extra in ("coco_url", "flickr_url"):
            if extra in img:
                meta[extra] = img[extra]
        units.append([Item(int(img["id"]), FileLoader(images_dir / img["file_name"]),
                           clean_captions(captions.get(img["id"], [])), meta, name=img["file_name"])])
    return {args.split: (list_units(units), len(units))}


IMAGE_COLUMNS = ("image", "filepath", "image_path", "file", "path", "filename", "file_name")
CAPTION_COLUMNS = ("caption", "text", "sentence", "title", "raw")


def pick_column(names: Iterable, wanted: tuple, path: Path, what: str) -> str:
    lower = {n.strip().lower(): n for n in names if n is not None}
    for w in wanted:
        if w in lower:
            return lower[w]
    raise InputError(f"{path}: no {what} column (want one of {', '.join(wanted)}; found {', '.join(lower)})")


def table_rows(path: Path) -> Iterator[dict]:
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        raise InputError(f"{path}:{line_no}: not a JSON line")
                    if not isinstance(row, dict):
                        raise InputError(f"{path}:{line_no}: a JSON line must be an object")
                    yield row
        return
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f, delimiter=delimiter)


def table_source(args) -> dict:
    """CSV / TSV / JSONL of image path + caption; rows with the same image make one sample."""
    path = Path(args.input)
    if not path.is_file():
        raise InputError(f"caption table not found: {path}")
    root = require_dir(args.images, "image root") if args.images else path.parent
    captions, order = {}, []
    image_col = caption_col = None
    try:
        for row in table_rows(path):
            if image_col is None:
                image_col = pick_column(row.keys(), IMAGE_COLUMNS, path, "image")
                caption_col = pick_column(row.keys(), CAPTION_COLUMNS, path, "caption")
            image = str(row.get(image_col) or "").strip()
            if not image:
                continue
            if image not in captions:
                captions[image] = []
                order.append(image)
            captions[image].append(row.get(caption_col))
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text")
    if not order:
        raise InputError(f"{path}: no rows with an image path")
    units = [[Item(i, FileLoader(root / image), clean_captions(captions[image]),
                   {"dataset": path.name, "path": image}, name=image)]
             for i, image in enumerate(order)]
    return {args.split: (list_units(units), len(units))}


def img2dataset_members(tar_path: Path, counts: Counter) -> Iterator[tuple]:
    """(key, {ext: bytes}) per sample of one img2dataset tar; a damaged tar is counted, not fatal."""
    current, files = None, {}
    try:
        with tarfile.open(tar_path, "r") as tar:
            for member in tar:
                folder, base = os.path.split(member.name)
                if not member.isreg() or "." not in base:
                    continue
                stem, ext = base.split(".", 1)  # webdataset convention: the key ends at the first dot
                key = f"{folder}/{stem}" if folder else stem
                if key != current and current is not None:
                    yield current, files
                    files = {}
                current = key
                files[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        counts["unreadable_shard"] += 1
        log.warning("skipping the rest of %s: %s", tar_path, e)
    if current is not None:
        yield current, files


def img2dataset_source(args) -> dict:
    folder = Path(args.input)
    if not folder.is_dir():
        raise InputError(f"img2dataset folder not found: {folder}")
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise InputError(f"{folder}: no .tar shards (expected img2dataset output NNNNN.tar)")
    total = 0
    for tar_path in tars:  # stats files give the unit count for the progress bar, when present
        stats = tar_path.with_name(tar_path.stem + "_stats.json")
        try:
            total += int(json.loads(stats.read_text())["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            total = None
            break
    source_counts = Counter()  # damaged tars; merged into the split's skip counts by the writer

    def units(start=0):
        source_counts.clear()  # a later full pass recounts damaged tars
        index = 0
        for tar_path in tars:
            for key, files in img2dataset_members(tar_path, source_counts):
                image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
                meta = {}
                if "json" in files:
                    try:
                        meta = json.loads(files["json"].decode("utf-8"))
                    except (ValueError, UnicodeDecodeError):
                        meta = {}
                text = files.get("txt", b"").decode("utf-8", errors="replace")
                captions = clean_captions([text] if text.strip() else [meta.get("caption")])
                source = {"dataset": "img2dataset", "shard": tar_path.name, "key": key}
                for extra in ("url", "original_width", "original_height"):
                    if meta.get(extra) is not None:
                        source[extra] = meta[extra]
                image = files.get(image_ext) if image_ext else None
                if index >= start:
                    yield [Item(index, BytesLoader(image), captions, source, name=f"{tar_path.name}:{key}")]
                index += 1

    return {args.split: (units, total), "__source_counts__": source_counts}


# ---------------------------------------------------------------- val / test carved out of one split

def key_rank(image_id: int, seed: int) -> str:
    """Where an image falls in the carving order: a hash of its sample key, so the same images go to
    val and test on every run, whatever order the source lists them in and however many there are."""
    return hashlib.sha1(f"{seed}:{sample_key(image_id)}".encode()).hexdigest()


def subset_units(make_units, keep: Callable[[int], bool]):
    """The units of `make_units` whose index `keep` accepts, renumbered from 0 (so --resume's start
    counts this split's units)."""
    def units(start=0):
        kept = (unit for index, unit in enumerate(make_units(0)) if keep(index))
        return itertools.islice(kept, start, None)
    return units


def carve_splits(splits: dict, source_split: str, sizes: dict, seed: int) -> dict:
    """`splits` with `sizes` ({"val": N, "test": M}) images moved out of `source_split` into splits of
    their own, chosen by key_rank: whole units (a unit's images stay together), at least N images
    each. One pass over the source's items to read their ids; images are not loaded."""
    if source_split not in splits:
        raise InputError(f"--val-images / --test-images carve from the '{source_split}' split, which this "
                         f"source does not write (it writes {', '.join(sorted(splits))})")
    clash = sorted(set(sizes) & set(splits))
    if clash:
        raise InputError(f"the source has its own '{clash[0]}' split; drop --{clash[0]}-images")
    make_units, _ = splits[source_split]
    ranked = sorted((key_rank(unit[0].image_id, seed), index, len(unit))
                    for index, unit in enumerate(make_units(0)) if unit)
    available = sum(size for _, _, size in ranked)
    out, position, carved = dict(splits), 0, set()
    for split, wanted in sizes.items():
        taken, count = set(), 0
        while count < wanted and position < len(ranked):
            _, index, size = ranked[position]
            taken.add(index)
            count += size
            position += 1
        if count < wanted or position >= len(ranked):
            raise InputError(f"--{split}-images {wanted}: the source has {available} images, too few to "
                             f"carve {' and '.join(f'{n} {s}' for s, n in sizes.items())} and keep any for training")
        carved |= taken
        out[split] = (subset_units(make_units, taken.__contains__), len(taken))
    out[source_split] = (subset_units(make_units, lambda index: index not in carved), len(ranked) - len(carved))
    return out


SOURCES = {"synthetic": synthetic_source, "karpathy": karpathy_source, "coco": coco_source,
           "csv": table_source, "img2dataset": img2dataset_source}
