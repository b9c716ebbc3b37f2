"""Text-to-image search over a shard split with the student, optionally reranked by the teacher.

    python tools/search.py --shards shards/synthetic --split test --student runs/dcd/student \\
        --query "red circle left of blue square" [--query ...] [--queries-file FILE] [--top 5] \\
        [--index runs/search/test.index] [--faiss] [--rerank-teacher PATH --rerank-k 16] \\
        [--html sheet.html] [--png sheet.png] [--max-images N]

The index holds the student's image embeddings and each image's key and captions (no pixels, so it
scales to large galleries). It is saved to --index and reused while the student's weights are the
same, so repeated queries only embed the query text. Exact search is one matrix product; --faiss uses
a FAISS IndexFlatIP (also exact, inner product = cosine for these normalised embeddings), the base
to swap in an approximate index for galleries of millions. Images shown on the contact sheet (and
given to the teacher when reranking) are read back from the shards by key.

Also home of the small picture helpers (tiles, grids, base64 PNG) that tools/evaluate.py uses.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
import tarfile
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

INDEX_FORMAT = "dcd-search-index/1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TILE = 128  # pixels per image tile on contact sheets (small synthetic images are enlarged)

# ----------------------------------------------------------------------------------------------
# Picture helpers (also used by tools/evaluate.py)


def _font():
    return ImageFont.load_default()


def to_pil(pixels: torch.Tensor, size: int = TILE) -> Image.Image:
    """uint8 [3, H, W] -> RGB picture of size x size (nearest-neighbour: small scenes stay crisp)."""
    array = pixels.permute(1, 2, 0).cpu().numpy().astype(np.uint8)
    return Image.fromarray(array, "RGB").resize((size, size), Image.NEAREST)


def text_tile(lines: Sequence[str], width: int, height: int, colors: Optional[Sequence[str]] = None,
              background: str = "white") -> Image.Image:
    """Wrapped text lines on a tile; each line may have its own colour."""
    tile = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(tile)
    chars_per_line = max(8, width // 7)
    y = 3
    for index, line in enumerate(lines):
        color = colors[index] if colors else "black"
        for piece in textwrap.wrap(line, chars_per_line) or [""]:
            if y > height - 11:
                return tile
            draw.text((4, y), piece, fill=color, font=_font())
            y += 12
    return tile


def framed(picture: Image.Image, color: Optional[str], width: int = 4) -> Image.Image:
    """A coloured frame (green = correct, red = wrong) drawn inside the picture's edge."""
    if color is None:
        return picture
    picture = picture.copy()
    ImageDraw.Draw(picture).rectangle([0, 0, picture.width - 1, picture.height - 1], outline=color,
                                      width=width)
    return picture


def stack(pictures: Sequence[Image.Image], horizontal: bool, gap: int = 4) -> Image.Image:
    """Pictures side by side (or one under another) on a light grey background."""
    if horizontal:
        size = (sum(p.width for p in pictures) + gap * (len(pictures) - 1), max(p.height for p in pictures))
    else:
        size = (max(p.width for p in pictures), sum(p.height for p in pictures) + gap * (len(pictures) - 1))
    canvas = Image.new("RGB", size, (230, 230, 230))
    offset = 0
    for picture in pictures:
        canvas.paste(picture, (offset, 0) if horizontal else (0, offset))
        offset += (picture.width if horizontal else picture.height) + gap
    return canvas


def png_base64(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ----------------------------------------------------------------------------------------------
# Reading images back from the shards by key


def read_images_by_key(shards_dir, split: str, keys: Sequence[str], image_size: int) -> Dict[str, torch.Tensor]:
    """uint8 [3, S, S] pictures of the given sample keys, read from the split's tar shards with the
    data module's own decoder (same resize and crop as evaluation). Only the wanted members are
    decoded."""
    from train.data import load_manifest
    from train.samples import decode_image
    wanted, found = set(keys), {}
    for shard in load_manifest(shards_dir, split)["paths"]:
        with tarfile.open(shard) as archive:
            for member in archive:
                key, _, extension = member.name.rpartition(".")
                if key in wanted and key not in found and extension.lower() in IMAGE_EXTENSIONS:
                    data = archive.extractfile(member).read()
                    found[key] = torch.from_numpy(decode_image(data, image_size))
        if len(found) == len(wanted):
            break
    missing = wanted - set(found)
    if missing:
        raise KeyError(f"images not found in {shards_dir}/{split}: {sorted(missing)[:5]}")
    return found


# ----------------------------------------------------------------------------------------------
# The index


def build_index(student, shards_dir, split: str, image_size: int, max_images: Optional[int] = None,
                batch_size: int = 256) -> dict:
    from train.eval_split import read_eval_split
    from train.evaluation import embed_images, model_fingerprint
    gallery = read_eval_split(shards_dir, split, image_size=image_size, max_images=max_images,
                              batch_size=batch_size)
    return {"format": INDEX_FORMAT, "embeddings": embed_images(student, gallery.pixels, batch_size),
            "keys": gallery.keys, "captions": [gallery.captions_of(i) for i in range(gallery.num_images)],
            "image_ids": gallery.image_ids, "model_fingerprint": model_fingerprint(student),
            "data_fingerprint": gallery.fingerprint, "shards": str(shards_dir), "split": split,
            "image_size": image_size, "max_images": max_images}


def index_matches(index: dict, student, shards_dir, split: str, max_images: Optional[int]) -> bool:
    from train.evaluation import model_fingerprint
    return (index.get("format") == INDEX_FORMAT and index["split"] == split
            and Path(index["shards"]).resolve() == Path(shards_dir).resolve()
            and index["max_images"] == max_images
            and index["model_fingerprint"] == model_fingerprint(student))


def load_or_build_index(path, student, shards_dir, split, image_size, max_images, batch_size, log):
    if path is not None and Path(path).is_file():
        index = torch.load(path, map_location="cpu", weights_only=True)
        if index_matches(index, student, shards_dir, split, max_images):
            log(f"search: index {path} reused ({len(index['keys'])} images)")
            return index
        log(f"search: index {path} was built for another model or gallery: rebuilding it")
    started = time.perf_counter()
    index = build_index(student, shards_dir, split, image_size, max_images, batch_size)
    log(f"search: indexed {len(index['keys'])} images in {time.perf_counter() - started:.1f}s")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(index, path)
    return index


class ExactSearcher:
    """Top-n by one matrix product over the whole gallery."""

    def __init__(self, embeddings: torch.Tensor):
        self.embeddings = embeddings

    def search(self, queries: torch.Tensor, n: int):
        scores = queries @ self.embeddings.t()
        top = torch.topk(scores, min(n, scores.shape[1]), dim=1)
        return top.values, top.indices


class FaissSearcher:
    """FAISS IndexFlatIP: exact inner product; the swap-in point for an approximate index."""

    def __init__(self, embeddings: torch.Tensor):
        import faiss
        self.index = faiss.IndexFlatIP(embeddings.shape[1])
        self.index.add(np.ascontiguousarray(embeddings.numpy(), dtype=np.float32))

    def search(self, queries: torch.Tensor, n: int):
        scores, indices = self.index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32),
                                            min(n, self.index.ntotal))
        return torch.from_numpy(scores), torch.from_numpy(indices).long()


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
        return True
    except ImportError:
        return False


# ----------------------------------------------------------------------------------------------
# Queries


def search(queries: Sequence[str], student, index: dict, searcher, top: int, teacher=None,
           rerank_k: int = 16, shards_dir=None, batch_size: int = 256) -> List[dict]:
    """Each query's top images: [{query, results: [{rank, key, image_id, captions, student_score,
    teacher_score?}]}]. With a teacher, the student's top max(top, rerank_k) are reordered by it."""
    from train.eval_split import EvalSplit
    from train.evaluation import embed_texts, rerank_rows, teacher_pair_scores
    query_embeddings = embed_texts(student, list(queries), batch_size)
    depth = max(top, rerank_k) if teacher is not None else top
    student_top_scores, candidates = searcher.search(query_embeddings, depth)
    teacher_scores = None
    if teacher is not None:
        k = min(rerank_k, candidates.shape[1])
        keys = sorted({index["keys"][i] for i in candidates[:, :k].flatten().tolist()})
        pictures = read_images_by_key(shards_dir, index["split"], keys, index["image_size"])
        position = {key: i for i, key in enumerate(keys)}
        mini = EvalSplit(pixels=torch.stack([pictures[key] for key in keys]), captions=list(queries),
                         caption_image_index=torch.zeros(len(queries), dtype=torch.long),
                         image_ids=torch.arange(len(keys)), twin_index=torch.full((len(keys),), -1),
                         keys=keys, name="queries", fingerprint="queries")
        local_images = torch.tensor([[position[index["keys"][i]] for i in row[:k].tolist()]
                                     for row in candidates])
        pair_scores = teacher_pair_scores(teacher, mini, local_images.flatten(),
                                          torch.arange(len(queries)).repeat_interleave(k)).view(-1, k)
        reorder = rerank_rows(torch.arange(candidates.shape[1]).expand_as(candidates), pair_scores, k)
        candidates = candidates.gather(1, reorder)
        student_top_scores = student_top_scores.gather(1, reorder)
        teacher_scores = torch.full(candidates.shape, float("nan"))
        teacher_scores[:, :k] = pair_scores.gather(1, reorder[:, :k])
    answers = []
    for q, query in enumerate(queries):
        results = []
        for rank in range(min(top, candidates.shape[1])):
            image = int(candidates[q, rank])
            result = {"rank": rank + 1, "key": index["keys"][image],
                      "image_id": int(index["image_ids"][image]), "captions": index["captions"][image],
                      "student_score": round(float(student_top_scores[q, rank]), 5)}
            if teacher_scores is not None and not torch.isnan(teacher_scores[q, rank]):
                result["teacher_score"] = round(float(teacher_scores[q, rank]), 5)
            results.append(result)
        answers.append({"query": query, "results": results})
    return answers


def result_label(result: dict) -> List[str]:
    score = f"s={result['student_score']:.3f}"
    if "teacher_score" in result:
        score += f" t={result['teacher_score']:.2f}"
    caption = result["captions"][0] if result["captions"] else ""
    return [f"{result['rank']}. {result['key']} {score}", caption]


def contact_sheet_png(answers: List[dict], pictures: Dict[str, torch.Tensor]) -> Image.Image:
    rows = []
    for answer in answers:
        tiles = [text_tile(["query:", answer["query"]], TILE, TILE + 40, background="#fff8dc")]
        for result in answer["results"]:
            tiles.append(stack([to_pil(pictures[result["key"]]),
                                text_tile(result_label(result), TILE, 40)], horizontal=False, gap=0))
        rows.append(stack(tiles, horizontal=True))
    return stack(rows, horizontal=False, gap=8)


def contact_sheet_html(answers: List[dict], pictures: Dict[str, torch.Tensor], title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif} .row{display:flex;gap:8px;margin-bottom:18px}"
             " figure{margin:0;width:140px;font-size:11px} img{width:128px;height:128px;"
             "image-rendering:pixelated;border:1px solid #999}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for answer in answers:
        parts.append(f"<h3>{html.escape(answer['query'])}</h3><div class='row'>")
        for result in answer["results"]:
            source = png_base64(to_pil(pictures[result["key"]]))
            captions = "<br>".join(html.escape(c) for c in result["captions"])
            score = f"student {result['student_score']:.3f}"
            if "teacher_score" in result:
                score += f", teacher {result['teacher_score']:.3f}"
            parts.append(f"<figure><img src='data:image/png;base64,{source}' alt='{html.escape(result['key'])}'>"
                         f"<figcaption><b>{result['rank']}. {html.escape(result['key'])}</b> ({score})"
                         f"<br>{captions}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True, help="folder written by tools/make_shards.py")
    p.add_argument("--split", default="test")
    p.add_argument("--student", required=True, help="student folder or preset name")
    p.add_argument("--query", action="append", default=[], help="a text query (repeatable)")
    p.add_argument("--queries-file", help="one query per line")
    p.add_argument("--top", type=int, default=5, help="images returned per query")
    p.add_argument("--index", help="index file: loaded when it matches the student and gallery, "
                                   "else built and saved there")
    p.add_argument("--faiss", action="store_true", help="search with a FAISS IndexFlatIP")
    p.add_argument("--rerank-teacher", help="cross-encoder folder or preset that reorders the top-k")
    p.add_argument("--rerank-k", type=int, default=16)
    p.add_argument("--html", help="write an HTML contact sheet (images embedded)")
    p.add_argument("--png", help="write a PNG contact sheet")
    p.add_argument("--max-images", type=int, help="index only the first N images")
    p.add_argument("--image-size", type=int, help="pixel size of the shards' images "
                                                  "(default: the manifest's image_size)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seed for models built from preset names")
    return p.parse_args(argv)


def fail(message: str) -> int:
    print(f"search: {message}", file=sys.stderr)
    return 2


def read_queries(args) -> List[str]:
    queries = list(args.query)
    if args.queries_file:
        queries += [line.strip() for line in Path(args.queries_file).read_text().splitlines() if line.strip()]
    return queries


def main(argv=None) -> int:
    args = parse_args(argv)
    from train.eval_split import read_manifest
    from train.models.presets import build_student, build_teacher

    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731 (stdout = results)
    try:
        queries = read_queries(args)
        if not queries:
            return fail("give at least one --query or a --queries-file")
        if args.faiss and not faiss_available():
            return fail("--faiss needs the faiss package (pip install faiss-cpu); "
                        "without --faiss the exact matrix-product search is used")
        manifest = read_manifest(args.shards, args.split)
        # preset specs build untrained models: a fixed seed gives every run the same weights
        torch.manual_seed(args.seed)
        tokenizer_dir = Path(args.shards) / "tokenizer"
        tokenizer_dir = str(tokenizer_dir) if tokenizer_dir.is_dir() else None
        student = build_student(args.student, tokenizer_dir)
        teacher = build_teacher(args.rerank_teacher, tokenizer_dir) if args.rerank_teacher else None
    except (OSError, ValueError) as error:
        return fail(str(error).splitlines()[0])
    image_size = args.image_size or manifest.get("image_size") or getattr(student, "image_size", None)
    if not image_size:
        return fail("the manifest names no image_size: pass --image-size")
    index = load_or_build_index(args.index, student, args.shards, args.split, int(image_size),
                                args.max_images, args.batch_size, log)
    searcher = FaissSearcher(index["embeddings"]) if args.faiss else ExactSearcher(index["embeddings"])
    started = time.perf_counter()
    answers = search(queries, student, index, searcher, args.top, teacher, args.rerank_k, args.shards,
                     args.batch_size)
    seconds = time.perf_counter() - started
    for answer in answers:
        print(f"\nquery: {answer['query']}")
        for result in answer["results"]:
            print("  " + " | ".join(result_label(result)))
    if args.html or args.png:
        keys = sorted({r["key"] for a in answers for r in a["results"]})
        pictures = read_images_by_key(args.shards, args.split, keys, int(image_size))
        title = f"{args.split} search with {args.student}" + (f", reranked by {args.rerank_teacher}"
                                                             if teacher is not None else "")
        if args.html:
            Path(args.html).write_text(contact_sheet_html(answers, pictures, title))
            log(f"search: wrote {args.html}")
        if args.png:
            contact_sheet_png(answers, pictures).save(args.png)
            log(f"search: wrote {args.png}")
    print(json.dumps({"queries": answers, "images": len(index["keys"]), "seconds": round(seconds, 4),
                      "searcher": "faiss-flat-ip" if args.faiss else "exact",
                      "reranked_by": args.rerank_teacher}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
