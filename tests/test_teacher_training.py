"""The teacher matching loss: its negatives, its perturbations, and that it trains."""
import random

import pytest
import torch

from train.models.presets import build_teacher
from train.engine import build_optimizer
from train.models.teacher_training import (TeacherTrainingConfig, build_candidates, mask_words,
                                           perturb_caption, teacher_matching_loss, twin_rows)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def make_tokenizer(folder):
    """A word-level WordPiece tokenizer with a fixed vocabulary: trained vocabularies number their
    tokens differently from process to process, which would make the training test's outcome vary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *COLOURS,
             *"a square circle left right of above below".split()]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def twin_scene_batch(groups=4, seed=0):
    """Twin pairs: left half colour a / right half colour b, and the twin with the colours swapped."""
    rng = random.Random(seed)
    pixels, captions, image_ids, twin_ids = [], [], [], []
    for g in range(groups):
        a, b = rng.sample(list(COLOURS), 2)
        for first, second, image_id, twin_id in ((a, b, 2 * g, 2 * g + 1), (b, a, 2 * g + 1, 2 * g)):
            image = torch.zeros(3, 64, 64, dtype=torch.uint8)
            image[:, 16:48, 4:28] = torch.tensor(COLOURS[first], dtype=torch.uint8)[:, None, None]
            image[:, 16:48, 36:60] = torch.tensor(COLOURS[second], dtype=torch.uint8)[:, None, None]
            pixels.append(image)
            captions.append(f"a {first} square left of a {second} square")
            image_ids.append(image_id)
            twin_ids.append(twin_id)
    return {"pixels": torch.stack(pixels), "captions": captions, "image_ids": torch.tensor(image_ids),
            "twin_ids": torch.tensor(twin_ids), "groups": torch.tensor(image_ids) // 2}


def test_perturbations_change_binding_or_attributes():
    rng = random.Random(0)
    assert perturb_caption("A red circle left of a blue square", rng) in {
        "A blue circle left of a red square", "A red square left of a blue circle",
        "A red circle right of a blue square"}
    assert perturb_caption("a man riding a horse", rng) == "a horse riding a man"
    assert perturb_caption("Above the sea", rng) == "Below the sea"
    replaced = perturb_caption("a red ball", rng)
    assert replaced is not None and replaced != "a red ball"
    assert perturb_caption("a photo of something", rng) is None


def test_twin_rows_find_twins_in_the_batch():
    rows = twin_rows(torch.tensor([10, 11, 12, 13]), torch.tensor([11, 10, 99, -1]))
    assert rows.tolist() == [1, 0, -1, -1]


def _scored_pairs(plan, rows_key, valid_key):
    pairs = torch.stack([plan["image_index"], plan["text_index"]], dim=1)
    rows, valid = plan[rows_key], plan[valid_key]
    return [[tuple(pairs[p].tolist()) for p, ok in zip(row, ok_row) if ok] for row, ok_row in zip(rows, valid)]


def test_negatives_never_include_the_positive():
    # rows 0 and 4 show the same image, rows 1 and 5 different images with the very same caption
    captions = ["a red square left of a blue square", "a blue circle", "a green star above a red star",
                "a yellow square", "a red square left of a blue square", "a blue circle", "a red cube", "a cat"]
    image_ids = torch.tensor([0, 1, 2, 3, 0, 5, 6, 7])
    twin_ids = torch.tensor([1, 0, 3, 2, -1, -1, 7, 6])
    cfg = TeacherTrainingConfig(random_negatives=7, similar_negatives=3)
    perturbed = [perturb_caption(c, random.Random(i)) for i, c in enumerate(captions)]
    for seed in range(5):
        plan = build_candidates(image_ids, twin_ids, captions, perturbed, cfg,
                                torch.Generator().manual_seed(seed))
        same = lambda i, j: j < len(captions) and (image_ids[i] == image_ids[j] or captions[i] == captions[j])
        for i, candidates in enumerate(_scored_pairs(plan, "image_rows", "image_valid")):
            assert candidates[0] == (i, i)
            assert all(not same(i, text) for image, text in candidates[1:]) and all(image == i for image, _ in candidates)
        for j, candidates in enumerate(_scored_pairs(plan, "caption_rows", "caption_valid")):
            assert candidates[0] == (j, j)
            assert all(not same(image, j) for image, text in candidates[1:]) and all(text == j for _, text in candidates)
        # the twin is the first negative, on both sides, wherever the twin is in the batch
        assert plan["image_valid"][0, 1] and plan["text_index"][plan["image_rows"][0, 1]] == 1
        assert not plan["image_valid"][4, 1]


def test_every_pair_is_scored_once():
    batch = twin_scene_batch(groups=4)
    plan = build_candidates(batch["image_ids"], batch["twin_ids"], batch["captions"],
                            [None] * 8, TeacherTrainingConfig())
    pairs = torch.stack([plan["image_index"], plan["text_index"]], dim=1)
    assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)


def test_the_teacher_stage_keeps_the_film_recipe():
    """The optimiser's part of the FiLM recipe: AdamW lr 1e-3, 100 warm-up steps, cosine decay,
    weight decay 1e-4 (the teacher stage's defaults; tests/test_config.py checks the schedule) and
    gradient clipping 5 (the DeepSpeed configs)."""
    import json
    from pathlib import Path
    from train.config import STAGE_DEFAULTS
    recipe = STAGE_DEFAULTS["teacher"]
    assert (recipe["lr"], recipe["warmup_steps"], recipe["weight_decay"], recipe["schedule"]) == (
        1e-3, 100, 1e-4, "cosine")
    for ds_config in (Path(__file__).resolve().parent.parent / "ds_configs").glob("*.json"):
        assert json.loads(ds_config.read_text())["gradient_clipping"] == 5.0


def test_mask_words_masks_only_real_words(tokenizer_dir):
    teacher = build_teacher("film-tiny", tokenizer_dir)
    tokens = teacher.tokenize(["a red square", "a blue square left of a green square"])
    masked, labels = mask_words(tokens["input_ids"], tokens["attention_mask"], teacher.tokenizer, 0.0)
    chosen = labels != -100
    assert chosen.sum(1).tolist() == [1, 1]  # at least one per caption even at probability 0
    special = set(teacher.tokenizer.all_special_ids)
    assert all(int(t) not in special for t in tokens["input_ids"][chosen])
    assert (masked[chosen] == teacher.tokenizer.mask_token_id).all()


@pytest.mark.parametrize("preset, mlm_weight", [("film-tiny", 0.0), ("film-tiny", 0.5), ("vilt-tiny", 0.5)])
def test_matching_loss_decreases_over_a_few_steps(preset, mlm_weight, tokenizer_dir, seed=0):
    torch.manual_seed(seed)
    teacher = build_teacher(preset, tokenizer_dir)
    batch = twin_scene_batch(groups=4)
    cfg = TeacherTrainingConfig(mlm_weight=mlm_weight)
    optimizer = build_optimizer(teacher, lr=3e-3, weight_decay=1e-4)

    def loss_with_fixed_negatives():
        with torch.no_grad():
            return teacher_matching_loss(teacher, batch, cfg, torch.Generator().manual_seed(1))

    before = loss_with_fixed_negatives()
    for _ in range(30):
        out = teacher_matching_loss(teacher, batch, cfg)
        optimizer.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 5.0)
        optimizer.step()
    after = loss_with_fixed_negatives()
    assert torch.isfinite(out["loss"]) and out["num_pairs"] > 8
    assert after["loss"] < before["loss"] - 0.1
    assert after["loss_match"] < before["loss_match"]
    if mlm_weight:
        assert after["loss_mlm"] < before["loss_mlm"]


# ----------------------------------------------------------------------------------------------
# the FiLM teacher's fast pair scoring (stem once per image, first block's convs once per image,
# folded BatchNorm in eval mode) gives the scores of the plain per-pair computation

def _film_reference_scores(teacher, pixels, input_ids, attention_mask, image_index, text_index):
    """Everything per pair, the FiLM block written out as in the FiLM paper."""
    import torch.nn.functional as F
    x = teacher.stem(pixels)[image_index]
    _, caption = teacher.caption_encoder(input_ids, attention_mask)
    params = teacher.film.proj(caption).view(caption.shape[0], len(teacher.blocks), 2, -1)[text_index]
    for i, block in enumerate(teacher.blocks):
        h = F.relu(block.conv_in(x))
        h = block.conv.norm(F.conv2d(h, block.conv.weight, block.conv.bias, padding=1))
        h = (1 + params[:, i, 0, :, None, None]) * h + params[:, i, 1, :, None, None]
        x = x + F.relu(h)
    return teacher.head(x)[0]


@pytest.mark.parametrize("block_norm", ["batch", "group"])
def test_film_fast_scoring_equals_per_pair_reference(block_norm, tokenizer_dir):
    from train.models.presets import TEACHER_PRESETS
    from train.models.common import load_tokenizer
    from train.models.film import FilmCrossEncoder
    torch.manual_seed(0)
    config = {k: v for k, v in TEACHER_PRESETS["film-tiny"].items() if k != "backend"}
    teacher = FilmCrossEncoder(dict(config, block_norm=block_norm), load_tokenizer(tokenizer_dir))
    batch = twin_scene_batch(groups=3)
    pixels = teacher.preprocess_images(batch["pixels"])
    tokens = teacher.tokenize(batch["captions"])
    image_index = torch.tensor([0, 0, 1, 5, 5, 2, 3, 4, 0])
    text_index = torch.tensor([0, 1, 1, 4, 5, 2, 3, 0, 5])
    args = (pixels, tokens["input_ids"], tokens["attention_mask"], image_index, text_index)
    with torch.no_grad():  # non-trivial running statistics, and FiLM vectors far from zero
        for _ in range(3):
            teacher(*args)
        teacher.film.proj.weight.mul_(10)
    teacher.eval()
    with torch.no_grad():
        reference = _film_reference_scores(teacher, *args)
        torch.testing.assert_close(teacher(*args), reference, atol=1e-5, rtol=1e-4)
        teacher.pairs_per_slice = 4  # no-grad calls score their pairs in slices
        torch.testing.assert_close(teacher(*args), reference, atol=1e-5, rtol=1e-4)
    # with autograd (the training path) too
    torch.testing.assert_close(teacher(*args), _film_reference_scores(teacher, *args), atol=1e-5, rtol=1e-4)


def test_zero3_partitioned_film_calls_each_module_equally_often_whatever_the_pair_count(
        monkeypatch, tokenizer_dir):
    """Ranks score different numbers of pairs; under ZeRO-3 each submodule call is a collective, so
    a data-dependent number of calls desynchronises the ranks (seen: gloo size mismatch). The
    slice count is agreed (MAX) over the ranks: faked here as another rank needing 4 slices,
    which both pair counts below must then use (tests/test_teacher_zero3.py runs it for real)."""
    from train.models.film import FilmCrossEncoder
    teacher = build_teacher("film-tiny", tokenizer_dir=tokenizer_dir).eval()
    monkeypatch.setattr(FilmCrossEncoder, "zero3_partitioned", lambda self: True)
    teacher.agree_slice_count = lambda count, device: max(count, 4)
    counts = []
    for pairs in (10, 3 * FilmCrossEncoder.pairs_per_slice + 5):
        calls = {}
        hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: calls.__setitem__(
            name, calls.get(name, 0) + 1)) for name, m in teacher.named_modules()]
        images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
        tokens = teacher.tokenize(["a red circle", "a blue square"])
        with torch.no_grad():
            teacher(teacher.preprocess_images(images), tokens["input_ids"], tokens["attention_mask"],
                    torch.randint(0, 4, (pairs,)), torch.randint(0, 2, (pairs,)))
        for hook in hooks:
            hook.remove()
        counts.append(calls)
    assert counts[0] == counts[1]


def test_a_given_similarity_picks_the_similar_negatives():
    """With a student's image x caption similarity (and a near-zero temperature) each image's
    similar caption negative is its most similar non-positive caption, and each caption's similar
    image negative its most similar non-positive image; word overlap is not consulted."""
    captions = [f"caption {i}" for i in range(6)]
    image_ids = torch.arange(6)
    twin_ids = torch.full((6,), -1)
    similarity = torch.zeros(6, 6)
    similarity.fill_diagonal_(1.0)
    for i in range(6):
        similarity[i, (i + 2) % 6] = 0.9  # image i's hardest caption; caption (i+2)'s hardest image
    cfg = TeacherTrainingConfig(random_negatives=0, similar_negatives=1, perturbed_negative=False,
                                similarity_temperature=1e-3)
    plan = build_candidates(image_ids, twin_ids, captions, [None] * 6, cfg,
                            torch.Generator().manual_seed(0), similarity=similarity)
    for i, candidates in enumerate(_scored_pairs(plan, "image_rows", "image_valid")):
        assert candidates == [(i, i), (i, (i + 2) % 6)]
    for j, candidates in enumerate(_scored_pairs(plan, "caption_rows", "caption_valid")):
        assert candidates == [(j, j), ((j - 2) % 6, j)]
