"""Teacher / student / presets on tiny configs: shapes, gradients, pair indexing, save/load, specs."""
import random

import pytest
import torch

from tests.fixtures import clip_folder, vtde_folder
from train.models.presets import build_student, build_teacher, load_student
from train.models.student import DualEncoder, build_tower, register_tower
from train.models.teacher import CrossEncoder

COLOURS = "red green blue yellow purple orange cyan".split()
SHAPES = "circle square triangle star".split()
RELATIONS = ["left of", "right of", "above", "below"]


def scene_captions(n, seed=0):
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        (a, b), (s, t) = rng.sample(COLOURS, 2), rng.sample(SHAPES, 2)
        captions.append(f"a {a} {s} {rng.choice(RELATIONS)} a {b} {t}")
    return captions


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def make_tokenizer(folder):
    """A tiny WordPiece tokenizer saved like the data tokenizer (loaded back with from_pretrained)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(scene_captions(200), trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def uint8_images(n, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def tiny_vilt_config(vocab_size, **overrides):
    from transformers import ViltConfig
    values = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=37, image_size=32, patch_size=16, max_position_embeddings=40)
    return ViltConfig(**dict(values, **overrides))


def teacher_inputs(teacher, n_images, captions):
    return teacher.preprocess_images(uint8_images(n_images)), teacher.tokenize(captions)


# ----------------------------------------------------------------------------------------------
# teachers

@pytest.mark.parametrize("preset", ["film-tiny", "vilt-tiny"])
def test_teacher_forward_backward(preset, tokenizer_dir):
    teacher = build_teacher(preset, tokenizer_dir)
    assert isinstance(teacher, CrossEncoder)
    pixels, tokens = teacher_inputs(teacher, 3, scene_captions(3))
    assert pixels.shape == (3, 3, teacher.image_size, teacher.image_size) and pixels.dtype == torch.float32
    logits = teacher(pixels, tokens["input_ids"], tokens["attention_mask"])
    assert logits.shape == (3,)
    logits.sum().backward()
    assert all(p.grad is not None for n, p in teacher.named_parameters() if "word_head" not in n)
    word_logits = teacher(pixels, tokens["input_ids"], tokens["attention_mask"], task="mlm")
    assert word_logits.shape == (*tokens["input_ids"].shape, len(teacher.tokenizer))


def test_film_teacher_matches_the_measured_architecture(tokenizer_dir):
    teacher = build_teacher("film-tiny", tokenizer_dir)
    matching = count_parameters(teacher) - count_parameters(teacher.word_head)
    assert 540_000 < matching < 580_000  # docs/platform_notes.md: 557k
    features = teacher.stem(teacher.preprocess_images(uint8_images(2)))
    assert features.shape == (2, 64, 8, 8)


@pytest.mark.parametrize("preset", ["film-tiny", "vilt-tiny"])
def test_pair_indexed_forward_equals_aligned_forward(preset, tokenizer_dir):
    teacher = build_teacher(preset, tokenizer_dir).eval()
    pixels, tokens = teacher_inputs(teacher, 3, scene_captions(4, seed=1))
    image_index = torch.tensor([0, 0, 1, 2, 2, 1, 0])
    text_index = torch.tensor([0, 3, 1, 2, 0, 3, 2])
    with torch.no_grad():
        indexed = teacher(pixels, tokens["input_ids"], tokens["attention_mask"], image_index, text_index)
        aligned = teacher(pixels[image_index], tokens["input_ids"][text_index],
                          tokens["attention_mask"][text_index])
    torch.testing.assert_close(indexed, aligned, atol=1e-5, rtol=1e-5)


def test_film_score_does_not_depend_on_padding(tokenizer_dir):
    teacher = build_teacher("film-tiny", tokenizer_dir).eval()
    pixels = teacher.preprocess_images(uint8_images(1))
    short = teacher.tokenize(["a red circle"])
    padded = teacher.tokenize(["a red circle", "a red circle above a blue square left of a green star"])
    with torch.no_grad():
        alone = teacher(pixels, **short)
        beside = teacher(pixels, **padded, image_index=torch.tensor([0]), text_index=torch.tensor([0]))
    torch.testing.assert_close(alone, beside, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["film-tiny", "vilt-tiny"])
def test_teacher_save_load_round_trip(preset, tokenizer_dir, tmp_path):
    teacher = build_teacher(preset, tokenizer_dir).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    assert {"config.json", "model.safetensors", "tokenizer"} <= {p.name for p in (tmp_path / "teacher").iterdir()}
    loaded = build_teacher(str(tmp_path / "teacher")).eval()
    assert type(loaded) is type(teacher)
    captions = scene_captions(3, seed=2)
    pixels, tokens = teacher_inputs(teacher, 3, captions)
    again_pixels, again_tokens = teacher_inputs(loaded, 3, captions)
    assert torch.equal(tokens["input_ids"], again_tokens["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(teacher(pixels, **tokens), loaded(again_pixels, **again_tokens),
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_transformers_saved_vilt_folder_is_a_teacher_spec(with_tokenizer, tokenizer, tokenizer_dir, tmp_path):
    from transformers import ViltForImageAndTextRetrieval
    folder = tmp_path / "hf-vilt"
    hf_model = ViltForImageAndTextRetrieval(tiny_vilt_config(len(tokenizer))).eval()
    hf_model.save_pretrained(str(folder))
    if with_tokenizer:
        tokenizer.save_pretrained(str(folder))
    # a folder without a tokenizer reads with --tokenizer FOLDER (never the shards' one in silence)
    teacher = build_teacher(str(folder), tokenizer=None if with_tokenizer else tokenizer_dir).eval()
    assert teacher.backend == "vilt" and teacher.image_size == 32
    pixels, tokens = teacher_inputs(teacher, 2, scene_captions(2))
    with torch.no_grad():
        ours = teacher(pixels, **tokens)
        theirs = hf_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                          pixel_values=pixels).logits[:, 0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_vilt_folder_without_any_tokenizer_is_refused(tokenizer, tmp_path):
    from transformers import ViltForImageAndTextRetrieval
    ViltForImageAndTextRetrieval(tiny_vilt_config(len(tokenizer))).save_pretrained(str(tmp_path / "v"))
    with pytest.raises(ValueError, match="no tokenizer files.*--tokenizer FOLDER"):
        build_teacher(str(tmp_path / "v"))
    with pytest.raises(ValueError, match="no tokenizer files"):  # the data tokenizer is no fallback
        build_teacher(str(tmp_path / "v"), tokenizer_dir=tmp_path)


def test_vilt_b32_preset_is_the_real_architecture():
    from train.models.presets import TEACHER_PRESETS
    config = TEACHER_PRESETS["vilt-b32"]["vilt_config"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["patch_size"],
            config["image_size"]) == (768, 12, 32, 384)


# ----------------------------------------------------------------------------------------------
# students

def check_student(student, n=3):
    pixels = student.preprocess_images(uint8_images(n))
    tokens = student.tokenize(scene_captions(n))
    image_emb, text_emb = student(pixels, tokens["input_ids"], tokens["attention_mask"])
    assert image_emb.shape == text_emb.shape == (n, student.cfg["embed_dim"])
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(n))
    loss = (student.temperature_scale() * image_emb @ text_emb.t()).logsumexp(1).mean()
    loss.backward()
    assert student.logit_scale.grad is not None
    return pixels, tokens


def assert_same_student_outputs(student, loaded, pixels, tokens):
    student.eval(), loaded.eval()
    with torch.no_grad():
        for ours, theirs in zip(student(pixels, **tokens), loaded(pixels, **tokens)):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert torch.equal(loaded.tokenize(["a red star"])["input_ids"], student.tokenize(["a red star"])["input_ids"])


def test_student_tiny_forward_backward_and_round_trip(tokenizer_dir, tmp_path):
    student = build_student("student-tiny", tokenizer_dir)
    assert abs(student.temperature_scale().item() - 1 / 0.07) < 1e-3
    pixels, tokens = check_student(student)
    assert student.image_size == 64
    *embeddings, scale = student(pixels, **tokens, return_scale=True)
    assert len(embeddings) == 2 and scale.item() == pytest.approx(1 / 0.07, rel=1e-4)
    student.save_pretrained(tmp_path / "student")
    loaded = DualEncoder.from_pretrained(tmp_path / "student")  # nothing from the trainer needed
    assert_same_student_outputs(student, loaded, pixels, tokens)
    assert type(build_student(str(tmp_path / "student"))) is DualEncoder


def test_temperature_is_clamped_at_100(tokenizer_dir):
    student = build_student("student-tiny", tokenizer_dir)
    with torch.no_grad():
        student.logit_scale.fill_(10.0)
    assert student.temperature_scale().item() == pytest.approx(100.0)


def test_student_from_transformers_clip_folder(tokenizer, tokenizer_dir, tmp_path):
    from transformers import CLIPModel
    clip = CLIPModel.from_pretrained(str(clip_folder(tokenizer, tmp_path / "clip", save_tokenizer=False))).eval()
    student = build_student(str(tmp_path / "clip"), tokenizer=tokenizer_dir)
    assert student.cfg["image_size"] == 32 and student.cfg["embed_dim"] == 16
    pixels, tokens = check_student(student)
    student.eval()
    with torch.no_grad():  # the student is CLIP itself at init
        expected = clip.get_image_features(pixel_values=pixels)
        expected = expected.pooler_output if hasattr(expected, "pooler_output") else expected
        torch.testing.assert_close(student.encode_image(pixels), torch.nn.functional.normalize(expected, dim=-1),
                                   atol=1e-5, rtol=1e-5)
    student.save_pretrained(tmp_path / "student")
    assert_same_student_outputs(student, load_student(tmp_path / "student"), pixels, tokens)


def test_student_from_vision_text_dual_encoder_folder(tokenizer, tokenizer_dir, tmp_path):
    vtde_folder(tokenizer, tmp_path / "vtde", save_tokenizer=False)
    student = build_student(str(tmp_path / "vtde"), tokenizer=tokenizer_dir)
    pixels, tokens = check_student(student)
    student.save_pretrained(tmp_path / "student")
    assert_same_student_outputs(student, load_student(tmp_path / "student"), pixels, tokens)


def test_student_from_vilt_teacher_starts_from_its_weights(tokenizer_dir, tmp_path):
    teacher = build_teacher("vilt-tiny", tokenizer_dir)
    student = build_student("from-teacher", teacher=teacher)
    assert student.cfg["image_size"] == teacher.image_size
    teacher_encoder = teacher.model.vilt.encoder.state_dict()
    for tower in (student.image_tower, student.text_tower):
        for name, value in tower.encoder.state_dict().items():
            assert torch.equal(value, teacher_encoder[name])
    pixels, tokens = check_student(student)
    student.save_pretrained(tmp_path / "student")
    assert_same_student_outputs(student, DualEncoder.from_pretrained(tmp_path / "student"), pixels, tokens)


def test_film_teacher_cannot_seed_a_student(tokenizer_dir):
    with pytest.raises(ValueError, match="film"):
        build_student("from-teacher", teacher=build_teacher("film-tiny", tokenizer_dir))


def test_external_towers_can_be_registered(tokenizer_dir, tmp_path):
    @register_tower("test_mean_colour")
    class MeanColourTower(torch.nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.tower_config, self.width = dict(cfg), 8
            self.linear = torch.nn.Linear(3, 8)

        def forward(self, pixel_values):
            return self.linear(pixel_values.mean(dim=(2, 3)))

    student = build_student("student-tiny", tokenizer_dir)
    custom = DualEncoder(student.cfg, student.tokenizer,
                         image_tower=build_tower({"kind": "test_mean_colour", "modality": "image"}))
    pixels, tokens = check_student(custom)
    custom.save_pretrained(tmp_path / "custom")
    assert_same_student_outputs(custom, DualEncoder.from_pretrained(tmp_path / "custom"), pixels, tokens)


# ----------------------------------------------------------------------------------------------
# specs

@pytest.mark.parametrize("build, spec", [
    (build_teacher, "no-such-teacher"),
    (build_teacher, "/no/such/folder"),
    (build_teacher, "nobody-here/no-model"),   # looks like a hub id: offline it fails in one line
    (build_student, "no-such-student"),
    (build_student, "./missing-student-folder"),
])
def test_unknown_spec_is_a_one_line_value_error(build, spec):
    with pytest.raises(ValueError) as error:
        build(spec)
    message = str(error.value)
    assert spec in message and "\n" not in message


@pytest.mark.parametrize("pool", ["flatten", "attention"])
def test_cnn_image_tower_pools(pool):
    from train.models.presets import STUDENT_PRESETS
    from train.models.student import build_tower
    tower = build_tower(dict(STUDENT_PRESETS["student-tiny"]["image_tower"], pool=pool))
    features = tower(torch.randn(3, 3, 64, 64))
    assert features.shape == (3, tower.width)
    features.sum().backward()


def test_distillation_builds_its_teacher_without_moving_the_student_seed(tokenizer_dir, tmp_path):
    # The distilled and the contrastive student must start from the same weights for one seed, or
    # every comparison of the two stages carries an initialisation difference.
    from train.objectives import build_teacher_aside
    build_teacher("film-tiny", tokenizer_dir=tokenizer_dir).save_pretrained(tmp_path / "teacher")
    torch.manual_seed(0)
    contrastive = build_student("student-tiny", tokenizer_dir=tokenizer_dir)
    torch.manual_seed(0)
    teacher = build_teacher_aside(str(tmp_path / "teacher"), tokenizer_dir)
    distilled = build_student("student-tiny", tokenizer_dir=tokenizer_dir, teacher=teacher)
    for a, b in zip(contrastive.parameters(), distilled.parameters()):
        assert torch.equal(a, b)
