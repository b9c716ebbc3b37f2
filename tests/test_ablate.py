"""tools/ablate.py's table: mean +- std over seeds, and its refusals, without training anything."""
import pytest

from tools import ablate


def test_mean_std_and_summary_over_seeds():
    assert ablate.mean_std([1.0, 3.0]) == (2.0, 1.0)
    assert ablate.mean_std([None, 4.0]) == (4.0, 0.0)
    assert ablate.mean_std([]) == (None, None)
    runs = [{"steps": 10, "train_seconds": 10.0, "seconds_per_step": 1.0, "rsum": 500.0, "binding_acc": 70.0},
            {"steps": 10, "train_seconds": 12.0, "seconds_per_step": 1.2, "rsum": 510.0, "binding_acc": 80.0}]
    row = ablate.summarise("dcd_entropy", runs)
    assert row["seeds"] == 2 and row["rsum"] == 505.0 and row["rsum_std"] == 5.0
    assert row["binding_acc"] == 75.0 and row["tr_r1"] is None
    table = ablate.markdown([row])
    assert "| dcd_entropy | 2 | 10 |" in table and "505.0 ± 5.0" in table and "75.0 ± 5.0" in table


def test_every_variant_is_a_stage_and_its_flags():
    for name, flags in ablate.VARIANTS.items():
        assert flags[:2] in (["--stage", "student"], ["--stage", "distill"]), name
    assert set(ablate.DEFAULT_VARIANTS) <= set(ablate.VARIANTS)


@pytest.mark.parametrize("argv, message", [
    (["--variants", "magic"], "unknown variant 'magic'"),
    (["--seeds", "a,b"], "expected comma-separated integers"),
])
def test_bad_arguments_are_one_line(tmp_path, argv, message):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        ablate.main(["--teacher", str(teacher), "--out", str(tmp_path / "out"), *argv])
    assert message in str(exit_info.value)
