"""The results table of a pipeline run: `{run}/results.md` and `{run}/results.json`.

Reads what the pipeline's steps wrote (eval/*.json from tools/evaluate.py, benchmark/retrieval.json
from tools/benchmark.py, each stage's train_summary.json) and puts them side by side.

    python tools/report.py --run runs/default
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = ["tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum", "binding_acc"]

# (label, eval file, training folder) in table order
FULL_ROWS = [("contrastive baseline (student)", "baseline.json", "baseline"),
             ("contrastive baseline, DCD's wall time", "baseline_equal_time.json", "baseline_equal_time"),
             ("DCD student", "dcd.json", "dcd"),
             ("rerank: DCD top-16 -> teacher", "rerank.json", None)]
SUBSET_ROWS = [("teacher, all pairs", "teacher.json", "teacher"),
               ("contrastive baseline (student)", "baseline_subset.json", None),
               ("DCD student", "dcd_subset.json", None)]


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _cell(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def _table(rows: list[dict], title: str) -> str:
    head = ["model", *METRICS, "seconds"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        model = row["model"] + (f" ({row['mode']})" if row.get("mode") else "")
        lines.append("| " + " | ".join([model, *(_cell(row.get(m)) for m in METRICS),
                                        _cell(row.get("seconds"), 2)]) + " |")
    return "\n".join(lines)


def teacher_mode(train_dir: Path) -> str | None:
    """How a distilled row met its teacher: 'online teacher' or 'stored signals' (from its saved
    config.json); None for the rows no teacher trained."""
    config = _read(train_dir / "config.json") or {}
    if config.get("train", {}).get("stage") != "distill":
        return None
    return "stored signals" if config.get("distill", {}).get("teacher_signals") else "online teacher"


def collect(run: Path, times: dict | None = None) -> dict:
    evals, results = run / "eval", {"full": [], "subset": [], "speed": [], "times": times or {}}
    ambiguity = _read(evals / "false_negatives.json")
    if ambiguity and ambiguity.get("students"):
        first = ambiguity["students"][0]
        results["data"] = {k: first[k] for k in ("images", "captions", "true_captions_per_image",
                                                  "captions_true_of_other_images")}
        results["data"]["truth_ranking_rsum"] = first["truth_random_ties"]["rsum"]
    for key, rows in (("full", FULL_ROWS), ("subset", SUBSET_ROWS)):
        for label, name, train_dir in rows:
            metrics = _read(evals / name)
            if metrics is None:
                continue
            row = {"model": label, **{k: metrics.get(k) for k in METRICS + ["images", "captions", "seconds"]}}
            summary = _read(run / train_dir / "train_summary.json") if train_dir else None
            row["mode"] = teacher_mode(run / train_dir) if train_dir else None
            if summary:
                row.update(train_steps=summary["steps"], train_seconds=summary["train_seconds"])
            results[key].append(row)
    bench = _read(run / "benchmark" / "retrieval.json")
    for entry in (bench or {}).get("sizes", bench if isinstance(bench, list) else []):
        results["speed"].append({
            "images": entry["images"], "captions": entry["captions"],
            "teacher_s": entry["teacher"]["seconds"], "extrapolated": entry["teacher"]["extrapolated"],
            "student_s": entry["student"]["seconds"], "student_cached_s": entry["student_cached"]["seconds"],
            "rerank_s": entry["rerank"]["seconds"], "speedup_student": entry["speedup"]["student"],
            "speedup_rerank": entry["speedup"]["rerank"]})
    return results


def render(results: dict) -> str:
    parts = []
    data = results.get("data")
    if data:
        parts.append(f"**Data** (tools/false_negatives.py, test split {data['images']} x {data['captions']}): "
                     f"{data['true_captions_per_image']:.1f} captions true of each image (5 its own), "
                     f"{100 * data['captions_true_of_other_images']:.1f}% of captions true of another "
                     f"image, ranking by truth alone (ties at random) RSUM {data['truth_ranking_rsum']:.1f}")
    if results["full"]:
        first = results["full"][0]
        parts.append(_table(results["full"], f"Test split, {first.get('images')} images x "
                                             f"{first.get('captions')} captions"))
    if results["subset"]:
        first = results["subset"][0]
        parts.append(_table(results["subset"], f"Teacher gallery: the first {first.get('images')} test "
                                               f"images x {first.get('captions')} captions (all pairs "
                                               "through the teacher)"))
    if results["speed"]:
        lines = ["**Retrieval time, the whole gallery both ways (same machine, same run)**", "",
                 "| images x captions | teacher s | student s | student cached s | rerank s | "
                 "student speed-up | rerank speed-up |", "|---|---|---|---|---|---|---|"]
        for s in results["speed"]:
            mark = " (extrapolated)" if s["extrapolated"] else ""
            lines.append(f"| {s['images']} x {s['captions']} | {s['teacher_s']:.1f}{mark} | "
                         f"{s['student_s']:.3f} | {s['student_cached_s']:.4f} | {s['rerank_s']:.2f} | "
                         f"{s['speedup_student']:.0f}x | {s['speedup_rerank']:.1f}x |")
        parts.append("\n".join(lines))
    trained = [r for r in results["full"] + results["subset"] if "train_seconds" in r]
    if results["times"] or trained:
        lines = ["**Pipeline wall time per step (s)**", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in results["times"].items()]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_results(run: Path, times: dict | None = None) -> str:
    run = Path(run)
    results = collect(run, times)
    # Steps skipped this time keep the times measured when they ran.
    old = _read(run / "results.json")
    merged = {k: v for k, v in (old or {}).get("times", {}).items() if k != "total"}
    merged.update({k: v for k, v in (times or {}).items() if k != "total"})
    if merged:
        merged["total"] = round(sum(merged.values()), 1)
    results["times"] = merged
    text = render(results)
    (run / "results.md").write_text(text)
    (run / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/default")
    args = parser.parse_args(argv)
    if not Path(args.run).is_dir():
        print(f"error: {args.run}: no such run folder", file=sys.stderr)
        return 2
    print(write_results(Path(args.run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
