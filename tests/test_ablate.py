"""tools/ablate.py's table: mean +- std over seeds, and its refusals, without training anything;
the results page's teacher mode (tools/report.py)."""
import json

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
    assert "| dcd_entropy |  | 2 | 10 |" in table and "505.0 ± 5.0" in table and "75.0 ± 5.0" in table


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


def test_one_scoring_pass_serves_every_teacher_ranked_variant(tmp_path, monkeypatch):
    calls = {"score": [], "train": []}

    def fake_score(args, out, proposer, flags):
        calls["score"].append(proposer)
        calls["flags"] = flags
        return out / "signals", 120.0

    def fake_train(args, folder, extra, steps, seed):
        calls["train"].append((folder.name, extra))
        return {"steps": steps, "train_seconds": 10.0, "seconds_per_step": 0.1}

    monkeypatch.setattr(ablate, "score_signals", fake_score)
    monkeypatch.setattr(ablate, "train", fake_train)
    monkeypatch.setattr(ablate, "evaluate", lambda *a, **k: {"rsum": 1.0})
    args = ablate.parse_args(["--signals", "stored", "--out", str(tmp_path)])
    names = ["contrastive", "kd_random", "dcd_entropy", "dcd_wsl"]
    variants = ablate.Variants(args, tmp_path, [0], names)
    rows = [variants.run(n, ablate.VARIANTS[n], 5) for n in names]
    assert [r["mode"] for r in rows] == ["", "online", "stored", "stored"]
    assert calls["score"] == [str(tmp_path / "contrastive" / "student")]  # one pass, the baseline proposes
    assert calls["flags"] == ["--directions", "i2t,t2i", "--candidates", "16"]  # the published flags' needs
    extras = dict(calls["train"])
    assert "--teacher-signals" in extras["dcd_wsl"] and "--teacher-signals" not in extras["kd_random"]
    assert rows[2]["scoring_seconds"] == 60.0  # shared by the two variants that used it
    assert "| dcd_wsl | stored |" in ablate.markdown(rows)


def test_auto_stores_only_when_the_pass_is_cheaper_than_the_teacher_steps(tmp_path):
    from tools import signal_cost
    (tmp_path / "train.json").write_text('{"num_samples": 1000, "num_captions": 5000}')
    pass_s = (1000 * 16 + 5000 * 17) / signal_cost.SCORING_PAIRS_PER_S
    runs_needed = pass_s / (100 * signal_cost.SAVED_SECONDS_PER_STEP)
    assert not signal_cost.stored_is_faster(tmp_path, int(runs_needed), 100)
    assert signal_cost.stored_is_faster(tmp_path, int(runs_needed) + 1, 100)
    # an image->text pass with 4 candidates scores 1,000 x 4 + 5,000 positives: 9,000 pairs
    i2t_pass_s = 9000 / signal_cost.SCORING_PAIRS_PER_S
    assert signal_cost.stored_is_faster(tmp_path, 1, 100, 4, ("i2t",), i2t_pass_s / 99)
    assert not signal_cost.stored_is_faster(tmp_path, 1, 100, 4, ("i2t",), i2t_pass_s / 101)


def test_the_pass_scores_what_the_recipe_reads():
    from tools.recipes import EVERY_QUERY_KD, scoring_flags
    assert scoring_flags(EVERY_QUERY_KD) == ["--directions", "i2t", "--candidates", "4"]
    assert scoring_flags(["--weighting", "wsl"]) == ["--directions", "i2t,t2i", "--candidates", "16"]


def test_results_page_names_how_each_distilled_row_met_its_teacher(tmp_path):
    from tools.report import collect, render
    (tmp_path / "eval").mkdir()
    for name, stage, signals in (("baseline", "student", None), ("dcd", "distill", "runs/x/signals")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"train": {"stage": stage}, "distill": {"teacher_signals": signals}}))
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps({"rsum": 1.0, "images": 4, "captions": 20}))
    page = render(collect(tmp_path))
    assert "| DCD student (stored signals) |" in page and "| contrastive baseline (student) |" in page
    (tmp_path / "dcd" / "config.json").write_text(json.dumps({"train": {"stage": "distill"}, "distill": {}}))
    assert "| DCD student (online teacher) |" in render(collect(tmp_path))


@pytest.mark.parametrize("names, train_args, expected", [
    (["contrastive", "dcd_every_query"], "", ["--directions", "i2t", "--candidates", "4"]),
    (["dcd_every_query", "dcd_wsl"], "", ["--directions", "i2t,t2i", "--candidates", "16"]),
    (["dcd_every_query", "dcd_wsl"], "--candidates 8 --directions t2i", ["--directions", "t2i", "--candidates", "8"]),
    (["contrastive", "kd_random"], "", []),  # nothing the stored signals serve: no pass
])
def test_the_pass_scores_what_the_stored_variants_read(tmp_path, names, train_args, expected):
    args = ablate.parse_args(["--signals", "stored", "--out", str(tmp_path), "--train-args", train_args])
    assert ablate.pass_flags(args, names) == expected
    assert ablate.Variants(args, tmp_path, [0], names).use_stored is bool(expected)


def benchmark_json(path, distill_step=0.40, stored_step=0.36, pairs=36000, seconds=9.0):
    """The fields of tools/benchmark.py train's train.json that the cost model reads."""
    path.write_text(json.dumps({"stages": {"student": {"time/step": 0.2}, "distill": {"time/step": distill_step},
                                           "stored": {"time/step": stored_step}},
                                "scoring": {"pairs": pairs, "seconds": seconds, "pairs_per_s": 5000.0}}))
    return path


def test_measured_costs_come_from_a_benchmark_of_this_machine(tmp_path):
    from tools import signal_cost
    saved, pairs_per_s = signal_cost.measured_costs(benchmark_json(tmp_path / "train.json"))
    assert pairs_per_s == pytest.approx(4000.0) and saved == pytest.approx(0.04)  # proposals included
    (tmp_path / "online_only.json").write_text(json.dumps({"stages": {"distill": {"time/step": 0.4}},
                                                           "scoring": {"pairs": 1, "seconds": 1}}))
    with pytest.raises(ValueError, match=r"online_only.json: no number at stages\.stored\.time/step"):
        signal_cost.measured_costs(tmp_path / "online_only.json")
    with pytest.raises(ValueError, match=r"missing.json: not readable"):
        signal_cost.measured_costs(tmp_path / "missing.json")
    # 1,000 images x 4 + 5,000 positives = 9,000 pairs: 2.25 s at 4,000 pairs/s
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train.json").write_text('{"num_samples": 1000, "num_captions": 5000}')
    assert signal_cost.stored_is_faster(tmp_path / "shards", 1, 57, 4, ("i2t",), saved, pairs_per_s)
    assert not signal_cost.stored_is_faster(tmp_path / "shards", 1, 56, 4, ("i2t",), saved, pairs_per_s)


def test_auto_weighs_the_measured_costs_and_a_bad_file_is_one_line(tmp_path):
    (tmp_path / "train.json").write_text('{"num_samples": 1000, "num_captions": 5000}')

    def variants(costs_file):
        args = ablate.parse_args(["--signals", "auto", "--shards", str(tmp_path), "--out", str(tmp_path / "out"),
                                  "--steps", "100", "--signal-costs", str(costs_file)])
        return ablate.Variants(args, tmp_path / "out", [0], ["dcd_every_query"])

    # the i2t x 4 pass: 9,000 pairs; 100 steps save 100 x 0.04 = 4 s
    assert variants(benchmark_json(tmp_path / "fast_pass.json", seconds=2.0)).use_stored  # a 0.5 s pass
    assert not variants(benchmark_json(tmp_path / "slow_pass.json", seconds=90.0)).use_stored  # 22.5 s
    with pytest.raises(SystemExit, match=r"ablate: --signal-costs .*nothing.json: not readable"):
        variants(tmp_path / "nothing.json")
