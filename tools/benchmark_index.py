"""Deployment numbers of tools/index.py and tools/search.py: what a saved FAISS index costs.

    python tools/benchmark_index.py [--photos 300] [--sizes 10000,100000] [--student FOLDER]

1. Index build throughput: a folder of `--photos` generated non-square JPEGs (96 x 64) indexed with
   the student (decode, crop, embed, add), images/s end to end.
2. Per gallery size (synthetic unit vectors of the student's width, clustered as real embeddings
   are): index bytes, exact (IndexFlatIP) vs IVF (IndexIVFFlat, nlist 4 sqrt(N), nprobe 16) build
   seconds, one-query latency (median of 200 single queries), and IVF recall@10 against exact.
Prints one JSON line per measurement.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tools import index as index_tool

QUERIES = 200


def write_photos(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg")


def build_throughput(student: str, photos: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        write_photos(Path(tmp) / "photos", photos)
        args = index_tool.parse_args(["--student", student, "--images", f"{tmp}/photos", "--out", f"{tmp}/index"])
        started = time.perf_counter()
        manifest = index_tool.build(args)
        seconds = time.perf_counter() - started
        size = sum(p.stat().st_size for p in Path(f"{tmp}/index").iterdir())
    return {"measure": "index_build", "images": manifest["images"], "seconds": round(seconds, 2),
            "images_per_s": round(manifest["images"] / seconds, 1), "index_bytes": size,
            "torch_threads": torch.get_num_threads()}


def clustered_vectors(count: int, dim: int, rng, clusters: int = 256) -> np.ndarray:
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, count)] + 0.5 * rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def query_latency_ms(index, queries: np.ndarray) -> float:
    """One query at a time, as tools/search.py asks them (one OpenMP thread: a pool's wake-up costs
    more than a single query's work, and tens of ms on a busy machine)."""
    import faiss
    faiss.omp_set_num_threads(1)
    times = []
    for q in queries:
        started = time.perf_counter()
        index.search(q[None], 10)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e3)


def gallery_numbers(count: int, dim: int, seed: int = 0) -> list:
    import faiss
    rng = np.random.default_rng(seed)
    vectors = clustered_vectors(count, dim, rng)
    queries = clustered_vectors(QUERIES, dim, rng)
    rows, found = [], {}
    for kind, ivf_above in (("flat", count), ("ivf", 0)):
        started = time.perf_counter()
        index, _, nlist = index_tool.faiss_index(vectors, ivf_above=ivf_above, nlist=None)
        build_s = time.perf_counter() - started
        if kind == "ivf":
            index.nprobe = index_tool.NPROBE
        found[kind] = index.search(queries, 10)[1]
        rows.append({"measure": "gallery", "images": count, "kind": kind, "nlist": nlist, "dim": dim,
                     "index_bytes": int(faiss.serialize_index(index).size), "build_s": round(build_s, 3),
                     "query_ms_1_thread": round(query_latency_ms(index, queries), 3)})
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found["flat"], found["ivf"])])
    rows[-1]["recall_at_10_vs_exact"] = round(float(recall), 4)
    return rows


def default_student(folder: Path, tokenizer: str) -> str:
    from train.models.presets import build_student
    torch.manual_seed(0)
    build_student("student-tiny", tokenizer_dir=tokenizer).save_pretrained(folder)
    return str(folder)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=300, help="generated photos to index for the build rate")
    p.add_argument("--sizes", default="10000,100000", help="synthetic gallery sizes")
    p.add_argument("--student", help="student folder (default: an untrained student-tiny)")
    p.add_argument("--tokenizer", default="shards/synthetic/tokenizer", help="for the default student")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        student = args.student or default_student(Path(tmp) / "student", args.tokenizer)
        print(json.dumps(build_throughput(student, args.photos)), flush=True)
        from train.models.presets import load_student
        dim = int(load_student(student).encode_text(**load_student(student).tokenize(["x"])).shape[1])
    for count in (int(s) for s in args.sizes.split(",")):
        for row in gallery_numbers(count, dim):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
