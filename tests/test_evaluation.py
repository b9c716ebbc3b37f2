"""Evaluation at scale on tiny deterministic fakes: student / teacher / rerank recall on hand-made
score matrices, the 2-rank teacher evaluation against 1 rank, and the embedding cache."""
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from train.eval_split import EvalSplit, twin_gallery_index
from train.evaluation import (SplitEmbeddings, block_of_rank, embed_split, embedding_cache_path, ranked_top,
                              rerank, rerank_rows, student_scores, teacher_all_pairs, teacher_binding_scores,
                              teacher_pair_scores)
from train.metrics import binding_accuracy, retrieval_metrics


# ----------------------------------------------------------------------------------------------
# Fakes that follow the model contracts (docs/ARCHITECTURE.md)

def number_split(num_images=3, captions_per_image=2):
    """Image i is a constant picture of value i; caption t reads 'caption t'. Images 0 and 1 are twins."""
    pixels = torch.arange(num_images, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone()
    caption_image = torch.arange(num_images).repeat_interleave(captions_per_image)
    twins = [-1] * num_images
    twins[0], twins[1] = 1, 0
    return EvalSplit(pixels=pixels, captions=[f"caption {t}" for t in range(len(caption_image))],
                     caption_image_index=caption_image, image_ids=torch.arange(100, 100 + num_images),
                     twin_index=torch.tensor(twins), keys=[f"k{i}" for i in range(num_images)],
                     name="numbers")


class MatrixTeacher(nn.Module):
    """A cross-encoder whose score for (image i, caption t) is matrix[i, t]; counts scored pairs."""

    def __init__(self, matrix):
        super().__init__()
        self.register_buffer("matrix", matrix.float())
        self.pairs_scored = 0

    def preprocess_images(self, pixels):
        return pixels.float()

    def tokenize(self, captions):
        ids = torch.tensor([[int(c.split()[1])] for c in captions])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def forward(self, pixel_values, input_ids, attention_mask, image_index=None, text_index=None):
        images = pixel_values[:, 0, 0, 0].long()
        captions = input_ids[:, 0]
        if image_index is None:
            image_index = text_index = torch.arange(len(images))
        self.pairs_scored += len(image_index)
        return self.matrix[images[image_index], captions[text_index]]


class CharStudent(nn.Module):
    """Dual encoder: image = projection of the channel means; caption = mean character embedding."""

    def __init__(self, dim=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.image_proj = nn.Linear(3, dim)
        self.char_embed = nn.Embedding(128, dim)
        self.image_calls = self.text_calls = 0

    def preprocess_images(self, pixels):
        return pixels.float() / 255.0

    def tokenize(self, captions):
        length = max(len(c) for c in captions)
        ids = torch.zeros(len(captions), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, caption in enumerate(captions):
            ids[row, :len(caption)] = torch.tensor([ord(ch) % 128 for ch in caption])
            mask[row, :len(caption)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def encode_image(self, pixel_values):
        self.image_calls += 1
        return F.normalize(self.image_proj(pixel_values.mean(dim=(2, 3))), dim=-1)

    def encode_text(self, input_ids, attention_mask):
        self.text_calls += 1
        mask = attention_mask.unsqueeze(-1).float()
        return F.normalize((self.char_embed(input_ids) * mask).sum(1) / mask.sum(1), dim=-1)


class ConvTeacher(nn.Module):
    """A small real-valued cross-encoder (seeded) for the distributed test."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.image_proj = nn.Linear(3, 6)
        self.char_embed = nn.Embedding(128, 6)
        self.mix = nn.Linear(6, 1)

    preprocess_images = CharStudent.preprocess_images
    tokenize = CharStudent.tokenize

    def forward(self, pixel_values, input_ids, attention_mask, image_index=None, text_index=None):
        image = self.image_proj(pixel_values.mean(dim=(2, 3)))
        mask = attention_mask.unsqueeze(-1).float()
        text = (self.char_embed(input_ids) * mask).sum(1) / mask.sum(1)
        return self.mix(torch.tanh(image[image_index] * text[text_index])).squeeze(-1)


def random_split(num_images=7, captions_per_image=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (num_images, 3, 4, 4), dtype=torch.uint8, generator=generator)
    caption_image = torch.arange(num_images).repeat_interleave(captions_per_image)
    words = ["red", "blue", "circle", "square", "left", "of", "above", "big"]
    captions = [" ".join(words[j] for j in torch.randint(0, len(words), (4,), generator=generator))
                + f" {t}" for t in range(len(caption_image))]
    twins = torch.tensor([i ^ 1 if (i ^ 1) < num_images else -1 for i in range(num_images)])
    return EvalSplit(pixels=pixels, captions=captions, caption_image_index=caption_image,
                     image_ids=torch.arange(num_images), twin_index=twins,
                     keys=[str(i) for i in range(num_images)], name="random")


# ----------------------------------------------------------------------------------------------
# The three modes on hand-made matrices

# Student: image 0's best caption belongs to image 1, but its own captions are second and third.
STUDENT = torch.tensor([[0.5, 0.6, 0.9, 0.1, 0.0, 0.0],
                        [0.4, 0.1, 0.8, 0.7, 0.2, 0.0],
                        [0.0, 0.3, 0.1, 0.2, 0.9, 0.8]])
PERFECT = torch.full((3, 6), -1.0)
PERFECT[torch.arange(3).repeat_interleave(2), torch.arange(6)] = 1.0


def test_student_mode_recall_from_embeddings():
    split = number_split()
    images = F.normalize(torch.eye(3, 4), dim=-1)
    texts = images[split.caption_image_index]
    texts[1] = F.normalize(torch.tensor([0.0, 1.0, 0.1, 0.0]), dim=0)  # caption 1 looks like image 1
    metrics = retrieval_metrics(student_scores(SplitEmbeddings(images, texts)), split.caption_image_index)
    assert metrics["tr_r1"] == pytest.approx(100.0)       # image 0 still has caption 0
    assert metrics["ir_r1"] == pytest.approx(500 / 6)     # caption 1 retrieves image 1


def test_teacher_all_pairs_returns_the_matrix_in_any_chunking():
    split = number_split()
    teacher = MatrixTeacher(STUDENT)
    for images_per_chunk, captions_per_chunk in [(1, 1), (2, 4), (16, 256)]:
        scores = teacher_all_pairs(teacher, split, images_per_chunk, captions_per_chunk, progress=False)
        assert torch.equal(scores, STUDENT)
    assert retrieval_metrics(teacher_all_pairs(MatrixTeacher(PERFECT), split, progress=False),
                             split.caption_image_index)["rsum"] == pytest.approx(600.0)


def test_teacher_pair_scores_keep_the_given_order():
    split = number_split()
    images, captions = torch.tensor([2, 0, 1, 0]), torch.tensor([5, 3, 0, 1])
    scores = teacher_pair_scores(MatrixTeacher(STUDENT), split, images, captions, pairs_per_call=3)
    assert torch.equal(scores, STUDENT[images, captions])


def test_teacher_binding_scores_own_and_twin_image():
    split = number_split()
    own, twin = teacher_binding_scores(MatrixTeacher(STUDENT), split)
    # captions 0..3 have twins (images 0 <-> 1): own = S[0,0], S[0,1], S[1,2], S[1,3]
    assert own.tolist() == pytest.approx([0.5, 0.6, 0.8, 0.7])
    assert twin.tolist() == pytest.approx([0.4, 0.1, 0.9, 0.1])
    assert binding_accuracy(own, twin) == pytest.approx(75.0)


def test_rerank_with_a_perfect_teacher_fixes_everything_inside_top_k():
    split = number_split()
    teacher = MatrixTeacher(PERFECT)
    student = retrieval_metrics(STUDENT, split.caption_image_index)
    assert student["tr_r1"] < 100.0
    result = rerank(STUDENT, teacher, split, k=3)
    assert result.metrics["tr_r1"] == pytest.approx(100.0)
    assert result.metrics["ir_r1"] == pytest.approx(100.0)
    # each pair proposed by both directions is scored once
    assert result.teacher_pairs == teacher.pairs_scored <= (3 + 6) * 3
    # k = 1 leaves the student's first choice in place: same R@1 as the student
    assert rerank(STUDENT, teacher, split, k=1).metrics["tr_r1"] == pytest.approx(student["tr_r1"])


def test_rerank_with_the_student_as_teacher_changes_nothing():
    split = number_split()
    result = rerank(STUDENT, MatrixTeacher(STUDENT), split, k=4)
    assert result.metrics == pytest.approx(retrieval_metrics(STUDENT, split.caption_image_index))


def test_rerank_rows_and_ranked_top_are_stable():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.9]])
    assert ranked_top(scores, 3).tolist() == [[3, 1, 2]]
    candidates = torch.tensor([[3, 1, 2, 0]])
    assert rerank_rows(candidates, torch.tensor([[0.0, 1.0, 0.0]]), 3).tolist() == [[1, 3, 2, 0]]


# ----------------------------------------------------------------------------------------------
# Split helpers

def test_split_from_batches_subset_and_twins():
    batch = {"pixels": torch.zeros(2, 3, 2, 2, dtype=torch.uint8), "captions": [["a", "b"], ["c"]],
             "image_ids": torch.tensor([10, 11]), "twin_ids": torch.tensor([11, -1]), "keys": ["x", "y"]}
    batch2 = {"pixels": torch.ones(1, 3, 2, 2, dtype=torch.uint8), "captions": [["d", "e"]],
              "image_ids": torch.tensor([12]), "twin_ids": torch.tensor([10]), "keys": ["z"]}
    split = EvalSplit.from_batches([batch, batch2], name="test")
    assert split.captions == ["a", "b", "c", "d", "e"]
    assert split.caption_image_index.tolist() == [0, 0, 1, 2, 2]
    assert split.twin_index.tolist() == [1, -1, 0]
    assert split.captions_of(2) == ["d", "e"]
    small = split.subset(2, captions_per_image=1)
    assert small.captions == ["a", "c"] and small.twin_index.tolist() == [1, -1]
    assert split.subset(1).twin_index.tolist() == [-1]  # twin outside the subset
    assert twin_gallery_index([5, 6], [6, 99]).tolist() == [1, -1]


def test_blocks_cover_every_row_once():
    for count in range(0, 9):
        for world in (1, 2, 3):
            rows = [r for rank in range(world) for r in range(*block_of_rank(count, rank, world))]
            assert rows == list(range(count))


# ----------------------------------------------------------------------------------------------
# Distributed teacher evaluation: 2 real gloo processes equal 1 rank

def _distributed_worker(rank, world_size, init_file, out_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        split, teacher = random_split(), ConvTeacher()
        scores = teacher_all_pairs(teacher, split, images_per_chunk=2, captions_per_chunk=5,
                                   progress=False)
        pairs = teacher_pair_scores(teacher, split, torch.tensor([6, 0, 3, 3, 1]),
                                    torch.tensor([0, 20, 4, 5, 1]), pairs_per_call=2)
        reranked = rerank(scores.flip(0), teacher, split, k=3, pairs_per_call=4)
        if rank == 0:
            torch.save({"scores": scores, "pairs": pairs, "rerank": reranked.metrics,
                        "by_image": reranked.ranked_captions_per_image}, out_file)
    finally:
        dist.destroy_process_group()


def test_two_rank_teacher_evaluation_equals_one_rank(tmp_path):
    out_file = tmp_path / "rank0.pt"
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    distributed = torch.load(out_file, weights_only=False)
    split, teacher = random_split(), ConvTeacher()
    scores = teacher_all_pairs(teacher, split, images_per_chunk=3, captions_per_chunk=7,
                               rank=0, world_size=1, progress=False)
    assert torch.allclose(distributed["scores"], scores, atol=1e-6)
    pairs = teacher_pair_scores(teacher, split, torch.tensor([6, 0, 3, 3, 1]),
                                torch.tensor([0, 20, 4, 5, 1]), rank=0, world_size=1)
    assert torch.allclose(distributed["pairs"], pairs, atol=1e-6)
    single = rerank(scores.flip(0), teacher, split, k=3, rank=0, world_size=1)
    assert distributed["rerank"] == pytest.approx(single.metrics)
    assert torch.equal(distributed["by_image"], single.ranked_captions_per_image)


# ----------------------------------------------------------------------------------------------
# Embedding cache

def test_embeddings_are_cached_and_invalidated(tmp_path):
    split, student = random_split(), CharStudent()
    first = embed_split(student, split, batch_size=4, cache_dir=tmp_path)
    calls = (student.image_calls, student.text_calls)
    assert not first.from_cache and calls == (2, 6)  # 7 images, 21 captions in batches of 4
    again = embed_split(student, split, batch_size=4, cache_dir=tmp_path)
    assert again.from_cache and (student.image_calls, student.text_calls) == calls
    assert torch.equal(again.images, first.images) and torch.equal(again.texts, first.texts)

    with torch.no_grad():
        student.image_proj.weight.add_(0.1)  # new weights -> new key
    changed_model = embed_split(student, split, batch_size=4, cache_dir=tmp_path)
    assert not changed_model.from_cache and student.image_calls == calls[0] + 2

    other_split = random_split(seed=1)  # same shape, other content
    assert embedding_cache_path(tmp_path, other_split, student) != embedding_cache_path(tmp_path, split,
                                                                                         student)
    assert not embed_split(student, other_split, batch_size=4, cache_dir=tmp_path).from_cache
    assert len(list(tmp_path.glob("*.pt"))) == 3


def test_embeddings_match_direct_encoding_and_restore_training_flag():
    split, student = random_split(), CharStudent()
    student.train()
    embeddings = embed_split(student, split, batch_size=5)
    assert student.training
    direct = student.encode_text(**student.tokenize(split.captions[3:4]))
    assert torch.allclose(embeddings.texts[3], direct[0], atol=1e-6)
    assert embeddings.images.shape == (7, 8) and embeddings.texts.shape == (21, 8)


# ----------------------------------------------------------------------------------------------
# tools/evaluate.py end to end (tiny preset models, tiny shards made here)

@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path_factory.mktemp("shards")
    subprocess.run([sys.executable, str(repo / "tools" / "make_shards.py"), "--source", "synthetic",
                    "--out", str(out), "--train-images", "20", "--val-images", "0",
                    "--test-images", "12"], check=True, capture_output=True, cwd=repo)
    return out


def last_json_line(text):
    import json
    return json.loads(text.strip().splitlines()[-1])


def test_evaluate_cli_student_and_rerank(tiny_shards, tmp_path, capsys):
    from tools.evaluate import main
    common = ["--shards", str(tiny_shards), "--split", "test", "--student", "student-tiny",
              "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(common + ["--mode", "student", "--max-images", "8",
                          "--tensorboard", str(tmp_path / "tb")]) == 0
    result = last_json_line(capsys.readouterr().out)
    for key in ("mode", "images", "captions", "tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10",
                "rsum", "seconds", "binding_acc", "max_images_note"):
        assert key in result, key
    assert result["images"] == 8 and result["captions"] == 40
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

    assert main(common + ["--mode", "rerank", "--teacher", "film-tiny", "--rerank-k", "4"]) == 0
    output = capsys.readouterr().out
    result = last_json_line(output)
    assert result["mode"] == "rerank" and result["images"] == 12 and "max_images_note" not in result
    assert "NOTE" not in output and result["teacher_pairs"] <= (12 + 60) * 4
    assert result["binding_acc"] == result["teacher_binding_acc"]


def test_evaluate_cli_teacher_mode_and_bad_paths(tiny_shards, tmp_path, capsys):
    from tools.evaluate import main
    assert main(["--shards", str(tiny_shards), "--teacher", "film-tiny", "--mode", "teacher",
                 "--max-images", "4", "--no-progress"]) == 0
    result = last_json_line(capsys.readouterr().out)
    assert result["mode"] == "teacher" and result["teacher_pairs"] == 4 * 20
    assert main(["--shards", str(tmp_path / "missing"), "--student", "student-tiny"]) == 2
    assert main(["--shards", str(tiny_shards), "--student", str(tmp_path / "no-model")]) == 2
    assert main(["--shards", str(tiny_shards), "--mode", "rerank", "--student", "student-tiny"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("evaluate: ") for line in errors)



def test_film_teacher_cached_sides_score_like_its_forward(tiny_shards):
    """The cached-side path (each image and caption encoded once per gallery) gives the scores the
    teacher's own forward gives, for all pairs and for a scattered list of pairs."""
    from train.eval_split import read_eval_split
    from train.models.presets import build_teacher
    teacher = build_teacher("film-tiny", tiny_shards / "tokenizer").eval()
    assert teacher.splits_unimodal
    split = read_eval_split(tiny_shards, "test", image_size=teacher.image_size)
    with torch.no_grad():
        encoded = teacher.tokenize(split.captions)
        image_index, text_index = (t.flatten() for t in torch.meshgrid(
            torch.arange(split.num_images), torch.arange(split.num_captions), indexing="ij"))
        direct = teacher(teacher.preprocess_images(split.pixels), encoded["input_ids"],
                         encoded["attention_mask"], image_index=image_index, text_index=text_index)
    direct = direct.reshape(split.num_images, split.num_captions)
    all_pairs = teacher_all_pairs(teacher, split, images_per_chunk=5, captions_per_chunk=7, progress=False)
    torch.testing.assert_close(all_pairs, direct, atol=1e-5, rtol=1e-5)
    images, captions = torch.tensor([11, 0, 3, 3, 7, 0]), torch.tensor([0, 59, 4, 17, 17, 2])
    pairs = teacher_pair_scores(teacher, split, images, captions, pairs_per_call=4)
    torch.testing.assert_close(pairs, direct[images, captions], atol=1e-5, rtol=1e-5)


def test_ranked_top_equals_a_full_stable_sort_even_with_ties():
    """ranked_top uses topk for speed; with many ties (also across the depth boundary) it must still
    give exactly what a stable sort of the whole row gives."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        rows, columns, depth = (int(torch.randint(1, 30, (1,), generator=generator)) for _ in range(3))
        scores = torch.randint(0, 4, (rows, columns), generator=generator).float()
        expected = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :depth]
        assert torch.equal(ranked_top(scores, depth), expected)


def test_film_cached_sides_with_nothing_on_this_rank(tiny_shards, monkeypatch):
    """A gallery smaller than the world leaves a rank with no images (all pairs) or no pairs: its
    cached-side path must encode nothing and return an empty block, not fail."""
    from train import evaluation
    from train.eval_split import read_eval_split
    from train.models.presets import build_teacher
    teacher = build_teacher("film-tiny", tiny_shards / "tokenizer").eval()
    split = read_eval_split(tiny_shards, "test", image_size=teacher.image_size).subset(1, 2)
    blocks = []
    monkeypatch.setattr(evaluation, "gather_blocks", lambda local, total, world: blocks.append(local) or
                        torch.zeros(total, *local.shape[1:]))
    teacher_all_pairs(teacher, split, rank=1, world_size=2, progress=False)
    teacher_pair_scores(teacher, split, torch.tensor([0]), torch.tensor([1]), rank=1, world_size=2)
    assert [tuple(block.shape) for block in blocks] == [(0, 2), (0,)]
