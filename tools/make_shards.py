"""Write WebDataset tar shards from every supported source.

    python tools/make_shards.py --source synthetic   --out shards/synthetic [--train-images N ...]
    python tools/make_shards.py --source karpathy    --input dataset_flickr30k.json --images DIR --out DIR
    python tools/make_shards.py --source coco        --input captions_val2017.json --images DIR --out DIR --split val
    python tools/make_shards.py --source csv         --input pairs.tsv|.csv|.jsonl --images ROOT --out DIR --split train
    python tools/make_shards.py --source img2dataset --input IMG2DATASET_DIR --out DIR --split train
    python tools/make_shards.py --source csv ... --val-images N --test-images M   # val/test carved out

Output (docs/ARCHITECTURE.md): `{out}/{split}-{NNNNN}.tar` with `{key}.jpg`, `{key}.txt` (first
caption) and `{key}.json` per image; `{out}/{split}.json` manifest; `{out}/tokenizer/` trained on
the training captions. The sources (one function each) are in tools/shard_sources.py; this file
encodes their items, writes the shards and the manifests.

Robustness: every shard is written under a temporary name and renamed when complete; the manifest
is written (atomically) last. A `{split}.progress.json` records completed shards so that `--resume`
continues after the last one. Unreadable images and missing or empty captions are skipped and
counted by reason, never fatal. Bad command-line input (missing file, wrong JSON format) exits with
status 2 and one line naming the file or key.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import logging
import os
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from tools.image_codec import encode_image
from tools.shard_sources import SOURCES, InputError, Item, carve_splits, sample_key
from train.caption_tokenizers import TOKENIZER_KINDS, train_caption_tokenizer

log = logging.getLogger("make_shards")

SKIP_EXAMPLES = 5  # how many skipped items of each reason to name in the log


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


def resume_point(args, out: Path, split: str, fp: str, captions_out: list | None):
    """(complete shards, first unit to encode, captions and skip counts so far): where --resume
    continues, or the start."""
    shards = load_progress(out, split, fp) if args.resume else []
    last = shards[-1] if shards else {"next_unit": 0, "num_captions": 0, "skipped": {}}
    start_unit = last["next_unit"]
    if shards:
        log.info("%s: resuming after %d complete shards (%d units)", split, len(shards), start_unit)
        if captions_out is not None:
            captions_out += captions_in_shards(out, [s["name"] for s in shards])
    return shards, start_unit, last["num_captions"], Counter(last["skipped"])


def encode_all(tasks, workers: int):
    """(pool or None, the encoded units in order): in `workers` forked processes when more than one."""
    if workers <= 1:
        return None, map(encode_unit, tasks)
    import multiprocessing
    pool = multiprocessing.get_context("fork").Pool(workers)
    return pool, bounded_imap(pool, encode_unit, tasks)


def write_split(args, out: Path, split: str, make_units, total_units, source_counts: Counter,
                captions_out: list | None) -> dict:
    """Encode and write one split; returns its manifest. Train captions go to `captions_out`."""
    fp = fingerprint(args, split)
    done = finished_manifest(out, split, fp) if args.resume else None
    if done is not None:
        log.info("%s: already complete (--resume): %d samples", split, done["num_samples"])
        if captions_out is not None:
            captions_out += captions_in_shards(out, done["shards"])
        return done
    for leftover in out.glob(f"{split}-*.tar.tmp"):  # partial shards of a killed run
        leftover.unlink()

    shards, start_unit, num_captions, skipped = resume_point(args, out, split, fp, captions_out)
    next_unit = start_unit
    named = Counter()

    def shard_done(name, count, size):
        # the record says which units the completed shards hold, and the counts up to there
        shards.append({"name": name, "count": count, "bytes": size, "next_unit": next_unit,
                       "num_captions": num_captions, "skipped": dict(skipped)})
        atomic_write_json(out / f"{split}.progress.json", {"fingerprint": fp, "shards": shards})

    writer = ShardWriter(out, split, args.maxcount, args.maxsize, len(shards), shard_done)
    tasks = ((unit, args.max_side, args.quality) for unit in make_units(start_unit))
    pool, results = encode_all(tasks, args.workers)
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
    skipped += source_counts
    return finish_split(args, out, split, fp, shards, num_captions, skipped, time.time() - t0, images_done)


def finish_split(args, out: Path, split: str, fp: str, shards: list, num_captions: int, skipped: Counter,
                 seconds: float, images_done: int) -> dict:
    """The split's manifest, written last (readers trust a manifest's shards), and its summary line."""
    manifest = {"split": split, "shards": [s["name"] for s in shards],
                "shard_counts": [s["count"] for s in shards],
                "num_samples": sum(s["count"] for s in shards), "num_captions": num_captions,
                "skipped": dict(skipped), "source": args.source, "fingerprint": fp}
    if args.source == "synthetic":
        manifest["image_size"] = args.image_size
    elif args.max_side:
        manifest["max_side"] = args.max_side
    atomic_write_json(out / f"{split}.json", manifest)
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
    p.add_argument("--val-images", type=int, default=None,
                   help="synthetic: val size (default 1000); other sources: images carved out of the "
                        "train split into a val split, the same ones every run (by a hash of the key)")
    p.add_argument("--test-images", type=int, default=None, help="the same for a test split")
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
    p.add_argument("--tokenizer", default="wordpiece", choices=TOKENIZER_KINDS, help="trained on the train captions")
    p.add_argument("--vocab-size", type=int, default=8000, help="tokenizer vocabulary size at most")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.source != "synthetic" and not args.input:
        p.error(f"--input is required for --source {args.source}")
    if args.source == "synthetic":
        args.val_images = 1000 if args.val_images is None else args.val_images
        args.test_images = 1000 if args.test_images is None else args.test_images
    return args


def run(args) -> dict:
    out = Path(args.out)
    sources = SOURCES[args.source](args)
    source_counts = sources.pop("__source_counts__", Counter())
    carve = {s: n for s, n in (("val", args.val_images), ("test", args.test_images)) if n}
    if carve and args.source != "synthetic":
        sources = carve_splits(sources, args.split, carve, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    train_captions = []
    want_tokenizer = not args.no_tokenizer
    manifests = {}
    for split, (make_units, total) in sources.items():
        collect = train_captions if (want_tokenizer and split == "train") else None
        manifests[split] = write_split(args, out, split, make_units, total, source_counts, collect)
    if want_tokenizer:
        if train_captions:
            train_caption_tokenizer(args.tokenizer, train_captions, out / "tokenizer", vocab_size=args.vocab_size)
            print(f"make_shards: {args.tokenizer} tokenizer trained on {len(train_captions)} train captions -> "
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
