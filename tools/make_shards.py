"""Write WebDataset tar shards from every supported source.

    python tools/make_shards.py --source synthetic   --out shards/synthetic [--train-images N ...]
    python tools/make_shards.py --source karpathy    --input dataset_flickr30k.json --images DIR --out DIR
    python tools/make_shards.py --source coco        --input captions_val2017.json --images DIR --out DIR --split val
    python tools/make_shards.py --source csv         --input pairs.tsv|.csv|.jsonl --images ROOT --out DIR --split train
    python tools/make_shards.py --source img2dataset --input IMG2DATASET_DIR --out DIR --split train

Output (docs/ARCHITECTURE.md): `{out}/{split}-{NNNNN}.tar` with `{key}.jpg`, `{key}.txt` (first
caption) and `{key}.json` per image; `{out}/{split}.json` manifest; `{out}/tokenizer/` trained on
the training captions.

Robustness: every shard is written under a temporary name and renamed when complete; the manifest
is written (atomically) last. A `{split}.progress.json` records completed shards so that `--resume`
continues after the last one. Unreadable images and missing or empty captions are skipped and
counted by reason, never fatal. Bad command-line input (missing file, wrong JSON format) exits with
status 2 and one line naming the file or key.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import logging
import os
import sys
import tarfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image
from tqdm import tqdm

log = logging.getLogger("make_shards")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MAX_PIXELS = 64_000_000  # refuse decompression bombs rather than exhaust memory
MAX_ASPECT = 20.0
SKIP_EXAMPLES = 5  # how many skipped items of each reason to name in the log


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


# ---------------------------------------------------------------- images

def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any PIL mode: grayscale, 16-bit, palette, RGBA (on white), CMYK, ..."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def encode_image(data, max_side: int | None, quality: int) -> tuple:
    """(jpeg bytes, (width, height)) or raises ValueError with a skip reason.

    A valid RGB JPEG that needs no resizing is stored as is (no second lossy encoding).
    """
    if isinstance(data, np.ndarray):
        img = Image.fromarray(data)
        data = None
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                if img.width * img.height > MAX_PIXELS:
                    raise ValueError("image_too_large")
                img.load()  # full decode: catches truncated files that open() accepts
        except ValueError:
            raise
        except Exception:
            raise ValueError("unreadable_image")
    w, h = img.size
    if w < 2 or h < 2 or max(w, h) / min(w, h) > MAX_ASPECT:
        raise ValueError("bad_image_size")
    scale = max_side / min(w, h) if max_side and min(w, h) > max_side else 1.0
    if data is not None and scale == 1.0 and img.format == "JPEG" and img.mode == "RGB":
        return data, (w, h)
    img = to_rgb(img)
    if scale != 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC,
                         reducing_gap=3.0)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), img.size


def encode_item(item: Item, max_side: int | None, quality: int):
    """(files dict for the tar, number of captions) or (None, skip reason)."""
    if not item.captions:
        return None, "no_caption"
    try:
        raw = item.load()
    except FileNotFoundError:
        return None, "missing_image"
    except OSError:
        return None, "unreadable_image"
    try:
        jpeg, (w, h) = encode_image(raw, max_side, quality)
    except ValueError as e:
        return None, str(e)
    key = sample_key(item.image_id)
    meta = {"image_id": item.image_id, "key": key, "captions": item.captions,
            "twin_id": item.twin_id, "group": item.group,
            "source": {**item.source, "width": w, "height": h}}
    files = {"jpg": jpeg, "txt": item.captions[0].encode("utf-8"),
             "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    return (key, files), len(item.captions)


def encode_unit(args):
    """Encode a unit: a list of items written together (a twin pair), or a callable making one.

    Runs in encoding processes; returns [(item without its image, files or None, captions or reason)].
    """
    unit, max_side, quality = args
    items = unit() if callable(unit) else unit
    out = []
    for item in items:
        encoded, info = encode_item(item, max_side, quality)
        item.load = None  # do not send the pixels back to the main process
        out.append((item, encoded, info))
    return out


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


SOURCES = {"synthetic": synthetic_source, "karpathy": karpathy_source, "coco": coco_source,
           "csv": table_source, "img2dataset": img2dataset_source}


# ---------------------------------------------------------------- atomic shard writing

def atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


class ShardWriter:
    """Writes `{split}-NNNNN.tar` shards, each under a `.tmp` name until complete, then renamed.

    The caller decides where shards end (`would_overflow` before a unit, `is_full` after it) so that
    it knows exactly which units a completed shard holds. `on_complete(name, count, bytes)` runs
    after each rename.
    """

    def __init__(self, out: Path, split: str, maxcount: int, maxsize: float, start_index: int = 0,
                 on_complete: Callable | None = None):
        self.out, self.split, self.maxcount, self.maxsize = out, split, maxcount, maxsize
        self.index, self.on_complete = start_index, on_complete
        self.tar = self.tmp_path = None
        self.count = self.size = 0

    @staticmethod
    def unit_bytes(samples: list) -> int:
        return sum(len(b) + 1024 for _, files in samples for b in files.values())  # + tar headers

    def would_overflow(self, samples: list) -> bool:
        return self.count > 0 and (self.count + len(samples) > self.maxcount
                                   or self.size + self.unit_bytes(samples) > self.maxsize)

    def is_full(self) -> bool:
        return self.count >= self.maxcount or self.size >= self.maxsize

    def add(self, samples: list) -> None:
        """Write samples [(key, {ext: bytes})] consecutively into the current shard."""
        if self.tar is None:
            self.tmp_path = self.out / (shard_name(self.split, self.index) + ".tmp")
            self.tar = tarfile.open(self.tmp_path, "w", format=tarfile.USTAR_FORMAT)
            self.count = self.size = 0
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                self.tar.addfile(info, io.BytesIO(data))
            self.count += 1
        self.size += self.unit_bytes(samples)

    def close(self) -> None:
        """Complete the current shard: close, flush to disk, rename to its final name."""
        if self.tar is None:
            return
        self.tar.close()
        with open(self.tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        final = self.out / shard_name(self.split, self.index)
        os.replace(self.tmp_path, final)
        self.tar = self.tmp_path = None
        self.index += 1
        if self.on_complete:
            self.on_complete(final.name, self.count, final.stat().st_size)


def captions_in_shards(out: Path, names: list) -> list:
    """All captions stored in the given shards (the tokenizer needs those of kept shards too)."""
    captions = []
    for name in names:
        with tarfile.open(out / name, "r") as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    captions += json.loads(tar.extractfile(member).read()).get("captions", [])
    return captions


# ---------------------------------------------------------------- one split

def fingerprint(args, split: str) -> str:
    """Identifies what a split's shards were made from, so --resume never mixes two inputs."""
    parts = {k: getattr(args, k) for k in ("source", "input", "images", "seed", "image_size", "captions",
                                           "train_images", "val_images", "test_images",
                                           "max_side", "quality", "maxcount", "maxsize")}
    parts["split"] = split
    if args.input and Path(args.input).exists():
        st = Path(args.input).stat()
        parts["input_stat"] = [st.st_size, int(st.st_mtime)]
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_progress(out: Path, split: str, fp: str) -> list:
    """Completed shards of an interrupted run of the same input, still on disk unchanged."""
    try:
        progress = json.loads((out / f"{split}.progress.json").read_text())
    except (OSError, ValueError):
        return []
    if progress.get("fingerprint") != fp:
        log.info("%s: the resume record is for other input; starting over", split)
        return []
    kept = []
    for shard in progress.get("shards", []):  # the prefix that is intact
        path = out / shard["name"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            break
        kept.append(shard)
    return kept


def finished_manifest(out: Path, split: str, fp: str):
    """The manifest of a completed earlier run of the same input, if its shards are all there."""
    try:
        done = json.loads((out / f"{split}.json").read_text())
    except (OSError, ValueError):
        return None
    if done.get("fingerprint") == fp and all((out / s).is_file() for s in done.get("shards", [])):
        return done
    return None


def bounded_imap(pool, fn, iterable, window: int = 256):
    """Pool.imap reads its whole input at once; feed it in windows to bound memory."""
    it = iter(iterable)
    while True:
        chunk = list(itertools.islice(it, window))
        if not chunk:
            return
        yield from pool.imap(fn, chunk, chunksize=8)


def write_split(args, out: Path, split: str, make_units, total_units, source_counts: Counter,
                captions_out: list | None) -> dict:
    """Encode and write one split; returns its manifest. Train captions go to `captions_out`."""
    fp = fingerprint(args, split)
    if args.resume:
        done = finished_manifest(out, split, fp)
        if done is not None:
            log.info("%s: already complete (--resume): %d samples", split, done["num_samples"])
            if captions_out is not None:
                captions_out += captions_in_shards(out, done["shards"])
            return done
    for leftover in out.glob(f"{split}-*.tar.tmp"):  # partial shards of a killed run
        leftover.unlink()

    shards = load_progress(out, split, fp) if args.resume else []
    last = shards[-1] if shards else {"next_unit": 0, "num_captions": 0, "skipped": {}}
    start_unit, num_captions, skipped = last["next_unit"], last["num_captions"], Counter(last["skipped"])
    if shards:
        log.info("%s: resuming after %d complete shards (%d units)", split, len(shards), start_unit)
        if captions_out is not None:
            captions_out += captions_in_shards(out, [s["name"] for s in shards])
    next_unit = start_unit
    named = Counter()

    def shard_done(name, count, size):
        # the record says which units the completed shards hold, and the counts up to there
        shards.append({"name": name, "count": count, "bytes": size, "next_unit": next_unit,
                       "num_captions": num_captions, "skipped": dict(skipped)})
        atomic_write_json(out / f"{split}.progress.json", {"fingerprint": fp, "shards": shards})

    writer = ShardWriter(out, split, args.maxcount, args.maxsize, len(shards), shard_done)
    tasks = ((unit, args.max_side, args.quality) for unit in make_units(start_unit))
    pool = None
    if args.workers > 1:
        import multiprocessing
        pool = multiprocessing.get_context("fork").Pool(args.workers)
        results = bounded_imap(pool, encode_unit, tasks)
    else:
        results = map(encode_unit, tasks)
    total = None if total_units is None else total_units - start_unit
    t0, images_done = time.time(), 0
    try:
        for encoded in tqdm(results, total=total, desc=split, unit="unit", mininterval=1.0,
                            disable=True if args.quiet else None):
            samples = [result for _, result, _ in encoded if result is not None]
            if samples and writer.would_overflow(samples):
                writer.close()  # before counting this unit: the shard ends at the previous one
            for item, result, info in encoded:
                if result is None:
                    skipped[info] += 1
                    if named[info] < SKIP_EXAMPLES:
                        log.warning("%s: skipped %s (%s)", split, item.name or item.image_id, info)
                    named[info] += 1
                else:
                    num_captions += info
                    if captions_out is not None:
                        captions_out += item.captions
            if samples:
                writer.add(samples)
            images_done += len(samples)
            next_unit += 1
            if writer.is_full():
                writer.close()
        writer.close()
    finally:
        if pool is not None:
            pool.terminate()
    seconds = time.time() - t0
    skipped += source_counts
    manifest = {"split": split, "shards": [s["name"] for s in shards],
                "shard_counts": [s["count"] for s in shards],
                "num_samples": sum(s["count"] for s in shards), "num_captions": num_captions,
                "skipped": dict(skipped), "source": args.source, "fingerprint": fp}
    if args.source == "synthetic":
        manifest["image_size"] = args.image_size
    elif args.max_side:
        manifest["max_side"] = args.max_side
    atomic_write_json(out / f"{split}.json", manifest)  # last: readers trust a manifest's shards
    (out / f"{split}.progress.json").unlink(missing_ok=True)
    remove_stale_shards(out, split, set(manifest["shards"]))
    size = sum(s["bytes"] for s in shards)
    print(f"make_shards: {split}: {manifest['num_samples']} samples, {num_captions} captions, "
          f"skipped {dict(skipped) or 0}, {len(shards)} shards, {size / 1e6:.1f} MB, {seconds:.1f} s, "
          f"{images_done / max(seconds, 1e-9):.0f} images/s", flush=True)
    return manifest


def remove_stale_shards(out: Path, split: str, keep: set) -> None:
    """Shards of an earlier, larger run of this split would confuse anyone globbing the folder."""
    for p in out.glob(f"{split}-*.tar"):
        if p.name not in keep and p.name[len(split) + 1:-4].isdigit():
            p.unlink()


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=sorted(SOURCES))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--input", help="JSON / CSV / TSV / JSONL file, or img2dataset folder")
    p.add_argument("--images", help="image folder (karpathy, coco) or root of relative paths (csv)")
    p.add_argument("--split", default="train", help="split name for coco, csv and img2dataset")
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64, help="synthetic image size in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions", default="specific", choices=("specific", "partial"),
                   help="synthetic caption style: 'specific' names every object in full and is true "
                        "of its own scene only; 'partial' (the first generator) names some attributes "
                        "and is true of ~55 test images each")
    p.add_argument("--max-side", type=int, default=None,
                   help="resize so that the shorter side is at most this (default: keep size)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most")
    p.add_argument("--maxsize", type=float, default=256e6, help="bytes per shard at most")
    p.add_argument("--workers", type=int, default=1, help="encoding processes")
    p.add_argument("--resume", action="store_true", help="keep complete shards of an interrupted run")
    p.add_argument("--no-tokenizer", action="store_true", help="do not train a tokenizer")
    p.add_argument("--vocab-size", type=int, default=8000, help="WordPiece vocabulary size at most")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.source != "synthetic" and not args.input:
        p.error(f"--input is required for --source {args.source}")
    return args


def run(args) -> dict:
    out = Path(args.out)
    sources = SOURCES[args.source](args)
    source_counts = sources.pop("__source_counts__", Counter())
    out.mkdir(parents=True, exist_ok=True)
    train_captions = []
    want_tokenizer = not args.no_tokenizer
    manifests = {}
    for split, (make_units, total) in sources.items():
        collect = train_captions if (want_tokenizer and split == "train") else None
        manifests[split] = write_split(args, out, split, make_units, total, source_counts, collect)
    if want_tokenizer:
        if train_captions:
            from train.data import train_tokenizer
            train_tokenizer(train_captions, out / "tokenizer", vocab_size=args.vocab_size)
            print(f"make_shards: tokenizer trained on {len(train_captions)} train captions -> "
                  f"{out / 'tokenizer'}", flush=True)
        else:
            print("make_shards: no train split written, so no tokenizer trained", flush=True)
    return manifests


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except InputError as e:
        print(f"make_shards: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
