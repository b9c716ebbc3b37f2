"""Search a saved index (tools/index.py) by text or by image, with the student that built it.

    python tools/search.py --index runs/mine/photos.index --text "a red disc" [--text ...] --top 5
    python tools/search.py --index runs/mine/photos.index --image query.jpg --top 5 [--against captions]
        [--png sheet.png] [--html sheet.html] [--student FOLDER]

The index is loaded, never rebuilt: only the query is embedded. The student is the one the manifest
names (or --student); its fingerprint must match the one the index was built with, else the scores
would compare embeddings of two different models. `--text` searches the images; `--image` searches
the images (similar pictures) or, with `--against captions`, the captions indexed with --captions.
Prints one JSON line per hit: {"query", "rank", "key", "path" (or "caption"), "score"} (score: cosine
similarity). --png / --html write contact sheets of the hits.
"""
from __future__ import annotations

import argparse
import html
import json
import sys
import tarfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from train.pictures import TILE, png_base64, stack, text_tile, to_pil

INDEX_FORMAT = "dcd-index/1"
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class SearchError(ValueError):
    """A missing or mismatched index, student or query file: one line, exit 2."""


# ---------------------------------------------------------------------------------------- the index

def read_manifest(index_dir: Path) -> dict:
    path = index_dir / "manifest.json"
    if not path.is_file():
        raise SearchError(f"{index_dir}: no manifest.json (build the index with tools/index.py)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != INDEX_FORMAT:
        raise SearchError(f"{path}: format {manifest.get('format')!r}, expected {INDEX_FORMAT!r}")
    return manifest


def load_part(index_dir: Path, manifest: dict, part: str):
    """(faiss index, items) of the 'images' or 'captions' part, checked against the manifest."""
    import faiss
    faiss.omp_set_num_threads(1)  # a few queries: a thread pool's wake-up costs more than the search
    files = manifest["files"]
    if part not in files:
        raise SearchError(f"{index_dir}: no {part} indexed (tools/index.py --captions FILE adds them)")
    index = faiss.read_index(str(index_dir / files[part]))
    if manifest.get("nprobe") and part == "images":
        index.nprobe = manifest["nprobe"]
    items_path = index_dir / files["image_items" if part == "images" else "caption_items"]
    items = [json.loads(line) for line in items_path.read_text(encoding="utf-8").splitlines()]
    if index.ntotal != len(items):
        raise SearchError(f"{index_dir}: {part} index holds {index.ntotal} vectors for {len(items)} items")
    return index, items


def load_checked_student(manifest: dict, spec: str | None):
    from train.evaluation import model_fingerprint
    from train.models.presets import load_student
    folder = spec or manifest["student"]
    student = load_student(folder).eval()
    if model_fingerprint(student) != manifest["student_fingerprint"]:
        raise SearchError(f"student {folder} is not the one the index was built with (fingerprint "
                          f"{manifest['student_fingerprint'][:12]}); rebuild it with tools/index.py")
    return student


# ---------------------------------------------------------------------------------------- queries

def read_picture(path: str, size: int) -> torch.Tensor:
    """uint8 [3, S, S] of an image file or a shard sample `{shards}/{split}#key`, decoded as
    training decodes (centre crop)."""
    from train.samples import decode_image
    if "#" in path and not Path(path).is_file():
        folder_split, key = path.rsplit("#", 1)
        folder, split = folder_split.rsplit("/", 1)
        return read_images_by_key(folder, split, [key], size)[key]
    return torch.from_numpy(decode_image(Path(path).read_bytes(), size))


@torch.no_grad()
def embed_queries(student, texts: Sequence[str], image: str | None, image_size: int) -> np.ndarray:
    if image is not None:
        pixels = read_picture(image, image_size)[None]
        return student.encode_image(student.preprocess_images(pixels)).float().numpy()
    tokens = student.tokenize(list(texts))
    return student.encode_text(tokens["input_ids"], tokens["attention_mask"]).float().numpy()


def search(index, items: list, queries: np.ndarray, labels: Sequence[str], top: int) -> List[dict]:
    """Hits of every query, best first: {query, rank, key, path | caption, score}."""
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(top, index.ntotal))
    hits = []
    for q, label in enumerate(labels):
        for rank, (row, score) in enumerate(zip(rows[q].tolist(), scores[q].tolist()), 1):
            if row >= 0:  # IVF pads with -1 when the probed lists hold fewer than `top`
                hits.append({"query": label, "rank": rank, **items[row], "score": round(float(score), 5)})
    return hits


# ---------------------------------------------------------------------------------------- pictures

def read_images_by_key(shards_dir, split: str, keys: Sequence[str], image_size: int) -> Dict[str, torch.Tensor]:
    """uint8 [3, S, S] pictures of the given sample keys, read from the split's tar shards with the
    data module's own decoder. Only the wanted members are decoded."""
    from train.data import load_manifest
    from train.samples import decode_image
    wanted, found = set(keys), {}
    for shard in load_manifest(shards_dir, split)["paths"]:
        with tarfile.open(shard) as archive:
            for member in archive:
                key, _, extension = member.name.rpartition(".")
                if key in wanted and key not in found and extension.lower() in SHARD_IMAGE_EXTENSIONS:
                    found[key] = torch.from_numpy(decode_image(archive.extractfile(member).read(), image_size))
        if len(found) == len(wanted):
            break
    missing = wanted - set(found)
    if missing:
        raise SearchError(f"images not found in {shards_dir}/{split}: {sorted(missing)[:5]}")
    return found


def hit_tile(hit: dict):
    label = [f"{hit['rank']}. {hit['score']:.3f}", hit.get("caption") or hit["key"]]
    if "path" not in hit:
        return text_tile(label, TILE, TILE + 40)
    return stack([to_pil(read_picture(hit["path"], TILE)), text_tile(label, TILE, 40)], horizontal=False, gap=0)


def query_tile(label: str, image: str | None):
    if image is not None:
        return stack([to_pil(read_picture(image, TILE)), text_tile(["query"], TILE, 40)], horizontal=False, gap=0)
    return text_tile(["query:", label], TILE, TILE + 40, background="#fff8dc")


def contact_sheet_png(hits: List[dict], labels: Sequence[str], image: str | None):
    rows = [stack([query_tile(label, image)] + [hit_tile(h) for h in hits if h["query"] == label], horizontal=True)
            for label in labels]
    return stack(rows, horizontal=False, gap=8)


def contact_sheet_html(hits: List[dict], labels: Sequence[str], image: str | None, title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             "<style>body{font-family:sans-serif} .row{display:flex;gap:8px;margin-bottom:18px}"
             " figure{margin:0;width:140px;font-size:11px} img{width:128px;height:128px}</style></head>"
             f"<body><h1>{html.escape(title)}</h1>"]
    for label in labels:
        parts.append(f"<h3>{html.escape(label)}</h3><div class='row'>")
        for hit in (h for h in hits if h["query"] == label):
            name = html.escape(hit.get("caption") or hit["key"])
            picture = (f"<img src='data:image/png;base64,{png_base64(to_pil(read_picture(hit['path'], TILE)))}'"
                       f" alt='{name}'>" if "path" in hit else "")
            parts.append(f"<figure>{picture}<figcaption><b>{hit['rank']}.</b> {name} "
                         f"({hit['score']:.3f})</figcaption></figure>")
        parts.append("</div>")
    return "\n".join(parts + ["</body></html>"])


# ---------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", required=True, help="index folder written by tools/index.py")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", action="append", help="a text query (repeatable)")
    query.add_argument("--image", help="an image file to search with")
    p.add_argument("--against", choices=("images", "captions"), default="images",
                   help="what --image searches (--text always searches the images)")
    p.add_argument("--top", type=int, default=5, help="hits per query")
    p.add_argument("--student", help="student folder (default: the one the manifest names)")
    p.add_argument("--png", help="write a PNG contact sheet")
    p.add_argument("--html", help="write an HTML contact sheet (images embedded)")
    args = p.parse_args(argv)
    if args.text is not None and args.against == "captions":
        p.error("--against captions takes an --image query")
    if args.top < 1:
        p.error("--top must be at least 1")
    return args


def run(args) -> List[dict]:
    index_dir = Path(args.index)
    manifest = read_manifest(index_dir)
    index, items = load_part(index_dir, manifest, args.against)
    student = load_checked_student(manifest, args.student)
    if args.image is not None and not Path(args.image).is_file():
        raise SearchError(f"--image {args.image}: not found")
    labels = args.text or [args.image]
    started = time.perf_counter()
    hits = search(index, items, embed_queries(student, labels, args.image, manifest["image_size"]), labels, args.top)
    print(f"search: {len(labels)} queries over {index.ntotal} {args.against} in "
          f"{(time.perf_counter() - started) * 1e3:.1f} ms", file=sys.stderr, flush=True)
    if args.png:
        contact_sheet_png(hits, labels, args.image).save(args.png)
    if args.html:
        Path(args.html).write_text(contact_sheet_html(hits, labels, args.image, f"search of {index_dir}"))
    return hits


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        hits = run(args)
    except (ValueError, OSError) as error:  # SearchError, an unreadable image, a bad student folder
        print(f"search: error: {str(error).strip().splitlines()[0]}", file=sys.stderr, flush=True)
        return 2
    for hit in hits:
        print(json.dumps(hit, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
