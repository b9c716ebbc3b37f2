"""Stored teacher signals give the online objective: same losses and gradients for the same batch and
candidates, on 1 rank and on 2 (thread) ranks, for every objective variant.

The split is the global batch itself (one caption per image), the proposer is the student being
trained, and the table is made by the scoring pass's own functions (exact_top_candidates,
signal_pairs, table_from_scores) with the deterministic fake teacher: then the proposer's top-M of
the split are exactly the student's top-M of the pool, and the stored scores the teacher's.
"""
import pytest
import torch

from tests.test_dcd_distributed import (ATOL, SingleProcess, fake_teacher, make_global_batch, make_student,
                                        merge, run_threads)
from train.distill.dcd import DCDConfig, dcd_loss
from train.distill.stored import (EmbeddedCandidates, embedded_candidate_rows, exact_top_candidates, signal_pairs,
                                  stored_candidates_in_pool, stored_dcd_loss, table_from_scores)

CONFIGS = {
    "published_entropy_kl": DCDConfig(candidates=4, hard_negatives=2),
    "listwise_wsl": DCDConfig(candidates=5, hard_negatives=3, objective="listwise", weighting="wsl"),
    "denoised_margin": DCDConfig(candidates=4, hard_negatives=3, objective="denoised", positive_margin=0.5,
                                 false_negative_margin=0.3),
    "margin_mse_t2i_few_queries": DCDConfig(candidates=3, hard_negatives=2, objective="margin",
                                            directions=("t2i",), distill_queries=2, weighting="none"),
}


def unique_image_batch(world_size, rows_per_rank):
    """make_global_batch with every image distinct (the split holds each image once)."""
    batches = make_global_batch(world_size, rows_per_rank)
    g = torch.Generator().manual_seed(7)
    for r, b in enumerate(batches):
        b["image_ids"] = torch.arange(r * rows_per_rank, (r + 1) * rows_per_rank) + 100
        b["pixels"] = torch.randint(0, 256, b["pixels"].shape, generator=g, dtype=torch.uint8)
        b["caption_rows"] = torch.arange(r * rows_per_rank, (r + 1) * rows_per_rank)
    return batches


def score_split(batches, M):
    """The scoring pass on the split made of the global batch: proposer = the student."""
    split = merge(batches)
    G = split["pixels"].shape[0]
    with torch.no_grad():
        images, texts, _ = make_student()(split["pixels"], split["input_ids"], split["attention_mask"])
    rows = torch.arange(G)
    i2t, _ = exact_top_candidates(images, texts, rows, rows, M, chunk=3)
    t2i, _ = exact_top_candidates(texts, images, rows, rows, M, chunk=3)
    pair_images, pair_captions = signal_pairs(i2t, t2i, rows)
    tokens = {"input_ids": split["input_ids"], "attention_mask": split["attention_mask"]}
    scores = fake_teacher(split["pixels"], tokens, pair_images, pair_captions)
    return table_from_scores(split["image_ids"], rows, i2t, t2i, scores, dtype=torch.float64)


def grads_of(student, loss):
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in student.named_parameters()}


def online_and_stored(batch, comm, cfg, table):
    out = {}
    for mode in ("online", "stored"):
        student = make_student()
        image_emb, text_emb, scale = student(batch["pixels"], batch["input_ids"], batch["attention_mask"])
        if mode == "online":
            texts = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            loss, logs = dcd_loss(image_emb, text_emb, scale, batch["image_ids"], batch["pixels"], texts,
                                  fake_teacher, comm, cfg)
        else:
            loss, logs = stored_dcd_loss(image_emb, text_emb, scale, batch["image_ids"], batch["caption_rows"],
                                         table, comm, cfg)
        out[mode] = (loss.item(), grads_of(student, loss), logs)
    return out


def assert_same(result, name):
    (online_loss, online_grads, online_logs), (stored_loss, stored_grads, stored_logs) = \
        result["online"], result["stored"]
    assert stored_loss == pytest.approx(online_loss, abs=ATOL), name
    for param, grad in online_grads.items():
        assert torch.allclose(stored_grads[param], grad, atol=ATOL), (name, param)
    for key in ("loss_kd", "loss_hard", "weight_mean", "teacher_student_agreement"):
        if key in online_logs:
            assert float(stored_logs[key]) == pytest.approx(float(online_logs[key]), abs=ATOL), (name, key)
    assert float(stored_logs["stored_candidates_in_pool"]) == 1.0
    assert stored_logs["teacher_pairs"] == 0  # no teacher call in stored mode


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stored_equals_online_on_one_rank(name):
    cfg = CONFIGS[name]
    batches = unique_image_batch(1, 9)
    assert_same(online_and_stored(batches[0], SingleProcess(), cfg, score_split(batches, cfg.candidates)), name)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stored_equals_online_on_two_ranks(name):
    cfg = CONFIGS[name]
    batches = unique_image_batch(2, 5)
    table = score_split(batches, cfg.candidates)
    results = run_threads(2, 5, lambda comm, rank: online_and_stored(batches[rank], comm, cfg, table))
    for result in results:
        assert_same(result, name)


def test_stored_candidates_absent_from_the_pool_are_left_out():
    """A table over a bigger split: candidates outside this pool score -inf and are masked, the loss
    stays finite, and the fraction present is logged."""
    batches = unique_image_batch(1, 12)
    table = score_split(batches, 6)
    small = {k: v[:6] for k, v in batches[0].items()}
    cfg = DCDConfig(candidates=6, hard_negatives=3)
    student = make_student()
    image_emb, text_emb, scale = student(small["pixels"], small["input_ids"], small["attention_mask"])
    loss, logs = stored_dcd_loss(image_emb, text_emb, scale, small["image_ids"], small["caption_rows"], table,
                                 SingleProcess(), cfg)
    assert torch.isfinite(loss)
    assert 0.0 < float(logs["stored_candidates_in_pool"]) < 1.0
    proposals, scored, teacher = stored_candidates_in_pool(torch.arange(6), torch.arange(6), torch.arange(6),
                                                           table, cfg)
    absent = proposals["i2t"] < 0
    assert bool(absent.any()) and bool((scored["i2t"][absent] == 0).all())
    start, m = teacher.spans["i2t"]
    assert bool(torch.isinf(teacher.pair_logits[start:start + 6 * m].view(6, m)[absent]).all())


def test_exact_top_candidates_matches_a_full_sort_and_excludes_own_image():
    g = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(7, 4, generator=g), torch.randn(11, 4, generator=g)
    query_owner, key_owner = torch.arange(7), torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    index, values = exact_top_candidates(queries, keys, query_owner, key_owner, 4, chunk=2)
    full = (queries @ keys.t()).masked_fill(query_owner.view(-1, 1) == key_owner.view(1, -1), float("-inf"))
    assert torch.equal(index, full.topk(4, dim=1).indices)
    assert torch.allclose(values, full.topk(4, dim=1).values)
    assert not bool((key_owner[index] == query_owner.view(-1, 1)).any())


def _gloo_stored_worker(rank, world_size, init_file, out_dir):
    import os
    import torch.distributed as dist
    from train.distill.gather import TorchDistributed
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        cfg = CONFIGS["published_entropy_kl"]
        batches = unique_image_batch(world_size, 5)
        result = online_and_stored(batches[rank], TorchDistributed(), cfg, score_split(batches, cfg.candidates))
        torch.save({mode: (loss, grads) for mode, (loss, grads, _) in result.items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_stored_equals_online_on_two_real_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_gloo_stored_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["stored"][0] == pytest.approx(result["online"][0], abs=ATOL)
        for param, grad in result["online"][1].items():
            assert torch.allclose(result["stored"][1][param], grad, atol=ATOL), param


def test_embedded_candidates_give_the_terms_of_a_pool_that_holds_them():
    """Stored candidates absent from a 6-row pool, embedded beside it by the same student, give the
    distilled queries the KD and hard-negative terms that a 12-row pool holding them all gives; not
    embedded, some are left out."""
    batches = unique_image_batch(1, 12)
    table = score_split(batches, 6)
    cfg = DCDConfig(candidates=6, hard_negatives=3, distill_queries=3)
    big = batches[0]
    small = {k: v[:6] for k, v in big.items()}
    rows = embedded_candidate_rows(table, torch.arange(3), torch.arange(3), cfg.directions, 6, 3)
    student = make_student()

    def terms(batch, embedded_rows=None):
        image_emb, text_emb, scale = student(batch["pixels"], batch["input_ids"], batch["attention_mask"])
        embedded = None
        if embedded_rows is not None:
            image_c, text_c, _ = student(big["pixels"][embedded_rows["t2i"]], big["input_ids"][embedded_rows["i2t"]],
                                         big["attention_mask"][embedded_rows["i2t"]])
            embedded = EmbeddedCandidates(embedded_rows["i2t"], text_c, embedded_rows["t2i"], image_c)
        _, logs = stored_dcd_loss(image_emb, text_emb, scale, batch["image_ids"], batch["caption_rows"], table,
                                  SingleProcess(), cfg, embedded=embedded)
        return logs

    whole, embedded, alone = terms(big), terms(small, rows), terms(small)
    assert float(whole["stored_candidates_in_pool"]) == 1.0
    # every kept candidate is found (the ones the teacher ranks below the top 3 need not be)
    for key in ("loss_kd", "loss_hard", "teacher_margin"):
        assert float(embedded[key]) == pytest.approx(float(whole[key]), abs=ATOL), key
    assert float(alone["stored_candidates_in_pool"]) < float(embedded["stored_candidates_in_pool"])
    assert float(alone["loss_kd"]) != pytest.approx(float(whole["loss_kd"]), abs=ATOL)


def test_candidates_without_gradient_embed_alike_and_keep_the_batch_gradient():
    """--stored-candidate-grad false: the candidates' embeddings are the same numbers, carry no
    gradient, and the batch's own gradient is what it is with them differentiable."""
    from types import SimpleNamespace
    from train.objectives import StoredDistillObjective

    torch.manual_seed(0)
    image_tower, text_tower = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)

    def embed(batch, timer):  # the student's towers: images and captions apart
        return image_tower(batch["pixels"]), text_tower(batch["input_ids"]), torch.tensor(10.0)

    batch = {"pixels": torch.randn(3, 6), "input_ids": torch.randn(3, 5), "attention_mask": torch.ones(3, 5),
             "candidate_pixels": torch.randn(2, 6), "candidate_input_ids": torch.randn(4, 5),
             "candidate_attention_mask": torch.ones(4, 5),
             "candidate_caption_rows": torch.arange(4), "candidate_image_rows": torch.arange(2)}
    outputs = {}
    for with_grad in (True, False):
        objective = SimpleNamespace(embedded=True, embed=embed,
                                    cfg=SimpleNamespace(distill=SimpleNamespace(stored_candidate_grad=with_grad)))
        image_emb, text_emb, _, candidates = StoredDistillObjective.embed_with_candidates(objective, batch, None)
        assert candidates.text_emb.requires_grad is with_grad and candidates.image_emb.requires_grad is with_grad
        assert image_emb.shape == (3, 4) and text_emb.shape == (3, 4) and candidates.text_emb.shape == (4, 4)
        image_tower.zero_grad()
        (image_emb.square().sum() + text_emb.sum()).backward()
        outputs[with_grad] = (image_emb.detach(), candidates.text_emb.detach(), candidates.image_emb.detach(),
                              image_tower.weight.grad.clone())
    for kept, detached in zip(outputs[True], outputs[False]):
        assert torch.allclose(kept, detached, atol=1e-6)
