"""Hugging Face folders in and out (issue 14) and each model's own preprocessing (issue 18, item 3).

Fixtures are saved by transformers itself (tiny configs, random weights); the models are then
"fine-tuned" (every weight moved) before export, so a round trip that dropped or re-initialised any
weight would not match. Round trips print their max abs difference (pytest -s shows them).
"""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.fixtures import clip_folder, vtde_folder
from tests.test_models import (scene_captions, tiny_vilt_config, tokenizer,  # noqa: F401 (fixtures)
                               tokenizer_dir, uint8_images)
from train.models.presets import build_student, build_teacher, load_student, load_teacher
from train.models.student import DualEncoder
from train.models.vilt import ViltCrossEncoder

ROUND_TRIP_ATOL = 1e-5
PIXEL_ATOL = 1e-2  # normalised pixels: half a uint8 level over a std of ~0.27 is 0.0073
# PIL's fixed-point first pass and ours round a tie apart at a few pixels in 10^5 when enlarging or
# shrinking mildly (train/models/common.py, resize_like_pil): those may reach 1.5 levels.
PIXEL_TIES = 1e-4


def assert_pixel_parity(ours, theirs, std):
    assert ours.shape == theirs.shape
    difference = (ours - theirs).abs()
    assert (difference > PIXEL_ATOL).float().mean().item() <= PIXEL_TIES
    assert difference.max().item() <= 1.5 / 255 / min(std) + 1e-6


def fine_tune(module, seed=0):
    """Move every weight a little, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))


def report(name, difference):
    print(f"round trip {name}: max abs difference {difference:.3g}")
    assert difference <= ROUND_TRIP_ATOL, f"{name}: {difference}"


def real_photos():
    """Non-square real photographs: matplotlib's sample photo (600 x 512) and a wide crop of it."""
    import matplotlib
    path = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    photo = Image.open(path).convert("RGB")
    return [photo, photo.crop((0, 100, 512, 380)), photo.resize((333, 517), Image.BICUBIC)]


def as_uint8(photo):
    return torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1).unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# ViLT teacher: transformers folder -> project -> transformers folder

@pytest.fixture
def vilt_folder(tokenizer, tmp_path):
    from transformers import ViltForImageAndTextRetrieval
    folder = tmp_path / "hf-vilt"
    ViltForImageAndTextRetrieval(tiny_vilt_config(len(tokenizer))).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_vilt_teacher_exports_as_a_transformers_folder_with_identical_scores(vilt_folder, tmp_path):
    from transformers import ViltForImageAndTextRetrieval, ViltProcessor
    teacher = build_teacher(str(vilt_folder)).eval()
    fine_tune(teacher)
    teacher.save_pretrained(tmp_path / "out")
    plain = ViltForImageAndTextRetrieval.from_pretrained(str(tmp_path / "out")).eval()
    processor = ViltProcessor.from_pretrained(str(tmp_path / "out"))
    captions = scene_captions(3)
    pixels, tokens = teacher.preprocess_images(uint8_images(3)), teacher.tokenize(captions)
    with torch.no_grad():
        ours = teacher(pixels, **tokens)
        theirs = plain(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=pixels).logits[:, 0]
        again = load_teacher(tmp_path / "out").eval()(pixels, **tokens)
    report("ViLT teacher -> ViltForImageAndTextRetrieval", (ours - theirs).abs().max().item())
    report("ViLT teacher -> its folder -> project teacher", (ours - again).abs().max().item())
    assert processor.tokenizer(captions, padding="longest")["input_ids"] == tokens["input_ids"].tolist()
    assert processor.image_processor.size["shortest_edge"] == teacher.image_size


def test_project_vilt_keeps_the_project_format(tokenizer_dir, tmp_path):
    teacher = build_teacher("vilt-tiny", tokenizer_dir)
    teacher.save_pretrained(tmp_path / "own")
    assert (tmp_path / "own" / "tokenizer").is_dir()  # the project's layout, backend in config.json
    assert isinstance(ViltCrossEncoder.from_pretrained(tmp_path / "own"), ViltCrossEncoder)


def test_wrong_class_on_a_project_folder_fails_loudly(tokenizer_dir, vilt_folder, tmp_path):
    build_teacher("film-tiny", tokenizer_dir).save_pretrained(tmp_path / "film")
    build_student("student-tiny", tokenizer_dir).save_pretrained(tmp_path / "student")
    with pytest.raises(ValueError, match="holds a 'film' model, not a 'vilt' one"):
        ViltCrossEncoder.from_pretrained(tmp_path / "film")
    with pytest.raises(ValueError, match="holds a 'film' model, not a 'dual_encoder' one"):
        DualEncoder.from_pretrained(tmp_path / "film")
    with pytest.raises(ValueError, match="transformers 'vilt' folder"):
        DualEncoder.from_pretrained(vilt_folder)
    with pytest.raises(ValueError, match="a saved student folder, not a teacher"):
        build_teacher(str(tmp_path / "student"))
    with pytest.raises(ValueError, match="a saved 'film' teacher folder, not a student"):
        build_student(str(tmp_path / "film"))


# ----------------------------------------------------------------------------------------------
# CLIP / VisionTextDualEncoder students

def plain_features(model, pixels, tokens):
    def tensor(output):  # transformers 5 returns a model output from get_*_features
        return output.pooler_output if hasattr(output, "pooler_output") else output
    images = tensor(model.get_image_features(pixel_values=pixels))
    texts = tensor(model.get_text_features(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"]))
    return F.normalize(images, dim=-1), F.normalize(texts, dim=-1)


@pytest.mark.parametrize("make_folder, model_class", [(clip_folder, "CLIPModel"),
                                                      (vtde_folder, "VisionTextDualEncoderModel")])
def test_hf_student_exports_as_its_own_folder_with_identical_embeddings(make_folder, model_class,
                                                                        tokenizer, tmp_path):
    import transformers
    student = build_student(str(make_folder(tokenizer, tmp_path / "hf"))).eval()
    fine_tune(student)
    student.save_pretrained(tmp_path / "out")
    plain = getattr(transformers, model_class).from_pretrained(str(tmp_path / "out")).eval()
    image_processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "out"))
    plain_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    pixels = student.preprocess_images(uint8_images(3))
    tokens = student.tokenize(scene_captions(3))
    with torch.no_grad():
        ours = student(pixels, **tokens)
        theirs = plain_features(plain, pixels, tokens)
        again = load_student(tmp_path / "out").eval()(pixels, **tokens)
    for side, mine, other, reloaded in zip(("image", "text"), ours, theirs, again):
        report(f"{model_class} student {side} embeddings", (mine - other).abs().max().item())
        report(f"{model_class} student {side} -> project student", (mine - reloaded).abs().max().item())
    assert plain.logit_scale.exp().item() == pytest.approx(student.temperature_scale().item())
    assert plain_tokenizer(scene_captions(3), padding="longest")["input_ids"] == tokens["input_ids"].tolist()
    assert image_processor.crop_size["height"] == student.image_size


# ----------------------------------------------------------------------------------------------
# each model's own preprocessing: the uint8 pipeline vs the transformers image processors

@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("photo_index", [0, 1, 2])
def test_student_crops_photos_as_clip_image_processor_does(photo_index, size, tokenizer, tmp_path):
    from transformers import CLIPImageProcessor
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    folder = clip_folder(tokenizer, tmp_path / "clip")
    processor.save_pretrained(str(folder))  # the student takes its size and mean/std from it
    student = build_student(str(folder))
    photo = real_photos()[photo_index]
    theirs = torch.as_tensor(np.asarray(processor(images=photo)["pixel_values"]))
    ours = student.preprocess_images(as_uint8(photo))
    assert_pixel_parity(ours, theirs, student.cfg["image_std"])
    student.save_pretrained(tmp_path / "out")  # the exported processor is the student's own
    exported = CLIPImageProcessor.from_pretrained(str(tmp_path / "out"))
    again = torch.as_tensor(np.asarray(exported(images=photo)["pixel_values"]))
    assert torch.equal(again, theirs)


@pytest.mark.parametrize("shorter", [64, 384])
@pytest.mark.parametrize("photo_index", [0, 1, 2])
def test_vilt_teacher_resizes_photos_as_vilt_image_processor_does(photo_index, shorter, tokenizer, tmp_path):
    from transformers import ViltForImageAndTextRetrieval, ViltImageProcessor
    folder = tmp_path / "hf-vilt"
    ViltForImageAndTextRetrieval(tiny_vilt_config(len(tokenizer), patch_size=32)).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    processor = ViltImageProcessor(size={"shortest_edge": shorter}, size_divisor=32)
    processor.save_pretrained(str(folder))
    teacher = build_teacher(str(folder))
    photo = real_photos()[photo_index]
    theirs = torch.as_tensor(np.asarray(processor(images=photo)["pixel_values"]))
    ours = teacher.preprocess_images(as_uint8(photo))
    assert_pixel_parity(ours, theirs, teacher.image_std)


def test_student_crops_a_square_batch_like_the_training_loader(tokenizer_dir):
    """Square uint8 at the student's size passes unchanged (the loader already cropped it)."""
    student = build_student("student-tiny", tokenizer_dir)
    pixels = uint8_images(2, size=64)
    expected = (pixels.float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(student.preprocess_images(pixels), expected)


def test_pretrained_folder_without_tokenizer_is_one_line_unless_given(tokenizer, tokenizer_dir, tmp_path):
    from transformers import CLIPModel
    folder = clip_folder(tokenizer, tmp_path / "clip")
    bare = tmp_path / "bare"
    CLIPModel.from_pretrained(str(folder)).save_pretrained(str(bare))
    with pytest.raises(ValueError, match=r"has no tokenizer files .*give --tokenizer FOLDER$"):
        build_student(str(bare), tokenizer_dir=tokenizer_dir)
    assert build_student(str(bare), tokenizer=tokenizer_dir).tokenizer.vocab_size == tokenizer.vocab_size
