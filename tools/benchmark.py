"""Speed benchmarks: retrieval (teacher vs student vs rerank), training steps, tokenizers.

    python tools/benchmark.py retrieval --student PATH --teacher PATH --images 100,300,1000 \\
        [--captions-per-image 5] [--shards shards/synthetic --split test] [--teacher-budget-s 120] \\
        [--rerank-k 16] [--out runs/benchmark]
    python tools/benchmark.py train        (per-step time of --stage distill vs --stage student, loader:
                                            tools/benchmark_train.py)
    python tools/benchmark.py tokenizer    (WordPiece vs SentencePiece on the shards' captions:
                                            tools/benchmark_tokenizer.py)

Retrieval: for each gallery size (the first N images of the split with up to --captions-per-image
captions each), in one run on one machine, the time to rank every caption for every image and every
image for every caption (top 10 each way) with
- teacher: the cross-encoder on all N x T pairs. When the projected time exceeds --teacher-budget-s,
  a subset of image rows against all T captions is timed and the time is scaled linearly in pairs;
  the figure is then labelled "extrapolated": true (the subset's size and time are recorded);
- student: encode images and captions, one matrix product, top-k;
- student_cached: matrix product and top-k only (embeddings already cached);
- rerank: student (encoding included), then the teacher reorders each query's top-k;
plus per-query latency (amortised over the N + T queries, and one caption query measured alone) and
the speed-ups over the teacher. Writes {out}/retrieval.json (every field) and {out}/retrieval.png
(log-log, time vs gallery size, one line per method); prints a table and, last, a JSON summary line.
Every returned tensor is moved to the CPU, which also synchronises an accelerator before the clock
is read.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from tools import benchmark_tokenizer, benchmark_train
from train.eval_split import EvalSplit, read_eval_split
from train.evaluation import (embed_images, embed_split, embed_texts, rerank, student_scores,
                              teacher_all_pairs, teacher_pair_scores)
from train.metrics import RECALL_KS, retrieval_metrics

TOP_K = max(RECALL_KS)  # depth each query's ranking is computed to
METHODS = ("teacher", "student", "student_cached", "rerank")
# Every field a size entry of retrieval.json carries (tests/test_benchmark.py checks them).
SIZE_FIELDS = {
    "": ("images", "captions", "pairs", "teacher", "student", "student_cached", "rerank", "speedup",
         "rerank_rsum_vs_teacher"),
    "teacher": ("seconds", "extrapolated", "measured_images", "measured_pairs", "measured_seconds",
                "pairs_per_s", "per_query_ms", "single_query_ms", "rsum"),
    "student": ("seconds", "encode_seconds", "rank_seconds", "per_query_ms", "single_query_ms", "rsum"),
    "student_cached": ("seconds", "per_query_ms"),
    "rerank": ("seconds", "k", "teacher_pairs", "per_query_ms", "single_query_ms", "rsum"),
    "speedup": ("student", "student_cached", "rerank", "student_single_query", "rerank_single_query"),
}
TOP_FIELDS = ("benchmark", "student", "teacher", "shards", "split", "captions_per_image", "rerank_k",
              "teacher_budget_s", "device", "threads", "cpu_count", "torch", "platform", "sizes")


# ----------------------------------------------------------------------------------------------
# Timed pieces


def timed(function: Callable, repeats: int = 1):
    """(result of the last call, median seconds over `repeats` calls)."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - started)
    return result, statistics.median(seconds)


def rank_both_ways(scores: torch.Tensor, depth: int = TOP_K):
    """What a retrieval answer needs: every image's top captions and every caption's top images."""
    by_image = torch.topk(scores, min(depth, scores.shape[1]), dim=1).indices
    by_caption = torch.topk(scores.t(), min(depth, scores.shape[0]), dim=1).indices
    return by_image, by_caption


def image_rows(split: EvalSplit, count: int) -> EvalSplit:
    """The first `count` images against ALL of the split's captions: a slice of the teacher's
    all-pairs rows, used to time a subset that is extrapolated linearly in pairs."""
    return dataclasses.replace(split, pixels=split.pixels[:count], image_ids=split.image_ids[:count],
                               twin_index=split.twin_index[:count], keys=split.keys[:count],
                               fingerprint="rows")


def one_caption(split: EvalSplit, caption: int = 0) -> EvalSplit:
    """The whole image gallery against a single caption query."""
    return dataclasses.replace(split, captions=[split.captions[caption]],
                               caption_image_index=split.caption_image_index[caption:caption + 1],
                               fingerprint="one-caption")


def ms_per_query(seconds: float, split: EvalSplit) -> float:
    return 1000.0 * seconds / (split.num_images + split.num_captions)


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# ----------------------------------------------------------------------------------------------
# One gallery size


def time_student(student, split: EvalSplit, batch_size: int, repeats: int) -> tuple:
    """(student fields, student_cached fields, embeddings, scores, single-query seconds)."""
    def encode():
        return embed_split(student, split, batch_size)

    # the median of `repeats` encodes, like every short timing here: the first call alone also
    # pays one-off allocator and kernel warm-up (~0.2 s of ~1 s at 1,000 x 5,000)
    embeddings, encode_seconds = timed(encode, repeats)
    scores = student_scores(embeddings)
    _, rank_seconds = timed(lambda: rank_both_ways(student_scores(embeddings)), repeats)
    single_caption = split.captions[0]
    _, single_seconds = timed(lambda: torch.topk(
        embed_texts(student, [single_caption]) @ embeddings.images.t(),
        min(TOP_K, split.num_images)), repeats)
    seconds = encode_seconds + rank_seconds
    fields = {"seconds": seconds, "encode_seconds": encode_seconds, "rank_seconds": rank_seconds,
               "per_query_ms": ms_per_query(seconds, split), "single_query_ms": 1000.0 * single_seconds,
               "rsum": retrieval_metrics(scores, split.caption_image_index)["rsum"]}
    cached = {"seconds": rank_seconds, "per_query_ms": ms_per_query(rank_seconds, split)}
    return fields, cached, embeddings, scores, single_seconds


def time_teacher(teacher, split: EvalSplit, budget_s: Optional[float], seconds_per_pair: Optional[float],
                 progress: bool, log: Callable) -> dict:
    """All pairs, measured in full when the projection fits the budget, else a subset of image rows
    timed and scaled linearly in pairs. `seconds_per_pair` is the running estimate (None at first:
    then one image row is timed to make one)."""
    pairs = split.num_images * split.num_captions
    if budget_s is not None and seconds_per_pair is None:
        _, probe_seconds = timed(lambda: teacher_all_pairs(teacher, image_rows(split, 1), progress=False))
        seconds_per_pair = probe_seconds / split.num_captions
    projected = None if seconds_per_pair is None else seconds_per_pair * pairs
    if budget_s is None or projected <= budget_s:
        scores, seconds = timed(lambda: teacher_all_pairs(teacher, split, progress=progress))
        measured_images, measured_seconds, rsum = split.num_images, seconds, \
            retrieval_metrics(scores, split.caption_image_index)["rsum"]
        extrapolated = False
    else:
        measured_images = max(1, min(split.num_images, int(budget_s / (seconds_per_pair * split.num_captions))))
        log(f"benchmark: teacher all pairs at {split.num_images} images projected {projected:.1f}s > budget "
            f"{budget_s:.1f}s: timing {measured_images} image rows x {split.num_captions} captions")
        _, measured_seconds = timed(lambda: teacher_all_pairs(teacher, image_rows(split, measured_images),
                                                              progress=progress))
        seconds = measured_seconds * split.num_images / measured_images
        rsum, extrapolated = None, True
    measured_pairs = measured_images * split.num_captions
    _, single_seconds = timed(lambda: teacher_all_pairs(teacher, one_caption(split), progress=False))
    return {"seconds": seconds, "extrapolated": extrapolated, "measured_images": measured_images,
            "measured_pairs": measured_pairs, "measured_seconds": measured_seconds,
            "pairs_per_s": measured_pairs / measured_seconds, "per_query_ms": ms_per_query(seconds, split),
            "single_query_ms": 1000.0 * single_seconds, "rsum": rsum}


def time_rerank(student, teacher, split: EvalSplit, k: int, batch_size: int, student_single_s: float,
                repeats: int) -> dict:
    def encode_rank_rerank():
        scores = student_scores(embed_split(student, split, batch_size))
        return rerank(scores, teacher, split, k)

    result, seconds = timed(encode_rank_rerank)
    # one caption query: the student's single-query time plus the teacher on its k candidates
    k_single = min(k, split.num_images)
    _, teacher_single = timed(lambda: teacher_pair_scores(
        teacher, split, torch.arange(k_single), torch.zeros(k_single, dtype=torch.long)), repeats)
    return {"seconds": seconds, "k": k, "teacher_pairs": result.teacher_pairs,
            "per_query_ms": ms_per_query(seconds, split),
            "single_query_ms": 1000.0 * (student_single_s + teacher_single), "rsum": result.metrics["rsum"]}


def benchmark_size(student, teacher, split: EvalSplit, rerank_k: int, budget_s: Optional[float],
                   seconds_per_pair: Optional[float], batch_size: int = 256, repeats: int = 3,
                   progress: bool = False, log: Callable = print) -> dict:
    student_fields, cached, _, _, student_single_s = time_student(student, split, batch_size, repeats)
    rerank_fields = time_rerank(student, teacher, split, rerank_k, batch_size, student_single_s, repeats)
    teacher_fields = time_teacher(teacher, split, budget_s, seconds_per_pair, progress, log)
    speedup = {"student": ratio(teacher_fields["seconds"], student_fields["seconds"]),
               "student_cached": ratio(teacher_fields["seconds"], cached["seconds"]),
               "rerank": ratio(teacher_fields["seconds"], rerank_fields["seconds"]),
               "student_single_query": ratio(teacher_fields["single_query_ms"],
                                             student_fields["single_query_ms"]),
               "rerank_single_query": ratio(teacher_fields["single_query_ms"],
                                            rerank_fields["single_query_ms"])}
    return {"images": split.num_images, "captions": split.num_captions,
            "pairs": split.num_images * split.num_captions, "teacher": teacher_fields,
            "student": student_fields, "student_cached": cached, "rerank": rerank_fields,
            "speedup": speedup,
            "rerank_rsum_vs_teacher": ratio(rerank_fields["rsum"], teacher_fields["rsum"])}


def benchmark_retrieval(student, teacher, split: EvalSplit, sizes: Sequence[int],
                        captions_per_image: Optional[int], rerank_k: int = 16,
                        teacher_budget_s: Optional[float] = None, batch_size: int = 256,
                        repeats: int = 3, progress: bool = False, log: Callable = print) -> List[dict]:
    """One entry per gallery size, smallest first (SIZE_FIELDS lists the fields)."""
    # warm-up: first calls pay for allocator growth and lazy initialisation, not for retrieval
    warm = split.subset(2, captions_per_image)
    embed_images(student, warm.pixels)
    teacher_all_pairs(teacher, warm, progress=False)
    entries, seconds_per_pair = [], None
    for size in sorted(sizes):
        gallery = split.subset(size, captions_per_image)
        entry = benchmark_size(student, teacher, gallery, rerank_k, teacher_budget_s, seconds_per_pair,
                               batch_size, repeats, progress, log)
        # the running estimate of the teacher's cost per pair projects the next, larger size
        seconds_per_pair = entry["teacher"]["measured_seconds"] / entry["teacher"]["measured_pairs"]
        entries.append(entry)
        log(summary_line(entry))
    return entries


# ----------------------------------------------------------------------------------------------
# Reporting


def summary_line(entry: dict) -> str:
    teacher = entry["teacher"]
    label = " (extrapolated)" if teacher["extrapolated"] else ""
    return (f"{entry['images']:>6} x {entry['captions']:<6} teacher {teacher['seconds']:10.2f}s{label}  "
            f"student {entry['student']['seconds']:8.3f}s  cached {entry['student_cached']['seconds']:8.4f}s  "
            f"rerank {entry['rerank']['seconds']:8.2f}s  speed-up student x{entry['speedup']['student']:.0f}, "
            f"rerank x{entry['speedup']['rerank']:.1f}")


def human_table(entries: List[dict]) -> str:
    header = (f"{'images':>7} {'captions':>8} {'teacher s':>12} {'student s':>10} {'cached s':>9} "
              f"{'rerank s':>9} {'x student':>10} {'x cached':>10} {'x rerank':>9} {'ms/q T':>8} "
              f"{'ms/q S':>8} {'ms/q R':>8} {'RSUM T':>7} {'RSUM S':>7} {'RSUM R':>7}")
    lines = [header, "-" * len(header)]
    for e in entries:
        t, s, c, r, x = e["teacher"], e["student"], e["student_cached"], e["rerank"], e["speedup"]
        teacher_s = f"{t['seconds']:.2f}" + ("*" if t["extrapolated"] else "")
        teacher_rsum = "-" if t["rsum"] is None else f"{t['rsum']:.1f}"
        lines.append(f"{e['images']:>7} {e['captions']:>8} {teacher_s:>12} {s['seconds']:>10.3f} "
                     f"{c['seconds']:>9.4f} {r['seconds']:>9.2f} {x['student']:>10.0f} "
                     f"{x['student_cached']:>10.0f} {x['rerank']:>9.1f} {t['single_query_ms']:>8.1f} "
                     f"{s['single_query_ms']:>8.2f} {r['single_query_ms']:>8.1f} {teacher_rsum:>7} "
                     f"{s['rsum']:>7.1f} {r['rsum']:>7.1f}")
    lines.append("* extrapolated linearly in pairs from a timed subset of image rows; "
                 "ms/q = one caption query against the gallery, measured alone")
    return "\n".join(lines)


def plot(entries: List[dict], path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = [e["images"] for e in entries]
    figure, axis = plt.subplots(figsize=(7, 5))
    styles = {"teacher": "tab:red", "student": "tab:blue", "student_cached": "tab:cyan",
              "rerank": "tab:green"}
    for method, color in styles.items():
        axis.plot(sizes, [e[method]["seconds"] for e in entries], "-o", color=color, label=method)
    extrapolated = [e for e in entries if e["teacher"]["extrapolated"]]
    if extrapolated:
        axis.plot([e["images"] for e in extrapolated], [e["teacher"]["seconds"] for e in extrapolated],
                  "o", markerfacecolor="white", color=styles["teacher"], label="teacher (extrapolated)")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("gallery size (images; captions = images x captions per image)")
    axis.set_ylabel("seconds to rank both directions")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def device_name(student) -> str:
    for parameter in student.parameters():
        return str(parameter.device)
    return "cpu"


# ----------------------------------------------------------------------------------------------
# Command line


def parse_sizes(text: str) -> List[int]:
    try:
        sizes = sorted({int(piece) for piece in text.split(",") if piece.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--images wants comma-separated integers, got {text!r}")
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError("--images wants positive sizes")
    return sizes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    retrieval = commands.add_parser("retrieval", help="teacher vs student vs rerank retrieval time")
    retrieval.add_argument("--student", required=True, help="student folder or preset")
    retrieval.add_argument("--teacher", required=True, help="teacher folder or preset")
    retrieval.add_argument("--images", type=parse_sizes, default=[100, 300, 1000],
                           help="gallery sizes, comma-separated")
    retrieval.add_argument("--captions-per-image", type=int, default=5)
    retrieval.add_argument("--shards", default="shards/synthetic")
    retrieval.add_argument("--split", default="test")
    retrieval.add_argument("--teacher-budget-s", type=float, default=120.0,
                           help="largest teacher all-pairs time measured in full; beyond it a subset is "
                                "timed and extrapolated (0 or less: always measure in full)")
    retrieval.add_argument("--rerank-k", type=int, default=16)
    retrieval.add_argument("--batch-size", type=int, default=256)
    retrieval.add_argument("--image-size", type=int, help="default: the manifest's image_size")
    retrieval.add_argument("--repeats", type=int, default=3, help="repeats of the short timings (median)")
    retrieval.add_argument("--out", default="runs/benchmark", help="folder for retrieval.json/.png")
    retrieval.add_argument("--progress", action="store_true", help="progress bars for the teacher")
    retrieval.add_argument("--seed", type=int, default=0, help="seed for models built from preset names")
    benchmark_train.add_parser(commands)
    benchmark_tokenizer.add_parser(commands)
    return parser.parse_args(argv)


def fail(message: str) -> int:
    print(f"benchmark: {message}", file=sys.stderr)
    return 2


def run_retrieval_benchmark(args) -> int:
    from train.eval_split import read_manifest
    from train.models.presets import build_student, build_teacher
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    try:
        manifest = read_manifest(args.shards, args.split)
        # preset specs build untrained models: a fixed seed gives every run the same weights
        torch.manual_seed(args.seed)
        tokenizer_dir = Path(args.shards) / "tokenizer"
        tokenizer_dir = str(tokenizer_dir) if tokenizer_dir.is_dir() else None
        student = build_student(args.student, tokenizer_dir)
        teacher = build_teacher(args.teacher, tokenizer_dir)
        image_size = args.image_size or manifest.get("image_size") or getattr(student, "image_size", None)
        if not image_size:
            raise ValueError("the manifest names no image_size: pass --image-size")
        split = read_eval_split(args.shards, args.split, int(image_size), max_images=max(args.images),
                                batch_size=args.batch_size)
    except (OSError, ValueError, KeyError) as error:
        return fail(str(error).strip().splitlines()[0])
    if split.num_images < max(args.images):
        return fail(f"{args.split} has {split.num_images} images, fewer than --images {max(args.images)}")
    budget = args.teacher_budget_s if args.teacher_budget_s and args.teacher_budget_s > 0 else None
    entries = benchmark_retrieval(student, teacher, split, args.images, args.captions_per_image,
                                  args.rerank_k, budget, args.batch_size, args.repeats, args.progress, log)
    report = {"benchmark": "retrieval", "student": args.student, "teacher": args.teacher,
              "shards": args.shards, "split": args.split, "captions_per_image": args.captions_per_image,
              "rerank_k": args.rerank_k, "teacher_budget_s": budget, "device": device_name(student),
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "platform": platform.platform(), "sizes": entries}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval.json").write_text(json.dumps(report, indent=2))
    largest = entries[-1]
    plot(entries, out / "retrieval.png",
         f"retrieval time ({report['device']}, {report['threads']} threads): student x"
         f"{largest['speedup']['student']:.0f}, rerank x{largest['speedup']['rerank']:.0f} "
         f"at {largest['images']} images")
    print(human_table(entries))
    print(f"wrote {out / 'retrieval.json'} and {out / 'retrieval.png'}")
    print(json.dumps({"images": largest["images"], "captions": largest["captions"],
                      "teacher_seconds": largest["teacher"]["seconds"],
                      "teacher_extrapolated": largest["teacher"]["extrapolated"],
                      "student_seconds": largest["student"]["seconds"],
                      "rerank_seconds": largest["rerank"]["seconds"], **{
                          f"speedup_{name}": value for name, value in largest["speedup"].items()}}))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "retrieval":
        return run_retrieval_benchmark(args)
    if args.command == "tokenizer":
        return benchmark_tokenizer.run_tokenizer_benchmark(args)
    try:
        return benchmark_train.run_train_benchmark(args)
    except benchmark_train.BenchmarkError as err:
        return fail(str(err))


if __name__ == "__main__":
    sys.exit(main())
