"""The FiLM teacher under a real ZeRO-3 inference engine on 2 gloo ranks scores like the plain
module, also when the ranks score different numbers of pairs (the slice count is agreed over the
ranks, or the blocks' parameter gathers would not match and the ranks would hang)."""
import copy
import os

import torch
import torch.multiprocessing as mp

from tests.fixtures import free_port
from tests.test_models import make_tokenizer

PAIRS_PER_RANK = (600, 100)  # 3 slices of 256 on rank 0, 1 on rank 1 without agreement


def _worker(rank, world_size, port, tokenizer_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from train import comm
    from train import engine as ds_engine
    from train.models.presets import build_teacher
    comm.init()
    try:
        torch.manual_seed(0)
        teacher = build_teacher("film-tiny", tokenizer_dir).eval()
        reference = copy.deepcopy(teacher)
        student_ds = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": 4 * world_size}
        engine = ds_engine.build_teacher_engine(teacher, student_ds, stage=3)
        generator = torch.Generator().manual_seed(rank)
        pixels = torch.randint(0, 256, (12, 3, 64, 64), dtype=torch.uint8, generator=generator)
        encoded = teacher.tokenize(["a red circle left of a blue square"] * 5 + ["a green square"] * 5)
        pairs = PAIRS_PER_RANK[rank]
        image_index = torch.randint(0, 12, (pairs,), generator=generator)
        text_index = torch.randint(0, 10, (pairs,), generator=generator)
        pixel_values = teacher.preprocess_images(pixels)
        with torch.no_grad():
            partitioned = engine(pixel_values, encoded["input_ids"], encoded["attention_mask"],
                                 image_index=image_index, text_index=text_index)
            plain = reference(pixel_values, encoded["input_ids"], encoded["attention_mask"],
                              image_index=image_index, text_index=text_index)
        local = sum(p.ds_tensor.numel() for p in teacher.parameters())
        total = sum(p.ds_numel for p in teacher.parameters())
        torch.save({"partitioned": partitioned, "plain": plain, "local": local, "total": total},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_zero3_film_teacher_scores_unequal_pair_counts_like_the_plain_module(tmp_path):
    tokenizer_dir = make_tokenizer(tmp_path / "tokenizer")
    mp.spawn(_worker, args=(2, free_port(), str(tokenizer_dir), str(tmp_path)), nprocs=2, join=True)
    for rank, pairs in enumerate(PAIRS_PER_RANK):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["partitioned"].shape == (pairs,)
        torch.testing.assert_close(result["partitioned"], result["plain"], atol=1e-5, rtol=1e-5)
        assert result["local"] <= result["total"] // 2 + 1000  # partitioned, not replicated
