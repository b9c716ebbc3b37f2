"""Several ranks reproduce the 1-rank loss and gradient on the same global batch.

The trainer averages gradients over ranks (DeepSpeed does); with local mean losses and the autograd
all-gather, that average must equal the 1-rank gradient on the global batch (see train/distill/dcd.py).
Checked twice: with a fake thread group (no processes, any world size) and with REAL 2-rank gloo
process groups. Raw pixels and token ids differ per row and the fake teacher is a fixed function of
them, so a wrongly fetched candidate row changes the loss.
"""
import copy
import os
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from train.distill.dcd import DCDConfig, contrastive_loss, dcd_loss
from train.distill.gather import (Collectives, SingleProcess, TorchDistributed, fetch_pool_rows,
                                  gathered_offset, local_logits, pad_to_common_length)

ATOL = 1e-5
VOCAB, PIXEL_SIZE, EMB = 23, 4, 8


# ---------------------------------------------------------------------------------------------------
# A tiny student, a fixed fake teacher, a global batch.

class TinyStudent(nn.Module):
    """Linear towers on raw uint8 pixels and on mean token embeddings; a learnable logit scale."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(3 * PIXEL_SIZE * PIXEL_SIZE, EMB)
        self.token = nn.Embedding(VOCAB, EMB)
        self.text = nn.Linear(EMB, EMB)
        self.log_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, pixels, input_ids, attention_mask):
        image = self.image(pixels.flatten(1).double() / 255.0)
        mask = attention_mask.unsqueeze(2).double()
        text = self.text((self.token(input_ids) * mask).sum(1) / mask.sum(1))
        return F.normalize(image, dim=1), F.normalize(text, dim=1), self.log_scale.exp().clamp(max=100.0)


_STUDENT_WEIGHTS = {}


def make_student(seed=0):
    """The same weights every time, also when fake ranks build it in parallel threads: the global
    RNG is shared by threads, so the weights are drawn once and copied."""
    if seed not in _STUDENT_WEIGHTS:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            _STUDENT_WEIGHTS[seed] = TinyStudent().double().state_dict()
    student = TinyStudent().double()
    student.load_state_dict(_STUDENT_WEIGHTS[seed])
    return student


make_student()  # drawn at import, in the main thread, before any fake rank starts


def fake_teacher(images, texts, image_index, text_index):
    """A fixed random bilinear scorer of raw pixels and token ids; honours the attention mask."""
    g = torch.Generator().manual_seed(1234)
    project_image = torch.randn(3 * PIXEL_SIZE * PIXEL_SIZE, 6, generator=g, dtype=torch.float64)
    token_table = torch.randn(VOCAB, 6, generator=g, dtype=torch.float64)
    bilinear = torch.randn(6, 6, generator=g, dtype=torch.float64)
    image_features = (images.flatten(1).double() / 255.0) @ project_image
    mask = texts["attention_mask"].unsqueeze(2).double()
    text_features = (token_table[texts["input_ids"]] * mask).sum(1) / mask.sum(1)
    return 3.0 * ((image_features[image_index] @ bilinear) * text_features[text_index]).sum(1)


def make_global_batch(world_size, rows_per_rank, seed=0):
    """Per-rank batches as a collate would make them: token tensors padded to each rank's longest."""
    g = torch.Generator().manual_seed(seed)
    G = world_size * rows_per_rank
    pixels = torch.randint(0, 256, (G, 3, PIXEL_SIZE, PIXEL_SIZE), generator=g, dtype=torch.uint8)
    image_ids = torch.arange(100, 100 + G)
    image_ids[-1] = image_ids[1]  # the same image drawn on two ranks: a second positive, never a negative
    pixels[-1] = pixels[1]
    lengths = torch.randint(2, 5, (G,), generator=g)
    lengths[-1] = 8  # the last rank has longer captions: ranks must pad to a common length
    input_ids = torch.randint(1, VOCAB, (G, 8), generator=g)
    attention_mask = (torch.arange(8).view(1, -1) < lengths.view(-1, 1)).long()
    input_ids = input_ids * attention_mask
    ranks = []
    for r in range(world_size):
        rows = slice(r * rows_per_rank, (r + 1) * rows_per_rank)
        longest = int(lengths[rows].max())
        ranks.append(dict(pixels=pixels[rows], image_ids=image_ids[rows],
                          input_ids=input_ids[rows, :longest], attention_mask=attention_mask[rows, :longest]))
    return ranks


def merge(ranks):
    """The 1-rank batch: every rank's rows, token tensors padded with 0 to the longest."""
    longest = max(b["input_ids"].shape[1] for b in ranks)
    pad = lambda t: F.pad(t, (0, longest - t.shape[1]))  # noqa: E731
    return dict(pixels=torch.cat([b["pixels"] for b in ranks]), image_ids=torch.cat([b["image_ids"] for b in ranks]),
                input_ids=torch.cat([pad(b["input_ids"]) for b in ranks]),
                attention_mask=torch.cat([pad(b["attention_mask"]) for b in ranks]))


CONFIGS = {
    "contrastive": None,
    "dcd_entropy_kl_all_to_all": DCDConfig(candidates=4, hard_negatives=2, weighting="entropy", kd_loss="kl",
                                           candidate_transport="all_to_all"),
    "dcd_wsl_mse_all_gather": DCDConfig(candidates=5, hard_negatives=3, weighting="wsl", kd_loss="mse",
                                        kd_temperature=2.0, alpha=0.5, candidate_transport="all_gather"),
    "dcd_t2i_only_none": DCDConfig(candidates=3, hard_negatives=3, weighting="none", directions=("t2i",),
                                   kd_temperature=4.0),
}


def step(student, batch, comm, cfg):
    """One rank's loss and parameter gradients (no averaging)."""
    student.zero_grad()
    image_emb, text_emb, scale = student(batch["pixels"], batch["input_ids"], batch["attention_mask"])
    if cfg is None:
        loss, logs = contrastive_loss(image_emb, text_emb, scale, batch["image_ids"], comm)
    else:
        texts = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        loss, logs = dcd_loss(image_emb, text_emb, scale, batch["image_ids"], batch["pixels"], texts,
                              fake_teacher, comm, cfg)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in student.named_parameters()}
    kept = {k: (v.item() if torch.is_tensor(v) and v.dim() == 0 else v) for k, v in logs.items() if k != "weights"}
    return loss.item(), grads, kept


def reference(world_size, rows_per_rank):
    """1-rank loss and gradient on the merged global batch, for every config."""
    batch = merge(make_global_batch(world_size, rows_per_rank))
    return {name: step(make_student(), batch, SingleProcess(), cfg) for name, cfg in CONFIGS.items()}


def assert_ranks_match_reference(per_rank, ref):
    """per_rank: list over ranks of {config: (loss, grads, logs)}."""
    for name in CONFIGS:
        ref_loss, ref_grads, ref_logs = ref[name]
        mean_loss = sum(r[name][0] for r in per_rank) / len(per_rank)
        assert mean_loss == pytest.approx(ref_loss, abs=ATOL), name
        for param, ref_grad in ref_grads.items():
            mean_grad = sum(r[name][1][param] for r in per_rank) / len(per_rank)
            assert torch.allclose(mean_grad, ref_grad, atol=ATOL), (name, param, (mean_grad - ref_grad).abs().max())
        for r in per_rank:
            assert r[name][2]["pool_size"] == ref_logs["pool_size"]
            assert r[name][2]["bytes_moved"] > 0
        assert ref_logs["bytes_moved"] == 0
        if name != "contrastive":
            assert ref_logs["bytes_moved_candidates"] == 0
            assert all(r[name][2]["bytes_moved_candidates"] > 0 for r in per_rank)


# ---------------------------------------------------------------------------------------------------
# Fake collectives: W threads in one process, exchanging through a barrier. The gather's backward
# sums each slice's gradient over the threads, as torch.distributed.nn.functional.all_gather does.

class ThreadGroup:
    def __init__(self, world_size):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.slots = [None] * world_size

    def exchange(self, rank, value):
        """Every thread contributes a value and gets every thread's, in rank order."""
        self.barrier.wait()
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        return values


class _ThreadAllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, tensor):
        ctx.comm = comm
        return tuple(t.clone() for t in comm.group.exchange(comm.rank, tensor.detach()))

    @staticmethod
    def backward(ctx, *grads):
        comm = ctx.comm
        every_rank = comm.group.exchange(comm.rank, [g.clone() for g in grads])
        return None, sum(grads_of_r[comm.rank] for grads_of_r in every_rank)


class ThreadCollectives(Collectives):
    def __init__(self, group, rank):
        super().__init__()
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def _all_gather_with_grad(self, tensor):
        return list(_ThreadAllGather.apply(self, tensor))

    def _all_gather_no_grad(self, tensor):
        return [t.clone() for t in self.group.exchange(self.rank, tensor)]

    def _all_reduce_sum(self, tensor):
        return sum(t.clone() for t in self.group.exchange(self.rank, tensor))

    def _all_to_all(self, chunks, recv_rows):
        every_rank = self.group.exchange(self.rank, chunks)
        received = [every_rank[r][self.rank].clone() for r in range(self.world_size)]
        assert [c.shape[0] for c in received] == list(recv_rows)
        return received


def run_threads(world_size, rows_per_rank, fn):
    group = ThreadGroup(world_size)
    results, errors = [None] * world_size, []

    def target(rank):
        try:
            results[rank] = fn(ThreadCollectives(group, rank), rank)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("world_size,rows_per_rank", [(2, 5), (3, 4)])
def test_fake_thread_ranks_match_one_rank(world_size, rows_per_rank):
    ref = reference(world_size, rows_per_rank)
    batches = make_global_batch(world_size, rows_per_rank)

    def one_rank(comm, rank):
        student = make_student()
        return {name: step(student, batches[rank], comm, cfg) for name, cfg in CONFIGS.items()}

    assert_ranks_match_reference(run_threads(world_size, rows_per_rank, one_rank), ref)


def test_fetch_pool_rows_both_transports_and_padding():
    batches = make_global_batch(2, 3)
    full = merge(batches)
    wanted = [torch.tensor([5, 0, 3]), torch.tensor([], dtype=torch.long)]  # rank 1 asks for nothing

    def one_rank(comm, rank):
        texts = pad_to_common_length({"input_ids": batches[rank]["input_ids"]}, comm)
        out = {}
        for transport in ("all_to_all", "all_gather"):
            comm.take_bytes_moved()
            rows = fetch_pool_rows({"pixels": batches[rank]["pixels"], **texts}, wanted[rank], comm, transport)
            out[transport] = (rows, comm.take_bytes_moved())
        return out

    results = run_threads(2, 3, one_rank)
    for rank, result in enumerate(results):
        for transport, (rows, _) in result.items():
            assert torch.equal(rows["pixels"], full["pixels"][wanted[rank]])
            assert torch.equal(rows["input_ids"], full["input_ids"][wanted[rank]])
    # all_to_all moves only what is asked for: rank 0 receives rows 3 and 5 (rank 1's), rank 1 nothing.
    row_bytes = 3 * PIXEL_SIZE * PIXEL_SIZE + 8 * 8
    assert results[0]["all_to_all"][1]["candidates"] == 2 * row_bytes
    assert results[1]["all_to_all"][1]["candidates"] == 0
    assert results[1]["all_gather"][1]["candidates"] == 3 * row_bytes


def test_local_logits_and_offsets():
    queries, keys = torch.randn(3, 4), torch.randn(6, 4)
    assert torch.allclose(local_logits(queries, keys, 2.0), 2.0 * queries @ keys.t())
    assert local_logits(queries, keys, torch.tensor(1.0)).shape == (3, 6)
    assert gathered_offset(0, 5) == 0 and gathered_offset(3, 5) == 15


# ---------------------------------------------------------------------------------------------------
# REAL 2-rank gloo process groups.

def _gloo_worker(rank, world_size, rows_per_rank, init_file, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        comm = TorchDistributed()
        batch = make_global_batch(world_size, rows_per_rank)[rank]
        student = make_student()
        results = {name: step(student, batch, comm, cfg) for name, cfg in CONFIGS.items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()  # docs/platform_notes.md: avoids gloo's teardown abort


def test_real_gloo_two_ranks_match_one_rank(tmp_path):
    world_size, rows_per_rank = 2, 5
    ref = reference(world_size, rows_per_rank)
    mp.spawn(_gloo_worker, args=(world_size, rows_per_rank, str(tmp_path / "init"), str(tmp_path)),
             nprocs=world_size, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    assert_ranks_match_reference(per_rank, ref)


LOG_KEYS = {"loss", "loss_itc", "loss_kd", "loss_hard", "weight_mean", "weight_std", "weights", "teacher_margin",
            "teacher_accuracy", "pool_size", "teacher_pairs", "bytes_moved", "bytes_moved_candidates"}


@pytest.mark.parametrize("negatives_from", ["teacher", "random", "random_pool"])
def test_ablations_logs_and_one_teacher_call_per_step_on_fake_ranks(negatives_from):
    world_size, rows_per_rank = 2, 8
    batches = make_global_batch(world_size, rows_per_rank)

    def one_rank(comm, rank):
        student = make_student()
        calls = []

        def counting_teacher(*args):
            calls.append(1)
            return fake_teacher(*args)

        out = {}
        for transport in ("all_to_all", "all_gather"):
            cfg = DCDConfig(candidates=3, hard_negatives=2, distill_queries=1, negatives_from=negatives_from,
                            candidate_transport=transport)
            b = batches[rank]
            image_emb, text_emb, scale = student(b["pixels"], b["input_ids"], b["attention_mask"])
            texts = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            loss, logs = dcd_loss(image_emb, text_emb, scale, b["image_ids"], b["pixels"], texts, counting_teacher,
                                  comm, cfg, generator=torch.Generator().manual_seed(rank))
            loss.backward()
            out[transport] = (loss.item(), logs)
        return out, len(calls)

    for out, teacher_calls in run_threads(world_size, rows_per_rank, one_rank):
        assert teacher_calls == 2  # once per dcd_loss call, on every rank (a ZeRO-3 teacher needs it)
        for transport, (loss, logs) in out.items():
            assert torch.isfinite(torch.tensor(loss))
            assert LOG_KEYS <= set(logs)
            assert ("teacher_student_agreement" in logs) == (negatives_from == "teacher")
            assert logs["weights"].shape == (2,)  # one distilled query per direction
            assert logs["pool_size"] == world_size * rows_per_rank
        # One query per direction, 3 candidates: all_to_all moves a few rows, all_gather the whole batch.
        assert out["all_to_all"][1]["bytes_moved_candidates"] < out["all_gather"][1]["bytes_moved_candidates"]


def test_distill_weight_scales_only_the_distillation_terms():
    """The trainer's ramp-in: distill_weight multiplies alpha * KD + (1 - alpha) * hard, never InfoNCE."""
    batch = merge(make_global_batch(1, 6))
    texts = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    losses = {}
    for weight in (0.0, 0.25, 1.0):
        student = make_student()
        image_emb, text_emb, scale = student(batch["pixels"], batch["input_ids"], batch["attention_mask"])
        losses[weight], logs = dcd_loss(image_emb, text_emb, scale, batch["image_ids"], batch["pixels"],
                                        texts, fake_teacher, SingleProcess(), CONFIGS["dcd_entropy_kl_all_to_all"],
                                        distill_weight=weight)
    itc = logs["loss_itc"]
    distill = logs["loss"] - itc
    assert distill.abs() > 1e-3  # the check below means something
    torch.testing.assert_close(losses[0.0].detach(), itc)
    torch.testing.assert_close(losses[0.25].detach(), itc + 0.25 * distill)
