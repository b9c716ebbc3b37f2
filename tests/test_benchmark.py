"""The retrieval benchmark's JSON has every field: on fakes (measured and extrapolated teacher) and
end to end through the command line with tiny preset models on tiny shards made here."""
import json
import subprocess
import sys

import pytest

from test_evaluation import CharStudent, ConvTeacher, random_split
from tools.benchmark import SIZE_FIELDS, TOP_FIELDS, benchmark_retrieval, main

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def assert_every_field(entry):
    for section, fields in SIZE_FIELDS.items():
        part = entry[section] if section else entry
        missing = [name for name in fields if name not in part]
        assert not missing, f"{section or 'size entry'} lacks {missing}"


def test_measured_teacher_fields():
    entries = benchmark_retrieval(CharStudent(), ConvTeacher(), random_split(num_images=8),
                                  sizes=[4, 8], captions_per_image=2, rerank_k=3, teacher_budget_s=None,
                                  repeats=1, log=lambda message: None)
    assert [e["images"] for e in entries] == [4, 8]
    for entry in entries:
        assert_every_field(entry)
        assert entry["captions"] == 2 * entry["images"]
        assert entry["teacher"]["extrapolated"] is False
        assert entry["teacher"]["measured_pairs"] == entry["pairs"]
        assert entry["teacher"]["rsum"] is not None and entry["rerank_rsum_vs_teacher"] is not None
        assert entry["rerank"]["teacher_pairs"] <= (entry["images"] + entry["captions"]) * 3
        assert all(value > 0 for value in entry["speedup"].values())


def test_teacher_over_budget_is_extrapolated_and_labelled():
    entries = benchmark_retrieval(CharStudent(), ConvTeacher(), random_split(num_images=8),
                                  sizes=[8], captions_per_image=3, rerank_k=2, teacher_budget_s=1e-9,
                                  repeats=1, log=lambda message: None)
    teacher = entries[0]["teacher"]
    assert_every_field(entries[0])
    assert teacher["extrapolated"] is True and teacher["rsum"] is None
    assert teacher["measured_images"] == 1 and teacher["measured_pairs"] == 24
    assert teacher["seconds"] == pytest.approx(teacher["measured_seconds"] * 8)


def test_command_line_writes_json_and_plot(tmp_path):
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), "--source", "synthetic",
                    "--out", str(shards), "--train-images", "20", "--val-images", "0",
                    "--test-images", "12"], check=True, capture_output=True, cwd=REPO)
    out = tmp_path / "bench"
    code = main(["retrieval", "--student", "student-tiny", "--teacher", "film-tiny", "--images", "6,12",
                 "--captions-per-image", "2", "--shards", str(shards), "--split", "test",
                 "--teacher-budget-s", "60", "--repeats", "1", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "retrieval.json").read_text())
    assert all(name in report for name in TOP_FIELDS)
    assert [entry["images"] for entry in report["sizes"]] == [6, 12]
    for entry in report["sizes"]:
        assert_every_field(entry)
        assert entry["captions"] == 2 * entry["images"]
    assert (out / "retrieval.png").stat().st_size > 1000


def test_bad_paths_exit_2(tmp_path, capsys):
    code = main(["retrieval", "--student", "student-tiny", "--teacher", "film-tiny",
                 "--shards", str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_train_benchmark_ratios_are_taken_within_each_round():
    """A round whose load doubled every stage must not move the ratio: each round's distill time is
    divided by the student's of the SAME round, then the median is taken over rounds."""
    from tools.benchmark_train import median_breakdown, median_ratio
    quiet = {"student": {"time/step": 0.30}, "distill": {"time/step": 0.54}}
    loaded = {"student": {"time/step": 0.60}, "distill": {"time/step": 1.08}}
    odd = {"student": {"time/step": 0.30}, "distill": {"time/step": 1.20}}
    assert median_ratio([quiet, loaded, odd], "distill") == pytest.approx(1.8)
    assert median_ratio([quiet], "stored") is None
    stages = median_breakdown([quiet, loaded, odd])
    assert stages["student"]["time/step"] == pytest.approx(0.30)
    assert stages["distill"]["time/step"] == pytest.approx(1.08)


def test_train_benchmark_rejects_zero_rounds(tmp_path, capsys):
    (tmp_path / "train.json").write_text("{}")
    code = main(["train", "--shards", str(tmp_path), "--teacher", "film-tiny", "--rounds", "0",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "--rounds 0" in capsys.readouterr().err
