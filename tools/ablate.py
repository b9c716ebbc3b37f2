"""Does DCD work? Train every variant the same way, evaluate on the test split, write one table.

    python tools/ablate.py --teacher runs/default/teacher/teacher --steps 600 --seeds 0,1,2 --out runs/ablation

Variants (all from the same student preset initialised from scratch with the same seed, the same
shards, steps and batch; only the objective differs):
  contrastive   --stage student                       InfoNCE over the cross-rank pool only
  kd_random     --stage distill --negatives-from random   KD + hard CE on K random of the student's M
                                                      proposals: distillation without teacher ranking
  dcd_entropy   --stage distill --weighting entropy   DCD, published code's weights
  dcd_wsl       --stage distill --weighting wsl       DCD, the paper's weighted soft labels
  dcd_none      --stage distill --weighting none      DCD without dynamic weights
  dcd_listwise  --objective listwise                  KD to the row-standardised teacher
  dcd_denoised  --objective denoised                  teacher-near-positive candidates as positives
  dcd_margin    --objective margin                    KD = Margin-MSE
  dcd_margin_floor --objective margin_floor           KD = one-sided Margin-MSE (teacher margins as a floor)
  dcd_every_query  tools/recipes.EVERY_QUERY_KD       KD over every query's top-3 proposals, i2t only
                                                      (the recipe ./launch.sh's DCD step trains with)
(the objective variants keep the default weighting). With --signals stored (or auto, when it is
faster end to end: see `stored_is_faster`), one scoring pass (tools/score_teacher.py, proposer
--proposer or the first contrastive run's student) serves every DCD variant that ranks with the
teacher, which then trains from the stored signals with no teacher in its steps; the table's `mode`
column says which rows did, and `scoring s` is the pass's seconds shared over those runs.
Every variant runs once per seed in --seeds;
the table gives mean +- standard deviation over the seeds, so that a difference can be read
against seed noise. With --equal-time, `contrastive_equal_time`: the contrastive student trained for as many
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

from tools.recipes import EVERY_QUERY_KD, scoring_flags
from tools.signal_cost import SAVED_SECONDS_PER_STEP, auto_costs, pass_size, stored_is_faster

REPO = Path(__file__).resolve().parent.parent

VARIANTS = {
    "contrastive": ["--stage", "student"],
    "kd_random": ["--stage", "distill", "--negatives-from", "random"],
    "dcd_entropy": ["--stage", "distill", "--weighting", "entropy"],
    "dcd_wsl": ["--stage", "distill", "--weighting", "wsl"],
    "dcd_none": ["--stage", "distill", "--weighting", "none"],
    "dcd_listwise": ["--stage", "distill", "--objective", "listwise"],
    "dcd_denoised": ["--stage", "distill", "--objective", "denoised"],
    "dcd_margin": ["--stage", "distill", "--objective", "margin"],
    "dcd_margin_floor": ["--stage", "distill", "--objective", "margin_floor"],
    "dcd_every_query": ["--stage", "distill", *EVERY_QUERY_KD],
}
DEFAULT_VARIANTS = ("contrastive", "kd_random", "dcd_entropy", "dcd_wsl", "dcd_none", "dcd_every_query")
SIGNAL_MODES = ("online", "stored", "auto")
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


def uses_signals(extra: list[str]) -> bool:
    """A variant the stored signals can serve: distillation that ranks with the teacher."""
    return "distill" in extra and "random" not in extra


def pass_flags(args, names: list) -> list:
    """tools/score_teacher.py's --directions and --candidates for the stored variants among `names`:
    the directions any of them distils and the most candidates any reads (--train-args win over a
    variant's own flags, as on the train/run.py command line), so the one pass scores no more than
    they need: EVERY_QUERY_KD alone reads i2t x 4, 11x fewer pairs than both directions x 16."""
    needs = [pass_size(scoring_flags([*VARIANTS[n], *shlex.split(args.train_args)]))
             for n in names if uses_signals(VARIANTS[n])]
    if not needs:
        return []
    directions = {d for _, variant_directions in needs for d in variant_directions}
    return ["--directions", ",".join(d for d in ("i2t", "t2i") if d in directions),
            "--candidates", str(max(candidates for candidates, _ in needs))]


def signal_costs(args) -> tuple:
    """(seconds a stored step saves, pass pairs per second): --signal-costs' measurement, else the
    2-core CPU's figures for the published flags (tools/signal_cost.py)."""
    try:
        return auto_costs(args.signal_costs, SAVED_SECONDS_PER_STEP)
    except ValueError as error:
        sys.exit(f"ablate: --signal-costs {error}")


def score_signals(args, out: Path, proposer: str, flags: list) -> tuple:
    """(signals folder, pass seconds): one scoring pass of the train split with `flags` (pass_flags;
    kept; a killed one resumes)."""
    signals = out / "signals"
    manifest = signals / "manifest.json"
    if not (manifest.is_file() and "train" in json.loads(manifest.read_text()).get("splits", {})):
        run([*shlex.split(args.launcher), "tools/score_teacher.py", "--ds", "ds_configs/zero3.json",
             "--shards", args.shards, "--split", "train", "--teacher", args.teacher, "--proposer", proposer,
             *flags, "--out", str(signals), "--no-progress"])
    return signals, json.loads(manifest.read_text())["splits"]["train"]["seconds"]


def train(args, out: Path, extra: list[str], steps: int, seed: int) -> dict:
    summary = out / "train_summary.json"
    if not summary.is_file():
        run([*shlex.split(args.launcher), "train/run.py", *extra, "--shards", args.shards,
             "--teacher", args.teacher, "--student", args.student, "--out", str(out),
             "--steps", str(steps), "--seed", str(seed), "--eval-every", str(steps),
             "--save-every", str(steps), *shlex.split(args.train_args)])
    return json.loads(summary.read_text())


def mean_std(values: list) -> tuple:
    """(mean, population standard deviation) of the numbers in `values`; (None, None) if none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


def summarise(variant: str, runs: list[dict]) -> dict:
    """One table row from the runs of one variant (one per seed): mean and std of every column."""
    row = {"variant": variant, "seeds": len(runs), "steps": runs[0].get("steps")}
    for column in ["train_seconds", "seconds_per_step", *COLUMNS]:
        row[column], row[column + "_std"] = mean_std([r.get(column) for r in runs])
    return row


def markdown(rows: list[dict]) -> str:
    head = ["variant", "mode", "seeds", "steps", "train s", "scoring s", "s/step", *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["variant"], row.get("mode", ""), str(row.get("seeds", "")), str(row.get("steps", "")),
                 _fmt(row.get("train_seconds")), _fmt(row.get("scoring_seconds")), _fmt(row.get("seconds_per_step"), 3)]
        cells += [_fmt(row.get(c), std=row.get(c + "_std")) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value, digits: int = 1, std=None) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None and std > 0 else "")


def equal_time_steps(rows: list) -> int | None:
    """Contrastive steps that take as long as the slowest DCD variant trained (None: no DCD row)."""
    slowest = max((r for r in rows if r["variant"] != "contrastive"),
                  key=lambda r: r["train_seconds"], default=None)
    if slowest is None:
        return None
    base = next(r for r in rows if r["variant"] == "contrastive")
    steps = int(slowest["train_seconds"] / base["seconds_per_step"])
    print(f"[ablate] contrastive_equal_time: {steps} steps ~ {slowest['train_seconds']:.0f} s", flush=True)
    return steps


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Ablation of DCD against its baselines "
                                     "(same data, start, steps and seed).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shards", default="shards/synthetic")
    parser.add_argument("--split", default="test")
    parser.add_argument("--teacher", default="runs/default/teacher/teacher")
    parser.add_argument("--student", default="student-tiny", help="the common starting point")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every variant runs once per seed")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--equal-time", action="store_true",
                        help="also train the contrastive student for the slowest DCD variant's time")
    parser.add_argument("--eval-images", type=int, help="evaluate on the first N test images")
    parser.add_argument("--signals", choices=SIGNAL_MODES, default="online",
                        help="DCD variants from the online teacher, from one stored scoring pass, or "
                             "whichever is faster end to end for these runs")
    parser.add_argument("--signal-costs", metavar="TRAIN_JSON",
                        help="auto weighs the pass speed and step saving that `tools/benchmark.py train "
                             "--teacher-signals` measured on this machine (its train.json) instead of the "
                             "2-core CPU's figures")
    parser.add_argument("--proposer", help="dual encoder that proposes the stored candidates (default: "
                                           "the first contrastive run's student)")
    parser.add_argument("--launcher", default="deepspeed --num_gpus 2")
    parser.add_argument("--train-args", default="", help="extra flags for every train/run.py call")
    parser.add_argument("--out", default="runs/ablation")
    return parser.parse_args(argv)


class Variants:
    """Runs one variant over every seed and makes its table row; the DCD variants that rank with the
    teacher use the one scoring pass when --signals says so (made before the first of them)."""

    def __init__(self, args, out: Path, seeds: list, names: list):
        self.args, self.out, self.seeds = args, out, seeds
        self.stored_variants = sum(uses_signals(VARIANTS[n]) for n in names)
        self.pass_flags = pass_flags(args, names)
        costs = signal_costs(args)  # a bad --signal-costs file is one line whatever --signals says
        self.use_stored = bool(self.pass_flags) and (args.signals == "stored" or (
            args.signals == "auto" and stored_is_faster(args.shards, len(seeds) * self.stored_variants, args.steps,
                                                        *pass_size(self.pass_flags), *costs)))
        self.scoring: dict = {}

    def folder(self, name: str, seed: int) -> Path:
        return self.out / (name if len(self.seeds) == 1 else f"{name}-seed{seed}")

    def signals(self) -> list:
        if not self.scoring:
            proposer = self.args.proposer or str(self.folder("contrastive", self.seeds[0]) / "student")
            signals, seconds = score_signals(self.args, self.out, proposer, self.pass_flags)
            self.scoring.update(signals=signals, seconds=seconds)
        return ["--teacher-signals", str(self.scoring["signals"])]

    def run(self, name: str, extra: list[str], steps: int) -> dict:
        mode = "stored" if self.use_stored and uses_signals(extra) else ("online" if "distill" in extra else "")
        extra = extra + (self.signals() if mode == "stored" else [])
        runs = []
        for seed in self.seeds:
            folder = self.folder(name, seed)
            print(f"[ablate] {folder.name} ({mode or 'no teacher'})", flush=True)
            summary = train(self.args, folder, extra, steps, seed)
            runs.append({**summary, **evaluate(self.args, "student", folder / "student", folder / "eval.json")})
        row = summarise(name, runs)
        row["mode"] = mode
        if mode == "stored":  # the pass's seconds shared by the variants that used it
            row["scoring_seconds"] = self.scoring["seconds"] / max(1, self.stored_variants)
        return row


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(args.teacher).exists():
        sys.exit(f"ablate: --teacher {args.teacher}: not found (train one with ./launch.sh first)")

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        sys.exit(f"ablate: --seeds {args.seeds!r}: expected comma-separated integers")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not seeds:
        sys.exit(f"ablate: unknown variant '{unknown[0]}' (known: {', '.join(VARIANTS)})" if unknown
                 else "ablate: --seeds names no seed")

    one_variant = Variants(args, out, seeds, names).run

    rows = []
    started = time.perf_counter()
    for name in names:
        rows.append(one_variant(name, VARIANTS[name], args.steps))
    if args.equal_time and "contrastive" in names:
        steps = equal_time_steps(rows)
        if steps is not None:
            rows.append(one_variant("contrastive_equal_time", VARIANTS["contrastive"], steps))
    dcd = next((r for r in rows if r["variant"].startswith("dcd")), None)
    if dcd is not None:
        folder = out / (dcd["variant"] if len(seeds) == 1 else f"{dcd['variant']}-seed{seeds[0]}")
        teacher = evaluate(args, "rerank", folder / "student", out / "teacher_rerank.json",
                           teacher=args.teacher)
        rows.append({"variant": f"teacher (rerank top-16 of {folder.name})", **teacher})

    table = markdown(rows)
    (out / "ablation.md").write_text(
        f"Ablation on {args.shards} {args.split} split, {args.steps} steps each, seeds {seeds} "
        f"(mean ± std over seeds), all from {args.student} initialised from scratch.\n\n{table}\n")
    (out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)
    print(f"[ablate] {time.perf_counter() - started:.0f} s; {out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
