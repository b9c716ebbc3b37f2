"""How ambiguous a synthetic split is, and how much a perfect teacher could still add to a student.

    python tools/false_negatives.py --shards shards/synthetic --split test --student runs/dcd/student [MORE ...]

Recall counts only an image's OWN captions as right, but a synthetic caption such as "a red circle"
is true of many scenes. With the scene-oracle teacher (ground truth, `train/models/oracle.py`) this
prints, on a gallery of the split:
- how many captions are true of each image (its own five and the others: the false negatives);
- the recall of ranking by truth alone, ties broken at random (mean of --seeds orders): what a
  perfect binary teacher scores on this benchmark;
- the student's recall, and the recall of "truth first, the student's order among equals": the
  ceiling for a student that never ranks a false caption above a true one;
- the student's truth-aware recall: a hit is any caption true of the image (and any image the
  caption is true of), not only its own; where captions are true of many images this is the
  measure a teacher that knows the truth can improve (docs/RESULTS.md, "Session 8");
- how many of the student's top-10 captions per image are true (what DCD's candidates look like).
Several students share one truth matrix (5,000,000 claim checks at 1,000 x 5,000: about a minute).
Prints one JSON object last: {"students": [report per student]}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from train.eval_split import read_eval_split  # noqa: E402
from train.evaluation import embed_split, student_scores  # noqa: E402
from train.metrics import retrieval_metrics, truth_aware_metrics  # noqa: E402


def truth_matrix(oracle, split) -> torch.Tensor:
    """bool [images, captions]: caption true of image, by the scenes' ground truth."""
    encoded = oracle.tokenize(split.captions)
    pixels = oracle.preprocess_images(split.pixels)
    rows = []
    for image in range(split.num_images):
        image_index = torch.full((split.num_captions,), image, dtype=torch.long)
        rows.append(oracle.truth(pixels, encoded["input_ids"], image_index,
                                 torch.arange(split.num_captions)))
    return torch.stack(rows)


def ambiguity_report(truth: torch.Tensor, student: torch.Tensor, caption_image_index: torch.Tensor,
                     seeds: int = 3) -> dict:
    """The numbers of the module docstring from a truth matrix and the student's score matrix."""
    truth_f = truth.float()
    random_orders = []
    for seed in range(seeds):
        noise = torch.rand(truth.shape, generator=torch.Generator().manual_seed(seed))
        random_orders.append(retrieval_metrics(truth_f + 0.5 * noise, caption_image_index))
    truth_random = {k: sum(m[k] for m in random_orders) / seeds for k in random_orders[0]}
    # student scores are cosines in [-1, 1]: +4 per true caption puts every true one above every false
    truth_then_student = retrieval_metrics(4.0 * truth_f + student, caption_image_index)
    top10 = student.topk(min(10, student.shape[1]), dim=1).indices
    return {"images": truth.shape[0], "captions": truth.shape[1],
            "true_captions_per_image": truth_f.sum(1).mean().item(),
            "captions_true_of_other_images": (truth_f.sum(0) > 1).float().mean().item(),
            "truth_random_ties": truth_random, "student": retrieval_metrics(student, caption_image_index),
            "truth_then_student": truth_then_student,
            "student_truth_aware": truth_aware_metrics(student, truth, caption_image_index),
            "student_top10_true": truth_f.gather(1, top10).mean().item()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default="shards/synthetic", help="synthetic shards folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--student", required=True, nargs="+", help="student folder(s)")
    parser.add_argument("--max-images", type=int, default=None, help="first N images (default all)")
    parser.add_argument("--seeds", type=int, default=3, help="random tie orders to average")
    parser.add_argument("--json-out", help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    from train.models.oracle import build_scene_oracle
    from train.models.presets import build_student

    start = time.perf_counter()
    oracle = build_scene_oracle(f"scene-oracle:{args.shards}")
    split = read_eval_split(args.shards, args.split, max_images=args.max_images)
    truth = truth_matrix(oracle, split)
    reports = []
    for folder in args.student:
        student = student_scores(embed_split(build_student(folder), split))
        report = ambiguity_report(truth, student, split.caption_image_index, args.seeds)
        report.update(split=args.split, student_folder=folder)
        reports.append(report)
        print(f"{folder}: {report['images']} images x {report['captions']} captions, "
              f"{report['true_captions_per_image']:.1f} captions true of each image (5 its own), "
              f"{100 * report['captions_true_of_other_images']:.1f}% of captions true of another image too")
        for name in ("truth_random_ties", "student", "truth_then_student", "student_truth_aware"):
            m = report[name]
            print(f"  {name:<20} TR R@1 {m['tr_r1']:5.1f}  IR R@1 {m['ir_r1']:5.1f}  RSUM {m['rsum']:6.1f}")
        print(f"  student top-10 captions per image that are true: {100 * report['student_top10_true']:.1f}%")
    result = json.dumps({"students": reports, "seconds": round(time.perf_counter() - start, 1)})
    if args.json_out:
        Path(args.json_out).write_text(result + "\n")
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
