"""Does DCD work? Train every variant the same way, evaluate on the test split, write one table.

    python tools/ablate.py --teacher runs/default/teacher/teacher --steps 600 --out runs/ablation

Variants (all from the same student preset initialised from scratch with the same seed, the same
shards, steps and batch; only the objective differs):
  contrastive   --stage student                       InfoNCE over the cross-rank pool only
  kd_random     --stage distill --negatives-from random   KD + hard CE on K random of the student's M
                                                      proposals: distillation without teacher ranking
  dcd_entropy   --stage distill --weighting entropy   DCD, published code's weights
  dcd_wsl       --stage distill --weighting wsl       DCD, the paper's weighted soft labels
  dcd_none      --stage distill --weighting none      DCD without dynamic weights
and, with --equal-time, `contrastive_equal_time`: the contrastive student trained for as many
steps as fit in the slowest DCD variant's training time, so that a method that wins per step but
loses per minute says so. The teacher's own row (rerank over the DCD student's top-16, and
binding accuracy) sits beside them.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

VARIANTS = {
    "contrastive": ["--stage", "student"],
    "kd_random": ["--stage", "distill", "--negatives-from", "random"],
    "dcd_entropy": ["--stage", "distill", "--weighting", "entropy"],
    "dcd_wsl": ["--stage", "distill", "--weighting", "wsl"],
    "dcd_none": ["--stage", "distill", "--weighting", "none"],
}
COLUMNS = ["tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum", "binding_acc"]


def run(command: list[str]) -> None:
    print("  $ " + " ".join(shlex.quote(c) for c in command), flush=True)
    result = subprocess.run(command, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"ablate: command failed with exit {result.returncode}: {' '.join(command[:6])} ...")


def evaluate(args, mode: str, student: Path, out_json: Path, teacher: str | None = None) -> dict:
    if not out_json.is_file():
        command = [sys.executable, "tools/evaluate.py", "--shards", args.shards, "--split", args.split,
                   "--student", str(student), "--mode", mode, "--json-out", str(out_json),
                   "--no-progress"]
        if args.eval_images:
            command += ["--max-images", str(args.eval_images)]
        if teacher:
            command += ["--teacher", teacher]
        run(command)
    return json.loads(out_json.read_text())


def train(args, name: str, extra: list[str], steps: int) -> dict:
    out = Path(args.out) / name
    summary = out / "train_summary.json"
    if not summary.is_file():
        run([*shlex.split(args.launcher), "train/run.py", *extra, "--shards", args.shards,
             "--teacher", args.teacher, "--student", args.student, "--out", str(out),
             "--steps", str(steps), "--seed", str(args.seed), "--eval-every", str(steps),
             "--save-every", str(steps), *shlex.split(args.train_args)])
    return json.loads(summary.read_text())


def markdown(rows: list[dict]) -> str:
    head = ["variant", "steps", "train s", "s/step", *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["variant"], str(row.get("steps", "")), _fmt(row.get("train_seconds")),
                 _fmt(row.get("seconds_per_step"), 3)]
        cells += [_fmt(row.get(c)) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Ablation of DCD against its baselines "
                                     "(same data, start, steps and seed).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shards", default="shards/synthetic")
    parser.add_argument("--split", default="test")
    parser.add_argument("--teacher", default="runs/default/teacher/teacher")
    parser.add_argument("--student", default="student-tiny", help="the common starting point")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--equal-time", action="store_true",
                        help="also train the contrastive student for the slowest DCD variant's time")
    parser.add_argument("--eval-images", type=int, help="evaluate on the first N test images")
    parser.add_argument("--launcher", default="deepspeed --num_gpus 2")
    parser.add_argument("--train-args", default="", help="extra flags for every train/run.py call")
    parser.add_argument("--out", default="runs/ablation")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(args.teacher).exists():
        sys.exit(f"ablate: --teacher {args.teacher}: not found (train one with ./launch.sh first)")

    rows = []
    started = time.perf_counter()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in names:
        if name not in VARIANTS:
            sys.exit(f"ablate: unknown variant '{name}' (known: {', '.join(VARIANTS)})")
        print(f"[ablate] {name}", flush=True)
        summary = train(args, name, VARIANTS[name], args.steps)
        metrics = evaluate(args, "student", out / name / "student", out / name / "eval.json")
        rows.append({"variant": name, **summary, **metrics})
    if args.equal_time and "contrastive" in names:
        slowest = max((r for r in rows if r["variant"] != "contrastive"),
                      key=lambda r: r["train_seconds"], default=None)
        if slowest is not None:
            base = next(r for r in rows if r["variant"] == "contrastive")
            steps = int(slowest["train_seconds"] / base["seconds_per_step"])
            print(f"[ablate] contrastive_equal_time: {steps} steps ~ {slowest['train_seconds']:.0f} s",
                  flush=True)
            summary = train(args, "contrastive_equal_time", VARIANTS["contrastive"], steps)
            metrics = evaluate(args, "student", out / "contrastive_equal_time" / "student",
                               out / "contrastive_equal_time" / "eval.json")
            rows.append({"variant": "contrastive_equal_time", **summary, **metrics})
    dcd = next((r for r in rows if r["variant"].startswith("dcd")), None)
    if dcd is not None:
        teacher = evaluate(args, "rerank", out / dcd["variant"] / "student", out / "teacher_rerank.json",
                           teacher=args.teacher)
        rows.append({"variant": f"teacher (rerank top-16 of {dcd['variant']})", **teacher})

    table = markdown(rows)
    (out / "ablation.md").write_text(
        f"Ablation on {args.shards} {args.split} split, {args.steps} steps each, seed {args.seed}, "
        f"all from {args.student} initialised from scratch.\n\n{table}\n")
    (out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)
    print(f"[ablate] {time.perf_counter() - started:.0f} s; {out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
