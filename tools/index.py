"""Build and save a FAISS index of a folder of images (or a shard split) with a trained student.

    python tools/index.py --student runs/mine/student --images ~/photos --out runs/mine/photos.index
    python tools/index.py --student runs/default/dcd/student --shards shards/synthetic --split test \\
        --out runs/default/test.index [--captions captions.txt]

`--images DIR` reads every JPEG / PNG / WebP under DIR (any depth; no captions needed), decoded as
training decodes (RGB, shorter side resized, centre crop); unreadable files are skipped and counted.
Images stream in batches of --batch-size: memory is bounded by the batch, not the gallery (the
embeddings go to a memory-mapped file beside the index while it is built). `--captions FILE` (one
caption a line, or a .csv / .tsv / .jsonl with a caption column) also indexes captions, for image ->
text search.

The index folder (read by tools/search.py, never rebuilt per query):
  manifest.json       format, student (path and fingerprint), image_size, counts, skipped, kind, files
  images-ID.faiss     inner product over L2-normalised embeddings (cosine): exact (IndexFlatIP), or
                      IVF (IndexIVFFlat) above --ivf-above images
  images-ID.jsonl     one line per vector, in index order: {"key", "path"}
  captions-ID.faiss / captions-ID.jsonl   with --captions: {"key", "caption"}
Every file is written under a temporary name and renamed; the manifest comes last and names the
build ID of its files, so an interrupted build never replaces a good index (old files are removed
only after the new manifest is in place).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

INDEX_FORMAT = "dcd-index/1"
FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
IVF_ABOVE = 50_000     # exact search costs N x D per query: at 50k x 128 about 1 ms on one core
NPROBE = 16            # IVF lists searched per query (recall vs speed: tools/benchmark_index.py)


class IndexError_(ValueError):
    """Bad input for an index (folder, student, captions): one line, exit 2."""


# ---------------------------------------------------------------------------------------- inputs

def image_files(folder: Path) -> list:
    """Every image file under `folder`, at any depth, in a stable order."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        files += [Path(root) / n for n in sorted(names) if n.lower().endswith(FOLDER_EXTENSIONS)]
    return files


def folder_batches(root: Path, files: list, image_size: int, batch_size: int,
                   skipped: Counter) -> Iterator[tuple]:
    """(uint8 [b, 3, S, S], [{"key", "path"}]) per batch of readable files (key: the path under
    `root`); the rest counted in `skipped` by reason."""
    from train.samples import SampleError, decode_image
    for start in range(0, len(files), batch_size):
        pixels, items = [], []
        for path in files[start:start + batch_size]:
            try:
                pixels.append(decode_image(path.read_bytes(), image_size))
            except SampleError as error:
                skipped[error.args[0]] += 1
                continue
            except OSError:
                skipped["unreadable_file"] += 1
                continue
            items.append({"key": path.relative_to(root).as_posix(), "path": str(path.resolve())})
        if items:
            yield torch.from_numpy(np.stack(pixels)), items


def shard_batches(shards: str, split: str, image_size: int, batch_size: int, skipped: Counter) -> Iterator[tuple]:
    """The same from a shard split, in manifest order; a path is `{shards}/{split}#key`."""
    from train.data import iterate_eval
    for batch in iterate_eval(shards, split, batch_size, image_size, skipped=skipped):
        yield batch["pixels"], [{"key": key, "path": f"{Path(shards).resolve()}/{split}#{key}"} for key in batch["keys"]]


def read_captions(path: Path) -> list:
    """Captions of a text file (one a line) or of a table's caption column."""
    if not path.is_file():
        raise IndexError_(f"--captions {path}: not found")
    if path.suffix.lower() in (".csv", ".tsv", ".tab", ".jsonl"):
        from tools.shard_sources import CAPTION_COLUMNS, InputError, pick_column, table_rows
        try:
            rows = list(table_rows(path))
            column = pick_column(rows[0].keys(), CAPTION_COLUMNS, path, "caption") if rows else None
        except InputError as error:
            raise IndexError_(str(error)) from None
        captions = [str(row.get(column) or "").strip() for row in rows]
    else:
        captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    captions = list(dict.fromkeys(c for c in captions if c))  # each caption once, in order
    if not captions:
        raise IndexError_(f"--captions {path}: no captions in it")
    return captions


# ---------------------------------------------------------------------------------------- embedding

class EmbeddingSpill:
    """Embeddings appended batch by batch to a memory-mapped .npy file (not held in memory)."""

    def __init__(self, path: Path, capacity: int):
        self.path, self.capacity, self.rows, self.array = path, capacity, 0, None

    def append(self, embeddings: np.ndarray) -> None:
        if self.array is None:
            self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32,
                                                   shape=(self.capacity, embeddings.shape[1]))
        self.array[self.rows:self.rows + len(embeddings)] = embeddings
        self.rows += len(embeddings)

    def view(self) -> np.ndarray:
        return self.array[:self.rows]

    def remove(self) -> None:
        self.array = None
        self.path.unlink(missing_ok=True)


@torch.no_grad()
def embed_batches(student, batches, spill: EmbeddingSpill, items_file) -> int:
    """Embeds each batch, appends it to the spill and its items to the open jsonl; returns the count."""
    for pixels, items in batches:
        embeddings = student.encode_image(student.preprocess_images(pixels))
        spill.append(embeddings.float().cpu().numpy())
        for item in items:
            items_file.write(json.dumps(item, ensure_ascii=False) + "\n")
    return spill.rows


@torch.no_grad()
def embed_captions(student, captions: list, batch_size: int) -> np.ndarray:
    chunks = []
    for start in range(0, len(captions), batch_size):
        tokens = student.tokenize(captions[start:start + batch_size])
        chunks.append(student.encode_text(tokens["input_ids"], tokens["attention_mask"]).float().cpu().numpy())
    return np.concatenate(chunks)


# ---------------------------------------------------------------------------------------- faiss

def faiss_index(vectors: np.ndarray, ivf_above: int, nlist: int | None, seed: int = 0, chunk: int = 65536):
    """(index, kind, nlist): exact inner product, or IVF with nlist lists (default 4 sqrt(N)) trained
    on a seeded sample of 40 per list when there are more than `ivf_above` vectors. Added in chunks."""
    import faiss
    count, dim = vectors.shape
    if count <= ivf_above:
        index, kind, nlist = faiss.IndexFlatIP(dim), "flat", None
    else:
        # 4 sqrt(N) lists, each trained on at least the 39 points k-means asks for (faiss warns below)
        nlist = nlist or max(1, min(int(4 * count ** 0.5), count // 39))
        index, kind = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT), "ivf"
        sample = np.random.default_rng(seed).choice(count, size=min(count, nlist * 40), replace=False)
        index.train(np.ascontiguousarray(vectors[np.sort(sample)]))
    for start in range(0, count, chunk):
        index.add(np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32))
    return index, kind, nlist


def write_faiss(index, path: Path) -> None:
    import faiss
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- build

def build(args) -> dict:
    """The whole build (module docstring); returns the manifest."""
    from train.evaluation import model_fingerprint
    from train.models.presets import load_student
    out = Path(args.out)
    student = load_student(args.student).eval()
    image_size = int(getattr(student, "image_size", 0) or args.image_size)
    captions = read_captions(Path(args.captions)) if args.captions else None
    skipped, build_id, started = Counter(), secrets.token_hex(4), time.perf_counter()
    if args.images:
        files = image_files(Path(args.images))
        if not files:
            raise IndexError_(f"--images {args.images}: no JPEG, PNG or WebP files in it")
        batches = folder_batches(Path(args.images), files, image_size, args.batch_size, skipped)
        capacity = len(files)
    else:
        from train.data import load_manifest
        capacity = sum(load_manifest(args.shards, args.split)["shard_counts"])
        batches = shard_batches(args.shards, args.split, image_size, args.batch_size, skipped)
    out.mkdir(parents=True, exist_ok=True)
    spill = EmbeddingSpill(out / f"embeddings-{build_id}.tmp.npy", capacity)
    files_written = {"images": f"images-{build_id}.faiss", "image_items": f"images-{build_id}.jsonl"}
    try:
        with open(out / (files_written["image_items"] + ".tmp"), "w", encoding="utf-8") as items_file:
            count = embed_batches(student, batches, spill, items_file)
        if count == 0:
            raise IndexError_(f"no readable image to index (skipped: {dict(skipped)})")
        index, kind, nlist = faiss_index(spill.view(), args.ivf_above, args.nlist)
        write_faiss(index, out / files_written["images"])
        os.replace(out / (files_written["image_items"] + ".tmp"), out / files_written["image_items"])
    finally:
        spill.remove()
        (out / (files_written["image_items"] + ".tmp")).unlink(missing_ok=True)
    if captions:
        files_written.update(write_caption_index(student, captions, out, build_id, args.batch_size))
    seconds = time.perf_counter() - started
    manifest = {"format": INDEX_FORMAT, "build": build_id, "student": str(Path(args.student).resolve()),
                "student_fingerprint": model_fingerprint(student), "image_size": image_size,
                "images": count, "skipped": dict(skipped), "captions": len(captions or []),
                "kind": kind, "nlist": nlist, "nprobe": NPROBE if kind == "ivf" else None,
                "dim": int(index.d), "files": files_written, "seconds": round(seconds, 2),
                "source": {"images": str(Path(args.images).resolve())} if args.images
                else {"shards": str(Path(args.shards).resolve()), "split": args.split}}
    write_json(out / "manifest.json", manifest)
    remove_old_builds(out, build_id)
    return manifest


def write_caption_index(student, captions: list, out: Path, build_id: str, batch_size: int) -> dict:
    index, _, _ = faiss_index(embed_captions(student, captions, batch_size), ivf_above=1 << 62, nlist=None)
    files = {"captions": f"captions-{build_id}.faiss", "caption_items": f"captions-{build_id}.jsonl"}
    write_faiss(index, out / files["captions"])
    tmp = out / (files["caption_items"] + ".tmp")
    tmp.write_text("".join(json.dumps({"key": str(i), "caption": c}, ensure_ascii=False) + "\n"
                           for i, c in enumerate(captions)), encoding="utf-8")
    os.replace(tmp, out / files["caption_items"])
    return files


def remove_old_builds(out: Path, build_id: str) -> None:
    """Files of earlier builds (the new manifest no longer names them)."""
    for path in out.iterdir():
        stem = path.name.split(".", 1)[0]
        if stem.rsplit("-", 1)[0] in ("images", "captions", "embeddings") and not stem.endswith(build_id):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help="a student folder saved by train/run.py")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of JPEG / PNG / WebP images, any depth")
    source.add_argument("--shards", help="folder written by tools/make_shards.py (with --split)")
    p.add_argument("--split", default="test", help="the shard split to index (with --shards)")
    p.add_argument("--out", required=True, help="index folder (created; an older index there is replaced)")
    p.add_argument("--captions", help="also index these captions (text file, one a line; or .csv/.tsv/.jsonl)")
    p.add_argument("--batch-size", type=int, default=64, help="images decoded and embedded at a time")
    p.add_argument("--ivf-above", type=int, default=IVF_ABOVE, help="an IVF index above this many images")
    p.add_argument("--nlist", type=int, help="IVF lists (default 4 x sqrt(images))")
    p.add_argument("--image-size", type=int, default=64, help="decode size when the student names none")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.images and not Path(args.images).is_dir():
            raise IndexError_(f"--images {args.images}: not a folder")
        manifest = build(args)
    except (ValueError, OSError) as error:  # IndexError_, ConfigError, DataError, a bad student
        print(f"index: error: {str(error).strip().splitlines()[0]}", file=sys.stderr, flush=True)
        return 2
    rate = manifest["images"] / max(manifest["seconds"], 1e-9)
    print(f"index: {manifest['images']} images ({manifest['kind']}), {manifest['captions']} captions, "
          f"skipped {manifest['skipped'] or 0}, {manifest['seconds']:.1f} s ({rate:.0f} images/s) -> {args.out}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
