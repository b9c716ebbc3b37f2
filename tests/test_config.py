"""Config: defaults < file < flags, stage defaults, one-line errors; DeepSpeed config checks."""
import json

import pytest

from train.config import ConfigError, load_run_config, parse_config
from train.engine import lr_multiplier, read_ds_config, teacher_ds_config


def test_flags_override_file_and_defaults(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"distill": {"alpha": 0.5, "candidates": 32}, "steps": 7}))
    cfg = parse_config(["--config", str(cfg_file), "--alpha", "0.3"])
    assert cfg.distill.alpha == 0.3          # flag beats file
    assert cfg.distill.candidates == 32      # file beats default
    assert cfg.train.steps == 7              # flat names work in files too
    assert cfg.distill.hard_negatives == 7   # default


def test_none_on_the_command_line_sets_an_optional_number_to_none(tmp_path):
    """`--distill-queries none` says on the command line what `null` says in a file (every query),
    even over a file that set a number; a non-number is still refused by argparse."""
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"distill": {"distill_queries": 8}}))
    assert parse_config(["--config", str(cfg_file)]).distill.distill_queries == 8
    assert parse_config(["--config", str(cfg_file), "--distill-queries", "None"]).distill.distill_queries is None
    assert parse_config(["--distill-queries", "4"]).distill.distill_queries == 4
    with pytest.raises(SystemExit):
        parse_config(["--distill-queries", "all"])


def test_stage_defaults_and_world_dependent_teacher_zero():
    teacher = parse_config(["--stage", "teacher"], world_size=2)
    assert teacher.data.twins_in_batch is True and teacher.train.lr == 1e-3
    assert teacher.train.out == "runs/default/teacher"
    distill = parse_config([], world_size=2)
    assert distill.train.stage == "distill" and distill.model.teacher_zero == 3
    assert distill.model.teacher == "runs/default/teacher/teacher"
    assert distill.train.warmup_steps == distill.train.steps // 10
    assert parse_config([], world_size=1).model.teacher_zero == 0


def test_saved_config_round_trips(tmp_path):
    cfg = parse_config(["--weighting", "wsl", "--kd-loss", "mse", "--batch-size", "16"])
    cfg.save(tmp_path / "config.json")
    again = load_run_config(tmp_path / "config.json")
    assert again == cfg


@pytest.mark.parametrize("argv, field", [
    (["--weighting", "soft"], "distill.weighting"),
    (["--teacher-zero", "2"], "model.teacher_zero"),
    (["--similar-negatives", "-1"], "teacher_loss"),
    (["--hard-negatives", "20"], "distill.hard_negatives"),
    (["--directions", "i2x"], "distill.directions"),
])
def test_bad_values_name_the_field(argv, field):
    with pytest.raises(ConfigError) as err:
        parse_config(argv)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_bad_config_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        parse_config(["--config", str(bad)])
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"alpah": 1}))
    with pytest.raises(ConfigError, match="unknown config field 'alpah'"):
        parse_config(["--config", str(unknown)])


def _write(tmp_path, obj, name="ds.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_ds_config_checks(tmp_path):
    ok = read_ds_config(_write(tmp_path, {"train_micro_batch_size_per_gpu": 8}), world_size=2)
    assert ok["train_batch_size"] == 16
    assert read_ds_config(_write(tmp_path, {"train_batch_size": 32}), world_size=2)[
        "train_micro_batch_size_per_gpu"] == 16
    assert read_ds_config(_write(tmp_path, {"train_micro_batch_size_per_gpu": 8}), 2, micro_batch=4)[
        "train_batch_size"] == 8
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_ds_config(_write(tmp_path, "{"))
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        read_ds_config(_write(tmp_path, {"train_micro_batch_size_per_gpu": 8,
                                         "zero_optimization": {"stage": 4}}))
    with pytest.raises(ConfigError, match="train_batch_size.*not divisible"):
        read_ds_config(_write(tmp_path, {"train_batch_size": 33}), world_size=2)
    with pytest.raises(ConfigError, match="train_batch_size"):
        read_ds_config(_write(tmp_path, {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 8}), 2)
    with pytest.raises(ConfigError, match="not found"):
        read_ds_config(tmp_path / "missing.json")


def test_shipped_ds_configs_are_valid():
    for name in ("zero2", "zero3", "zero3_offload"):
        ds = read_ds_config(f"ds_configs/{name}.json", world_size=2, micro_batch=4)
        teacher = teacher_ds_config(ds, 3)
        assert teacher["zero_optimization"]["stage"] == 3 and "optimizer" not in teacher


def test_lr_schedule_warms_up_then_decays():
    values = [lr_multiplier(s, 10, 100, "cosine") for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[-1] < 0.01
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert lr_multiplier(55, 10, 100, "linear") == pytest.approx(0.5)


def test_teacher_loss_flags_reach_the_teacher_stage_recipe():
    """The teacher stage's matching-loss recipe is config too (flags, files, saved config.json)."""
    from train.models.teacher_training import TeacherTrainingConfig
    default = parse_config(["--stage", "teacher"]).teacher_loss
    recipe = TeacherTrainingConfig()
    assert (default.random_negatives, default.similar_negatives, default.perturbed_negative,
            default.caption_loss_weight, default.mlm_weight) == (
        recipe.random_negatives, recipe.similar_negatives, recipe.perturbed_negative,
        recipe.caption_loss_weight, recipe.mlm_weight)
    cfg = parse_config(["--stage", "teacher", "--similar-negatives", "2", "--perturbed-negative", "false"])
    assert cfg.teacher_loss.similar_negatives == 2 and cfg.teacher_loss.perturbed_negative is False


@pytest.mark.parametrize("values, expected", [
    ({"distill": {"alpha": "0.5"}}, "field 'distill.alpha' is \"0.5\" (str); expected a number"),
    ({"train": {"steps": "100"}}, "field 'train.steps' is \"100\" (str); expected an integer or null"),
    ({"steps": 2.5}, "field 'train.steps' is 2.5 (float)"),
    ({"twins_in_batch": 1}, "field 'data.twins_in_batch' is 1 (int); expected true or false"),
    ({"weighting": "soft"}, "field 'distill.weighting' is \"soft\"; use entropy, wsl or none"),
    ({"model": {"teacher_zero": 2}}, "field 'model.teacher_zero' is 2; use 0 or 3"),
])
def test_config_file_values_are_checked_against_each_fields_type_and_choices(tmp_path, values, expected):
    path = _write(tmp_path, values, "run.json")
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", str(path)])
    assert str(err.value) == f"{path}: {expected}" or str(err.value).startswith(f"{path}: {expected}")
    assert "\n" not in str(err.value)


def test_config_file_numbers_convert_where_exact(tmp_path):
    cfg = parse_config(["--config", str(_write(tmp_path, {"alpha": 1, "teacher": None, "steps": 7}, "ok.json"))])
    assert cfg.distill.alpha == 1.0 and isinstance(cfg.distill.alpha, float) and cfg.train.steps == 7


def test_eval_every_zero_turns_validation_off_and_negative_is_refused():
    assert parse_config(["--eval-every", "0"]).train.eval_every == 0
    with pytest.raises(ConfigError, match="train.eval_every"):
        parse_config(["--eval-every", "-1"])


def test_a_precision_this_machine_cannot_run_is_refused_up_front(tmp_path):
    from train.engine import check_precision
    for precision in ("bf16", "fp16"):
        path = _write(tmp_path, {"train_micro_batch_size_per_gpu": 8, precision: {"enabled": True}})
        with pytest.raises(ConfigError, match=rf"field '{precision}.enabled' is true, but this machine has no GPU"):
            check_precision(json.loads(path.read_text()), path, has_gpu=False)
        check_precision(json.loads(path.read_text()), path, has_gpu=True)  # a GPU runs it
    autocast = {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}, "bf16": {"enabled": False}}
    check_precision(autocast, tmp_path / "autocast.json", has_gpu=False)  # bf16 compute on CPU: fine
    with pytest.raises(ConfigError, match="'bf16.enabled' is 'yes'"):
        check_precision({"bf16": {"enabled": "yes"}}, tmp_path / "x.json", has_gpu=False)


def test_help_explains_each_field_with_its_comment_in_the_config_source():
    """--help shows the comment written beside (or above) a field in train/config.py, or in the
    section's own module, before the default."""
    from train.config import DistillConfig, build_parser
    from train.field_comments import field_comments

    text = " ".join(build_parser().format_help().split())
    assert "--candidates CANDIDATES M: the student's proposals per query (default: 16)" in text
    assert "--stored-candidate-grad BOOL Embedded candidates take gradient as pool keys do online" in text
    assert "(KD to the row-standardised teacher)" in text  # a word split over two comment lines
    comments = field_comments(DistillConfig)
    assert "kd_temperature" not in comments  # no comment: the default alone
    assert comments["hard_negatives"] == "K: the teacher's top-ranked proposals kept"
    # a section defined in another module (train/models/teacher_training.py)
    assert "--random-negatives RANDOM_NEGATIVES random in-batch captions (and images) per image (default: 3)" in text
