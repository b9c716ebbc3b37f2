"""The loader's image size follows the models' own folders when the user sets none (issue 18, item 3):
a ViLT teacher saved by transformers at 96 px beside a 32 px CLIP student makes the loader read 96 px
crops; the project's own models keep 64; `--image-size` (or a config file) always wins."""
from types import SimpleNamespace

import pytest

from tests.fixtures import clip_folder
from tests.test_models import tiny_vilt_config, tokenizer, tokenizer_dir  # noqa: F401 (fixtures)
from train.config import parse_config
from train.models.presets import build_student, build_teacher
from train.objectives import choose_image_size, loader_image_size


@pytest.fixture
def vilt_96(tokenizer, tmp_path):
    from transformers import ViltForImageAndTextRetrieval
    folder = tmp_path / "hf-vilt"
    ViltForImageAndTextRetrieval(tiny_vilt_config(len(tokenizer), image_size=96)).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return build_teacher(str(folder))


@pytest.fixture
def clip_32(tokenizer, tmp_path):
    return build_student(str(clip_folder(tokenizer, tmp_path / "hf-clip")))


def objective_of(*models):
    return SimpleNamespace(pixel_models=lambda: list(models))


def test_unset_image_size_is_the_largest_the_models_read_at(vilt_96, clip_32):
    cfg = parse_config(["--stage", "distill", "--teacher", "x", "--student", "y"])
    assert cfg.data.image_size is None  # nothing chosen before the models are known
    line = choose_image_size(cfg, objective_of(vilt_96, clip_32))
    assert (vilt_96.image_size, clip_32.image_size) == (96, 32)
    assert cfg.data.image_size == 96
    assert line.startswith("image size 96 px: the largest the models read at")
    assert "ViltCrossEncoder 96" in line and "--image-size" in line and "\n" not in line


def test_project_models_keep_64(tokenizer_dir):
    teacher = build_teacher("film-tiny", tokenizer_dir=tokenizer_dir)
    student = build_student("student-tiny", tokenizer_dir=tokenizer_dir)
    assert loader_image_size([teacher, student]) == 64
    assert loader_image_size([]) == 64  # no model names a size: the loader's old default


@pytest.mark.parametrize("argv", [["--image-size", "48"], ["--config", "CONFIG"]])
def test_a_size_the_user_set_is_kept(argv, vilt_96, clip_32, tmp_path):
    config = tmp_path / "run.json"
    config.write_text('{"data": {"image_size": 48}}')
    argv = [str(config) if a == "CONFIG" else a for a in argv]
    cfg = parse_config(["--stage", "distill", "--teacher", "x", *argv])
    assert choose_image_size(cfg, objective_of(vilt_96, clip_32)) is None
    assert cfg.data.image_size == 48
