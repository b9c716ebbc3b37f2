"""The process group and the plain collectives, in one place.

    rank, world = comm.init()     # start the group when launched with several ranks; (0, 1) alone
    ...
    comm.shutdown()               # barrier, then destroy the group (gloo needs it at exit)

Everything else that needs the other ranks goes through here: `context` (rank, world size),
`barrier`, `all_reduce_max` / `all_reduce_sum` of a tensor, `max_over_ranks` (a count every rank
agrees on), `gather_blocks` (every rank's block of rows, on every rank). Each works without a
process group (one process) and then returns its input. The DCD loss's own collectives (autograd
all-gather, all-to-all, byte counts) are the `Collectives` of train/distill/gather.py: its
`TorchDistributed` runs over the group started here, and tests give the loss a thread-backed fake.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

from train import failure

# torch 2.13 marks all_gather_into_tensor / reduce_scatter_tensor (called by DeepSpeed) and the
# autograd all_gather of torch.distributed.nn (whose replacement is private) deprecated: one warning
# per call and rank would bury the log of every job that uses these collectives.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.")
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")


def import_deepspeed():
    """Import DeepSpeed with its CPU shared-memory all-reduce op marked unavailable.

    On a CPU accelerator DeepSpeed JIT-compiles that op (g++, 30-40 s) the first time any process
    group starts on a fresh machine. It serves only `inference_all_reduce` (DeepSpeed-Inference
    tensor parallelism), which neither training nor evaluation calls. In CI the compile stalled past
    a test's 10-minute limit, and the killed build left every later launch failing on a missing .so;
    and every run killed mid-way left the op's 69 MB per rank in /dev/shm (22 GB on this machine
    after a day of runs, then the OOM killer). So DeepSpeed stays on its plain gloo/NCCL collectives
    here. CUDA builds have no such op.
    """
    import deepspeed
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def accelerator():
    """DeepSpeed's accelerator: the device kind and its communication backend (gloo on CPU)."""
    from deepspeed.accelerator import get_accelerator
    return get_accelerator()


# ----------------------------------------------------------------------------- the group

def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(bounded_timeout: bool = True) -> tuple[int, int]:
    """Start the process group when launched with several ranks (WORLD_SIZE > 1, from the launcher's
    environment); returns (rank, world_size), the group's global rank.

    With `bounded_timeout` collectives time out after failure.collective_timeout (120 s on gloo,
    DeepSpeed's default on NCCL; DCD_COLLECTIVE_TIMEOUT_S sets it): a peer that is alive but never
    joins fails the job then. Without it (tools/evaluate.py: ranks may score unequal shares for
    minutes before they meet) the backend's default applies.
    """
    deepspeed = import_deepspeed()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = accelerator().communication_backend_name()
        timeout = failure.collective_timeout(backend) if bounded_timeout else None
        deepspeed.init_distributed(dist_backend=backend, **({"timeout": timeout} if timeout else {}))
    return context()


def shutdown() -> None:
    """Destroy the process group: without it gloo aborts ~1 run in 3 at exit (docs/platform_notes.md)."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def context(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit rank/world size, else the process group's when one is started, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------- collectives

def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise max over the ranks, in place; returns the tensor."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over the ranks, in place; returns the tensor."""
    if is_initialized():
        dist.all_reduce(tensor)
    return tensor


def max_over_ranks(count: int, device=None) -> int:
    """The largest of every rank's `count` (each rank passes its own)."""
    return int(all_reduce_max(torch.tensor([count], device=device)).item())


def gather_blocks(local: torch.Tensor, total: int, world_size: int) -> torch.Tensor:
    """Concatenate every rank's block (along dim 0) on every rank; blocks are padded to equal size
    for all_gather and the padding is dropped."""
    if world_size == 1:
        return local
    per_rank = -(-total // world_size)
    padded = local.new_full((per_rank,) + tuple(local.shape[1:]), float("nan"))
    padded[:local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(pieces, padded)
    return torch.cat(pieces)[:total]
