"""`tools/benchmark.py train`: the per-step time of --stage distill vs --stage student for the same
steps on the same ranks, through the real launcher and trainer (the step-time breakdown from each
run's TensorBoard `time/*`), and the training loader's throughput. Writes {out}/train.json.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


class BenchmarkError(Exception):
    """A run that cannot be benchmarked: one line, exit status 2."""


def add_parser(commands) -> None:
    train = commands.add_parser("train", help="per-step time of --stage distill vs --stage student, "
                                "and the loader's throughput")
    train.add_argument("--shards", default="shards/synthetic")
    train.add_argument("--teacher", default="runs/default/teacher/teacher",
                       help="teacher folder or preset for --stage distill")
    train.add_argument("--ranks", type=int, default=2, help="CPU ranks (the deepspeed launcher's --num_gpus)")
    train.add_argument("--steps", type=int, default=30)
    train.add_argument("--skip-steps", type=int, default=10, help="first steps left out (warm-up)")
    train.add_argument("--batch-size", type=int, help="per rank (default: the ds config's)")
    train.add_argument("--distill-args", default="", help="extra flags for the distill run, e.g. "
                       "'--distill-queries 64'")
    train.add_argument("--teacher-signals", help="also time --stage distill from these stored signals "
                       "(tools/score_teacher.py) and report the scoring pass's cost per image")
    train.add_argument("--rounds", type=int, default=1,
                       help="run the stages this many times in turn (student, distill, stored, student, "
                       "...) and report the median of the per-round ratios: on a machine whose load "
                       "changes, a ratio within one round compares runs that ran seconds apart")
    train.add_argument("--loader-batches", type=int, default=30)
    train.add_argument("--out", default="runs/benchmark", help="folder for train.json")


def step_breakdown(tb_dir: Path, skip_steps: int) -> dict:
    """Mean of every time/* and train/samples_per_s scalar logged after the warm-up steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    out = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith("time/") or tag in ("train/samples_per_s", "train/bytes_moved"):
            values = [e.value for e in events.Scalars(tag) if e.step > skip_steps]
            if values:
                out[tag] = statistics.fmean(values)
    return out


def loader_throughput(shards: str, batch_size: int, batches: int) -> dict:
    """Samples/s of one rank's training stream with 0, 1 and 2 loader workers (after the first batch)."""
    from train.data import load_tokenizer, make_train_loader
    tokenizer = load_tokenizer(Path(shards) / "tokenizer")
    result = {}
    for workers in (0, 1, 2):
        loader = make_train_loader(shards, "train", batch_size=batch_size, image_size=64,
                                   tokenizer=tokenizer, num_workers=workers, rank=0, world_size=2)
        stream = iter(loader)
        next(stream)
        started = time.perf_counter()
        for _ in range(batches):
            next(stream)
        result[f"workers_{workers}"] = batches * batch_size / (time.perf_counter() - started)
        del stream, loader
    return result


def run_train_benchmark(args) -> int:
    """--stage student and --stage distill for the same steps on the same ranks, through the real
    trainer and launcher; the step-time breakdown comes from each run's TensorBoard `time/*`."""
    repo = Path(__file__).resolve().parent.parent
    if not (Path(args.shards) / "train.json").is_file():
        raise BenchmarkError(f"{args.shards}: no train split (run tools/make_shards.py or ./launch.sh first)")
    if not Path(args.teacher).exists() and "-" not in args.teacher:
        raise BenchmarkError(f"--teacher {args.teacher}: not found (train one with ./launch.sh first)")
    out = Path(args.out)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    runs = [("student", "student", []), ("distill", "distill", ["--teacher", args.teacher, *args.distill_args.split()])]
    if args.teacher_signals:
        runs.append(("stored", "distill", ["--teacher-signals", args.teacher_signals, *args.distill_args.split()]))
    if args.rounds < 1:
        raise BenchmarkError(f"--rounds {args.rounds}: must be >= 1")
    rounds = [{name: _timed_run(repo, env, deepspeed, args, out / f"train_{name}", stage, extra)
               for name, stage, extra in runs} for _ in range(args.rounds)]
    stages = median_breakdown(rounds)
    loader = loader_throughput(args.shards, args.batch_size or 128, args.loader_batches)
    ratio_value = median_ratio(rounds, "distill")
    result = {"benchmark": "train", "ranks": args.ranks, "steps": args.steps, "skip_steps": args.skip_steps,
              "rounds": args.rounds, "distill_args": args.distill_args, "stages": stages,
              "distill_over_student": ratio_value,
              "per_round": [{"distill_over_student": step_ratio(r, "distill"),
                             **({"stored_over_student": step_ratio(r, "stored")} if "stored" in r else {})}
                            for r in rounds],
              **(scoring_cost(args.teacher_signals, median_ratio(rounds, "stored")) if args.teacher_signals else {}),
              "loader_samples_per_s_per_rank": loader, "cpu_count": os.cpu_count(),
              "threads_per_rank": env["OMP_NUM_THREADS"], "torch": torch.__version__}
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(result, indent=2) + "\n")
    tags = sorted({tag for values in stages.values() for tag in values})
    print(f"{'seconds per step':<24}" + "".join(f"{name:>12}" for name in stages))
    for tag in tags:
        row = [stages[s].get(tag) for s in stages]
        print(f"{tag:<24}" + "".join(f"{v:>12.4f}" if v is not None else f"{'-':>12}" for v in row))
    print(f"distill / student step time: {ratio_value:.2f}x" + (f" (median of {args.rounds} rounds)" if args.rounds > 1 else ""))
    if "stored" in stages:
        print(f"stored-signal distill / student step time: {result['stored_over_student']:.2f}x; scoring pass "
              f"{result['scoring']['seconds_per_image'] * 1000:.2f} s per 1,000 images")
    print("loader samples/s per rank: " + ", ".join(f"{k} {v:.0f}" for k, v in loader.items()))
    print(f"written: {out / 'train.json'}")
    return 0


def _timed_run(repo: Path, env: dict, deepspeed: str, args, run_dir: Path, stage: str, extra: list) -> dict:
    """One short run of `stage` through the launcher; its step-time breakdown after the warm-up."""
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [deepspeed, "--num_gpus", str(args.ranks), "train/run.py", "--stage", stage,
               "--shards", args.shards, "--out", str(run_dir), "--steps", str(args.steps),
               "--log-every", "1", "--eval-every", str(args.steps), "--save-every", str(args.steps),
               "--eval-images", "50", *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
               *extra]
    print("$ " + " ".join(command), flush=True)
    if subprocess.run(command, cwd=repo, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        raise BenchmarkError(f"--stage {stage} failed; run the command above to see why")
    return step_breakdown(run_dir / "tb", args.skip_steps)


def median_breakdown(rounds: list) -> dict:
    """Per stage, the median over rounds of each timed tag (a tag missing in a round is skipped)."""
    names = list(rounds[0])
    return {name: {tag: statistics.median([r[name][tag] for r in rounds if tag in r[name]])
                   for tag in sorted({t for r in rounds for t in r[name]})} for name in names}


def median_ratio(rounds: list, name: str):
    """The median over rounds of `name`'s step time over the student's IN THE SAME ROUND (runs
    seconds apart share the load, so each round's ratio is the fair one); None if never timed."""
    ratios = [step_ratio(r, name) for r in rounds]
    ratios = [x for x in ratios if x is not None]
    return statistics.median(ratios) if ratios else None


def step_ratio(stages: dict, name: str):
    """Seconds per step of run `name` over the contrastive student's."""
    over, under = stages.get(name, {}).get("time/step"), stages["student"].get("time/step")
    return over / under if over is not None and under else None


def scoring_cost(signals: str, stored_over_student) -> dict:
    """The stored run's step ratio and what the scoring pass of its train split cost, from the
    signals' manifest (tools/score_teacher.py): seconds and bytes per image price a dataset."""
    manifest_path = Path(signals) / "manifest.json"
    if not manifest_path.is_file():
        raise BenchmarkError(f"{manifest_path}: not found (write it with tools/score_teacher.py)")
    entry = json.loads(manifest_path.read_text())["splits"].get("train", {})
    images = max(1, entry.get("images", 0))
    return {"stored_over_student": stored_over_student,
            "scoring": {"images": entry.get("images"), "pairs": entry.get("pairs"), "seconds": entry.get("seconds"),
                        "pairs_per_s": entry.get("pairs_per_s"), "ranks": entry.get("ranks"),
                        "seconds_per_image": entry.get("seconds", 0.0) / images,
                        "bytes_per_image": entry.get("bytes", 0) / images}}
