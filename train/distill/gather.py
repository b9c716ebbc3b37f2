"""Collectives for the DCD loss: autograd all-gather, local B x G logits, moving raw candidate inputs.

Notation: W ranks (``world_size``), B rows per rank, a pool of G = W * B rows gathered in rank order,
so that rank r's rows sit at pool positions ``[r * B, (r + 1) * B)`` (``gathered_offset``).

Everything here talks to other ranks only through a :class:`Collectives` object, so the losses run
unchanged on one process (:class:`SingleProcess`), on ``torch.distributed`` ranks
(:class:`TorchDistributed`) or on a fake group in tests. Each collective adds the bytes this rank
receives from other ranks to ``bytes_moved[tag]`` so that a trainer can report traffic per step.

Byte counting convention (per rank, payload received from other ranks, self-copies excluded):
- all-gather of an n-byte tensor: (W - 1) * n (exact for any algorithm: every rank must receive the
  others' data);
- the backward of an all-gather with gradient: another (W - 1) * n (a reduce-scatter, or gloo's
  all-to-all emulation of it, receives one n-byte gradient slice from each other rank); it is counted
  when the forward runs, under ``f"{tag}.backward"``;
- all-reduce of n bytes: 2 * (W - 1) / W * n (a ring all-reduce, the bandwidth-optimal algorithm);
- all-to-all: the rows actually received from other ranks, plus the counts exchanged first.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def gathered_offset(rank: int, rows_per_rank: int) -> int:
    """Position of this rank's first row in a pool gathered in rank order."""
    return rank * rows_per_rank


def local_logits(local_queries: torch.Tensor, pool_keys: torch.Tensor, scale) -> torch.Tensor:
    """Logits of this rank's queries against the whole pool: the "local loss" layout.

    Args:
        local_queries: [B, D] L2-normalised embeddings of this rank's queries.
        pool_keys: [G, D] L2-normalised embeddings gathered from every rank.
        scale: scalar (tensor or float), the already clamped exp(logit_scale) = 1 / temperature.
    Returns:
        [B, G] ``scale * cos``. Each rank computes B x G, never G x G: the G x G matrix would be
        computed W times over, and its memory grows with W^2.
    """
    return scale * local_queries @ pool_keys.t()


class Collectives:
    """What the DCD loss needs from a process group; subclasses implement the ``_`` primitives.

    Every rank must call the public methods in the same order with tensors of the same shape (except
    the first dimension of ``all_to_all`` chunks), as with any collective.
    """

    world_size: int = 1
    rank: int = 0

    def __init__(self):
        self.bytes_moved: Dict[str, int] = defaultdict(int)

    # -- primitives, no byte counting ---------------------------------------------------------------
    def _all_gather_with_grad(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        raise NotImplementedError

    def _all_gather_no_grad(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        raise NotImplementedError

    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _all_to_all(self, chunks: List[torch.Tensor], recv_rows: List[int]) -> List[torch.Tensor]:
        """chunks[r] goes to rank r; returns the chunk received from each rank (recv_rows[r] rows)."""
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------------------------
    def all_gather_with_grad(self, tensor: torch.Tensor, tag: str = "all_gather_with_grad") -> torch.Tensor:
        """[B, ...] on each rank -> [W * B, ...] in rank order; gradients flow back to every rank.

        In the backward, the slice of rank r receives the SUM over all ranks of the gradient of their
        losses with respect to it (see ``dcd.py`` for what this means for the loss scale).
        """
        extra = (self.world_size - 1) * _nbytes(tensor)
        self.bytes_moved[tag] += extra
        if tensor.requires_grad and torch.is_grad_enabled():
            self.bytes_moved[tag + ".backward"] += extra
        return torch.cat(self._all_gather_with_grad(tensor), dim=0)

    def all_gather_no_grad(self, tensor: torch.Tensor, tag: str = "all_gather") -> torch.Tensor:
        """[B, ...] on each rank -> [W * B, ...] in rank order, detached."""
        self.bytes_moved[tag] += (self.world_size - 1) * _nbytes(tensor)
        with torch.no_grad():
            return torch.cat(self._all_gather_no_grad(tensor.detach()), dim=0)

    def all_reduce_sum(self, tensor: torch.Tensor, tag: str = "all_reduce") -> torch.Tensor:
        """Sum over ranks, returned as a new detached tensor (the input is left as it is)."""
        w = self.world_size
        self.bytes_moved[tag] += (2 * (w - 1) * _nbytes(tensor)) // w
        with torch.no_grad():
            return self._all_reduce_sum(tensor.detach().clone())

    def all_to_all(self, chunks: Sequence[torch.Tensor], recv_rows: Optional[Sequence[int]] = None,
                   tag: str = "all_to_all") -> List[torch.Tensor]:
        """Send ``chunks[r]`` to rank r, detached; returns the chunk each rank sent to this one.

        Chunks may differ in their first dimension; their other dimensions and dtype must agree on
        every rank. When ``recv_rows`` (rows to expect from each rank) is not known, the row counts
        are exchanged first (one more small all-to-all).
        """
        assert len(chunks) == self.world_size, "one chunk per destination rank"
        chunks = [c.detach().contiguous() for c in chunks]
        if recv_rows is None:
            counts = torch.tensor([c.shape[0] for c in chunks], dtype=torch.long, device=chunks[0].device)
            received = self._all_to_all(list(counts.view(-1, 1)), [1] * self.world_size)
            self.bytes_moved[tag] += (self.world_size - 1) * 8
            recv_rows = [int(r.item()) for r in received]
        with torch.no_grad():
            received = self._all_to_all(chunks, list(recv_rows))
        self.bytes_moved[tag] += sum(_nbytes(c) for r, c in enumerate(received) if r != self.rank)
        return received

    def take_bytes_moved(self) -> Dict[str, int]:
        """The byte counters since the last call, by tag; resets them."""
        out = dict(self.bytes_moved)
        self.bytes_moved = defaultdict(int)
        return out


class SingleProcess(Collectives):
    """World of one: gathers and reductions are identities, nothing is moved."""

    world_size = 1
    rank = 0

    def _all_gather_with_grad(self, tensor):
        return [tensor]

    def _all_gather_no_grad(self, tensor):
        return [tensor]

    def _all_reduce_sum(self, tensor):
        return tensor

    def _all_to_all(self, chunks, recv_rows):
        return [chunks[0].clone()]


class TorchDistributed(Collectives):
    """``torch.distributed`` process group (gloo on CPU, NCCL on GPU); default group when None."""

    def __init__(self, group=None):
        super().__init__()
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def _all_gather_with_grad(self, tensor):
        # Autograd-aware gather: its backward sums each slice's gradient over ranks.
        return list(dist_nn.all_gather(tensor.contiguous(), group=self.group))

    def _all_gather_no_grad(self, tensor):
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor, group=self.group)
        return out

    def _all_reduce_sum(self, tensor):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def _all_to_all(self, chunks, recv_rows):
        # One all_to_all_single over rows flattened to bytes-per-row blocks (gloo and NCCL both
        # support uneven splits; the list form of all_to_all is not supported by every backend).
        row_shape = chunks[0].shape[1:]
        send = torch.cat([c.reshape(c.shape[0], *row_shape) for c in chunks], dim=0)
        recv = send.new_empty((sum(recv_rows), *row_shape))
        dist.all_to_all_single(recv, send, output_split_sizes=list(recv_rows),
                               input_split_sizes=[c.shape[0] for c in chunks], group=self.group)
        return list(torch.split(recv, list(recv_rows), dim=0))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# ---------------------------------------------------------------------------------------------------
# Moving raw candidate inputs (uint8 pixels, teacher token ids) between ranks, without gradient.
# ---------------------------------------------------------------------------------------------------

def pad_to_common_length(tensors: Mapping[str, torch.Tensor], comm: Collectives,
                         pad_value: int = 0, tag: str = "text_lengths") -> Dict[str, torch.Tensor]:
    """Right-pad dimension 1 of every tensor to the longest length over all ranks.

    Each rank's collate pads captions to its own longest caption, so token tensors differ in length
    between ranks and cannot be stacked. Padding uses ``pad_value`` (0) for every key: the attention
    mask is 0 there, so a teacher that honours its attention mask scores the caption as before.
    Tensors with fewer than 2 dimensions are returned as they are. One small all-gather.
    """
    keys = [k for k, t in tensors.items() if t.dim() >= 2]
    out = dict(tensors)
    if not keys:
        return out
    device = tensors[keys[0]].device
    lengths = torch.tensor([tensors[k].shape[1] for k in keys], dtype=torch.long, device=device)
    longest = comm.all_gather_no_grad(lengths.view(1, -1), tag=tag).max(dim=0).values
    for k, length in zip(keys, longest.tolist()):
        t = tensors[k]
        if t.shape[1] < length:
            pad = t.new_full((t.shape[0], length - t.shape[1], *t.shape[2:]), pad_value)
            out[k] = torch.cat([t, pad], dim=1)
    return out


def fetch_pool_rows(local_rows: Mapping[str, torch.Tensor], pool_index: torch.Tensor,
                    comm: Collectives, transport: str = "all_to_all",
                    tag: str = "candidates") -> Dict[str, torch.Tensor]:
    """Rows ``pool_index`` of the pool formed by every rank's ``local_rows``, without gradient.

    Args:
        local_rows: tensors with the same first dimension B on every rank (pixels uint8 [B,3,S,S],
            token ids [B,L] padded to a common L, ...).
        pool_index: [U] long, global pool positions wanted by this rank (any order; may differ in
            length between ranks).
        transport: ``"all_to_all"`` moves only the requested rows (requests first, then the rows):
            traffic grows with the candidates asked for, not with the pool; ``"all_gather"`` gathers
            every rank's rows and indexes them (traffic (W - 1) * B rows, simpler, fine for small W).
    Returns:
        dict of [U, ...] tensors, row u being pool row ``pool_index[u]``.
    """
    keys = list(local_rows)
    rows_per_rank = local_rows[keys[0]].shape[0]
    if transport == "all_gather":
        return {k: comm.all_gather_no_grad(local_rows[k], tag=tag)[pool_index] for k in keys}
    if transport != "all_to_all":
        raise ValueError(f"unknown transport {transport!r} (all_to_all | all_gather)")

    owner = torch.div(pool_index, rows_per_rank, rounding_mode="floor")
    row_on_owner = pool_index - owner * rows_per_rank
    wanted_from = [owner == r for r in range(comm.world_size)]
    # 1) tell each owner which of its rows this rank wants; learn what the others want from us.
    requested_of_me = comm.all_to_all([row_on_owner[m] for m in wanted_from], tag=tag + ".requests")
    recv_rows = [int(m.sum().item()) for m in wanted_from]
    out = {}
    for k in keys:
        local = local_rows[k]
        # 2) send each requester its rows; receive ours and put them back in pool_index order.
        received = comm.all_to_all([local[req.to(local.device)] for req in requested_of_me],
                                   recv_rows=recv_rows, tag=tag)
        rows = local.new_empty((pool_index.shape[0], *local.shape[1:]))
        for r, m in enumerate(wanted_from):
            rows[m.to(local.device)] = received[r]
        out[k] = rows
    return out
