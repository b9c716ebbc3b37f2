"""Evaluate retrieval on a shard split: the student, the teacher (every pair), or retrieve-then-rerank.

    python tools/evaluate.py --shards shards/synthetic --split test --student runs/dcd/student \\
        [--teacher PATH] --mode student|teacher|rerank [--rerank-k 16] [--max-images N] \\
        [--tensorboard DIR] [--batch-size 256] [--cache-dir DIR]

Prints a table, then as its LAST line one JSON object: mode, images, captions, tr_r1 ... ir_r10, rsum,
seconds (the ranking itself: encoding/scoring and metrics, not loading), binding_acc where the split's
samples name twins, max_images_note when a subset gallery was used, and a few extras (see README of
the report: load_seconds, binding_seconds, rerank_k, teacher_pairs, student_* and teacher_binding_acc).

Several ranks (teacher and rerank modes split the teacher's work):
    torchrun --nproc_per_node 2 tools/evaluate.py ... --mode teacher
    deepspeed --num_gpus 2 tools/evaluate.py ... --mode teacher
The device and the collective backend come from DeepSpeed's accelerator (cpu/gloo here, cuda/nccl
on GPU machines); only rank 0 prints.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from train import comm
from train.engine import device as accelerator_device
from train.eval_split import EvalSplit, read_eval_split, read_manifest
from train.evaluation import (embed_split, ranked_top, rerank, student_scores, teacher_all_pairs,
                              teacher_binding_scores)
from train.metrics import (binding_accuracy, binding_accuracy_from_scores, format_table,
                           retrieval_metrics, twin_pairs)

MODES = ("student", "teacher", "rerank")
PREVIEW_QUERIES = 4  # queries shown per direction on the TensorBoard picture grid
PREVIEW_TOP = 5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True, help="folder written by tools/make_shards.py")
    p.add_argument("--split", default="test")
    p.add_argument("--student", help="student folder or preset (student and rerank modes)")
    p.add_argument("--teacher", help="teacher folder or preset (teacher and rerank modes; in student "
                                     "mode it adds the teacher's binding accuracy)")
    p.add_argument("--mode", choices=MODES, default="student")
    p.add_argument("--rerank-k", type=int, default=16, help="student candidates per query the teacher "
                                                            "reorders")
    p.add_argument("--max-images", type=int, help="evaluate the first N images with their own captions")
    p.add_argument("--tensorboard", help="write metrics and a picture grid of a few queries here")
    p.add_argument("--batch-size", type=int, default=256, help="student encoding batch")
    p.add_argument("--cache-dir", help="cache student embeddings here (keyed by split and weights)")
    p.add_argument("--image-size", type=int, help="pixel size the shards are read at "
                                                  "(default: the manifest's image_size)")
    p.add_argument("--images-per-chunk", type=int, default=4, help="teacher all-pairs grid: images")
    p.add_argument("--captions-per-chunk", type=int, default=64, help="teacher all-pairs grid: captions")
    p.add_argument("--pairs-per-call", type=int, default=256, help="teacher pairs per call (rerank)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json-out", help="also write the result JSON to this file (atomically)")
    p.add_argument("--seed", type=int, default=0, help="seed for models built from preset names")
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def fail(message: str) -> int:
    print(f"evaluate: {message}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------------------------
# Ranks and devices


def setup_distributed():
    """(rank, world_size, device). With WORLD_SIZE > 1 (torchrun, deepspeed) the process group is
    started from the environment with the accelerator's backend (gloo on CPU, nccl on CUDA)."""
    rank, world_size = comm.init(bounded_timeout=False)
    return rank, world_size, accelerator_device()


# ----------------------------------------------------------------------------------------------
# The three modes


def subset_note(split: EvalSplit, total_images: int) -> str | None:
    if split.num_images >= total_images:
        return None
    return (f"subset gallery: the first {split.num_images} of {total_images} images with their own "
            f"{split.num_captions} captions; recall on a smaller gallery is higher than on the full split")


def evaluate(args, split: EvalSplit, student, teacher, rank: int, world_size: int):
    """Run the chosen mode: (result fields, ranked captions per image, ranked images per caption)."""
    progress = not args.no_progress
    result = {}
    started = time.perf_counter()
    if args.mode == "teacher":
        scores = teacher_all_pairs(teacher, split, args.images_per_chunk, args.captions_per_chunk,
                                   rank, world_size, progress)
        result.update(retrieval_metrics(scores, split.caption_image_index))
        result["seconds"] = time.perf_counter() - started
        result["teacher_pairs"] = split.num_images * split.num_captions
        result["binding_acc"] = binding_accuracy_from_scores(scores, split.caption_image_index,
                                                             split.twin_index)
        return result, ranked_top(scores, PREVIEW_TOP), ranked_top(scores.t(), PREVIEW_TOP)

    embeddings = embed_split(student, split, args.batch_size, args.cache_dir)
    scores = student_scores(embeddings)
    result["embeddings_cached"] = embeddings.from_cache
    if args.mode == "student":
        result.update(retrieval_metrics(scores, split.caption_image_index))
        result["seconds"] = time.perf_counter() - started
        by_image, by_caption = ranked_top(scores, PREVIEW_TOP), ranked_top(scores.t(), PREVIEW_TOP)
    else:
        reranked = rerank(scores, teacher, split, args.rerank_k, args.pairs_per_call, rank, world_size,
                          progress)
        result.update(reranked.metrics)
        result["seconds"] = time.perf_counter() - started
        result.update(rerank_k=args.rerank_k, teacher_pairs=reranked.teacher_pairs)
        result.update({f"student_{key}": value for key, value in
                       retrieval_metrics(scores, split.caption_image_index).items()})
        by_image, by_caption = reranked.ranked_captions_per_image, reranked.ranked_images_per_caption
    student_binding = binding_accuracy_from_scores(scores, split.caption_image_index, split.twin_index)
    if teacher is not None and split.has_twins:
        # 2 teacher pairs per caption: cheap, so reported whenever a teacher is given
        binding_started = time.perf_counter()
        teacher_binding = binding_accuracy(*teacher_binding_scores(
            teacher, split, pairs_per_call=args.pairs_per_call, rank=rank, world_size=world_size))
        result["binding_seconds"] = time.perf_counter() - binding_started
        result["teacher_binding_acc"] = teacher_binding
    if args.mode == "student":
        result["binding_acc"] = student_binding
    else:  # rerank: the teacher has the last word on every top-k pair, twins included
        result["binding_acc"] = result.get("teacher_binding_acc")
        result["student_binding_acc"] = student_binding
    return result, by_image[:, :PREVIEW_TOP], by_caption[:, :PREVIEW_TOP]


# ----------------------------------------------------------------------------------------------
# Reporting


def human_report(result: dict, args) -> str:
    lines = [f"evaluate: {args.split} split of {args.shards}: {result['images']} images x "
             f"{result['captions']} captions, mode {result['mode']}"
             + (f" (k={result['rerank_k']})" if result["mode"] == "rerank" else "")
             + (f", {result['world_size']} ranks" if result["world_size"] > 1 else "")]
    if result.get("max_images_note"):
        lines.append("NOTE: " + result["max_images_note"])
    rows = {}
    if result["mode"] == "rerank":
        rows["student"] = {key.removeprefix("student_"): value for key, value in result.items()
                           if key.startswith("student_")}
    rows[result["mode"]] = result
    lines.append(format_table(rows))
    for name, key in (("binding accuracy", "binding_acc"), ("student binding accuracy", "student_binding_acc"),
                      ("teacher binding accuracy", "teacher_binding_acc")):
        if result.get(key) is not None:
            lines.append(f"{name} (own image above its twin): {result[key]:.2f}% "
                         f"of {result['binding_captions']} captions")
    lines.append(f"seconds: {result['seconds']:.2f} (loading {result['load_seconds']:.2f})")
    return "\n".join(lines)


def preview_grids(split: EvalSplit, by_image: torch.Tensor, by_caption: torch.Tensor):
    """Two pictures: caption queries with their top images (green frame = the caption's own image),
    and image queries with their top captions written under the image (green = its own caption)."""
    from train.pictures import TILE, framed, stack, text_tile, to_pil
    picks = lambda count: sorted({int(i) for i in torch.linspace(0, count - 1, PREVIEW_QUERIES)})  # noqa
    caption_rows = []
    for t in picks(split.num_captions):
        own = int(split.caption_image_index[t])
        tiles = [text_tile([f"caption {t}:", split.captions[t]], TILE, TILE, background="#fff8dc")]
        tiles += [framed(to_pil(split.pixels[i]), "green" if i == own else "red")
                  for i in by_caption[t].tolist()]
        caption_rows.append(stack(tiles, horizontal=True))
    image_columns = []
    for i in picks(split.num_images):
        ranked = by_image[i].tolist()
        colors = ["green" if int(split.caption_image_index[t]) == i else "red" for t in ranked]
        lines = [f"{r + 1}. {split.captions[t]}" for r, t in enumerate(ranked)]
        image_columns.append(stack([to_pil(split.pixels[i], 2 * TILE),
                                    text_tile(lines, 2 * TILE, 160, colors)], horizontal=False, gap=0))
    return stack(caption_rows, horizontal=False), stack(image_columns, horizontal=True)


def write_tensorboard(folder, result: dict, split: EvalSplit, by_image, by_caption) -> None:
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(folder)
    mode = result["mode"]
    for key in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum", "binding_acc", "seconds"):
        if result.get(key) is not None:
            writer.add_scalar(f"eval_{mode}/{key}", result[key], 0)
    caption_grid, image_grid = preview_grids(split, by_image, by_caption)
    writer.add_image(f"eval_{mode}/caption_queries_top{PREVIEW_TOP}", np.asarray(caption_grid), 0,
                     dataformats="HWC")
    writer.add_image(f"eval_{mode}/image_queries_top{PREVIEW_TOP}", np.asarray(image_grid), 0,
                     dataformats="HWC")
    writer.add_text(f"eval_{mode}/result", json.dumps(result), 0)
    writer.close()


def rounded(result: dict) -> dict:
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in result.items()}


# ----------------------------------------------------------------------------------------------
# Entry


def load_inputs(args, device):
    """(split, manifest, student or None, teacher or None); raises OSError / ValueError on bad input."""
    from train.models.presets import build_student, build_teacher
    # preset specs build untrained models: a fixed seed gives every rank (and every run) the same weights
    torch.manual_seed(args.seed)
    if not Path(args.shards).is_dir():
        raise FileNotFoundError(f"no shards folder {args.shards}")
    manifest = read_manifest(args.shards, args.split)
    if args.mode in ("student", "rerank") and not args.student:
        raise ValueError(f"--mode {args.mode} needs --student")
    if args.mode in ("teacher", "rerank") and not args.teacher:
        raise ValueError(f"--mode {args.mode} needs --teacher")
    tokenizer_dir = Path(args.shards) / "tokenizer"
    tokenizer_dir = str(tokenizer_dir) if tokenizer_dir.is_dir() else None
    student = build_student(args.student, tokenizer_dir).to(device) if args.student and \
        args.mode != "teacher" else None
    teacher = build_teacher(args.teacher, tokenizer_dir).to(device) if args.teacher else None
    model_size = getattr(student or teacher, "image_size", None)
    image_size = args.image_size or manifest.get("image_size") or model_size
    if not image_size:
        raise ValueError("the manifest names no image_size: pass --image-size")
    split = read_eval_split(args.shards, args.split, image_size=int(image_size),
                            max_images=args.max_images, batch_size=args.batch_size)
    return split, manifest, student, teacher


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world_size, device = setup_distributed()
    try:
        started = time.perf_counter()
        try:
            split, manifest, student, teacher = load_inputs(args, device)
        except (OSError, ValueError, KeyError) as error:
            return fail(str(error).strip().splitlines()[0] if str(error).strip() else repr(error))
        load_seconds = time.perf_counter() - started
        fields, by_image, by_caption = evaluate(args, split, student, teacher, rank, world_size)
        if rank != 0:
            return 0
        result = {"mode": args.mode, "images": split.num_images, "captions": split.num_captions,
                  **fields, "load_seconds": load_seconds, "world_size": world_size,
                  "device": str(device), "split": args.split, "shards": args.shards}
        if fields.get("binding_acc") is None and not split.has_twins:
            result.pop("binding_acc", None)  # the split's samples name no twins
        if split.has_twins:
            result["binding_captions"] = len(twin_pairs(split.caption_image_index, split.twin_index)[0])
        note = subset_note(split, int(manifest.get("num_samples", split.num_images)))
        if note:
            result["max_images_note"] = note
        result = rounded(result)
        print(human_report(result, args))
        if args.tensorboard:
            write_tensorboard(args.tensorboard, result, split, by_image, by_caption)
            print(f"tensorboard: metrics and picture grids written to {args.tensorboard}")
        if args.json_out:
            out = Path(args.json_out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            os.replace(tmp, out)
        print(json.dumps(result), flush=True)
        return 0
    finally:
        comm.shutdown()


if __name__ == "__main__":
    sys.exit(main())
