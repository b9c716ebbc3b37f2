"""Run the short 2-rank training N times in a row and count the exit codes.

    python tools/exit_soak.py --runs 20 [--ranks 2] [--steps 8] [--stage student] [--work DIR]

Every run is the real thing: `deepspeed --num_gpus RANKS train/run.py` on tiny synthetic shards
(written once), a fresh output folder each time. A run whose work succeeded must exit 0; gloo's
teardown used to abort about 1 run in 3 after the work was done (docs/platform_notes.md), which the launcher
reports as a failure. Prints one line per run and a summary; writes `{work}/exit_soak.json`.
Exit status: 0 when every run exited 0, 1 otherwise. A tool, not a CI test (minutes).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


def one_run(shards: Path, out: Path, ranks: int, steps: int, stage: str, timeout: int) -> dict:
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    command = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), "train/run.py",
               "--stage", stage, "--shards", str(shards), "--out", str(out), "--steps", str(steps),
               "--batch-size", "8", "--log-every", "1", "--eval-every", str(steps),
               "--save-every", str(steps), "--eval-images", "16", "--num-workers", "1"]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True,
                                timeout=timeout)
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as err:
        code = "timeout"
        output = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
    done = "[dcd] done:" in output
    return {"exit_code": code, "seconds": round(time.perf_counter() - started, 1), "work_done": done,
            "teardown_abort": "terminate called" in output,
            "rank_failures": re.findall(r"exits with return code = (-?\d+)", output),
            "tail": output[-1500:] if code != 0 else ""}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--stage", default="student", choices=("student", "teacher"))
    parser.add_argument("--timeout", type=int, default=600, help="seconds per run")
    parser.add_argument("--work", help="folder for shards and runs (default: a temporary one)")
    args = parser.parse_args(argv)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="exit_soak_"))
    work.mkdir(parents=True, exist_ok=True)
    shards = work / "shards"
    if not (shards / "train.json").is_file():
        from tools import make_shards
        make_shards.main(["--source", "synthetic", "--out", str(shards), "--train-images", "128",
                          "--val-images", "16", "--test-images", "0", "--maxcount", "32",
                          "--image-size", "32", "--seed", "0", "--quiet"])

    runs = []
    for i in range(args.runs):
        out = work / f"run{i:02d}"
        shutil.rmtree(out, ignore_errors=True)
        run = one_run(shards, out, args.ranks, args.steps, args.stage, args.timeout)
        runs.append(run)
        print(f"run {i + 1}/{args.runs}: exit {run['exit_code']} in {run['seconds']} s"
              f"{'' if run['work_done'] else ' (work NOT done)'}"
              f"{' (gloo teardown abort)' if run['teardown_abort'] else ''}", flush=True)
        shutil.rmtree(out, ignore_errors=True)

    codes = collections.Counter(str(r["exit_code"]) for r in runs)
    summary = {"runs": args.runs, "ranks": args.ranks, "steps": args.steps, "stage": args.stage,
               "exit_0": codes.get("0", 0), "exit_codes": dict(codes),
               "work_done": sum(r["work_done"] for r in runs),
               "teardown_aborts": sum(r["teardown_abort"] for r in runs),
               "mean_seconds": round(sum(r["seconds"] for r in runs) / max(1, len(runs)), 1),
               "failures": [dict(run=i, **r) for i, r in enumerate(runs) if r["exit_code"] != 0]}
    (work / "exit_soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"exit_soak: {summary['exit_0']} of {args.runs} runs exited 0 (exit codes {dict(codes)}; "
          f"work done in {summary['work_done']}; teardown aborts {summary['teardown_aborts']}); "
          f"{work / 'exit_soak.json'}", flush=True)
    return 0 if summary["exit_0"] == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
