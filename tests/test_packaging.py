"""The checkout is an installed package (pyproject.toml, `pip install -e .` by scripts/setup.sh): the
entry points the README shows import `train` and `tools` with no sys.path edits and no PYTHONPATH,
from any working directory."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_without_pythonpath(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [
    [sys.executable, str(REPO / "tools" / "make_shards.py"), "--help"],   # README's script form
    [sys.executable, str(REPO / "train" / "run.py"), "--help"],           # what deepspeed runs
    [sys.executable, "-m", "tools.evaluate", "--help"],
    [sys.executable, "-m", "train.preflight", "--help"],
])
def test_entry_points_import_the_checkout_from_anywhere(args, tmp_path):
    result = run_without_pythonpath(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


def test_console_scripts_are_installed(tmp_path):
    script = shutil.which("dcd-make-shards", path=str(Path(sys.executable).parent))
    assert script is not None, "run scripts/setup.sh (pip install -e .)"
    result = run_without_pythonpath([script, "--help"], cwd=tmp_path)
    assert result.returncode == 0 and "--source" in result.stdout


def test_no_module_edits_sys_path():
    offenders = [str(path.relative_to(REPO)) for folder in ("train", "tools", "tests")
                 for path in (REPO / folder).rglob("*.py") if "sys.path.insert" in path.read_text()
                 and path.name != "test_packaging.py"]
    assert offenders == []
