"""`./launch.sh --fast`'s pipeline end to end: every step for real on tiny sizes, results written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_fast_pipeline_writes_results_and_skips_done_steps(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    command = [sys.executable, "tools/pipeline.py", "--fast", "--run", str(tmp_path / "run"),
               "--shards", str(tmp_path / "shards"), "--launcher", f"deepspeed --num_gpus 2 --master_port {free_port()}"]
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    models = [row["model"] for row in results["full"]]
    assert models == ["contrastive baseline (student)", "contrastive baseline, DCD's wall time",
                      "DCD student", "rerank: DCD top-16 -> teacher"]
    assert results["subset"][0]["model"] == "teacher, all pairs"
    assert all(row["rsum"] is not None for row in results["full"] + results["subset"])
    assert results["speed"] and all(s["speedup_student"] > 0 for s in results["speed"])
    assert {"shards", "teacher", "baseline", "dcd", "evaluate", "benchmark", "total"} <= set(results["times"])
    assert "| DCD student (online teacher) |" in (tmp_path / "run" / "results.md").read_text()
    # A second run finds every step done and only rewrites the table.
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("already done") == 8
    assert "captions true of another" in (tmp_path / "run" / "results.md").read_text()
    again = json.loads((tmp_path / "run" / "results.json").read_text())
    assert again["times"] == results["times"]  # the first run's step times are kept

