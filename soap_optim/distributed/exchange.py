"""The collectives the distribution layer runs, counted: packed ``all_to_all_single`` and ``all_reduce``.

:class:`CommStats` records, per optimizer, one count per collective call, the bytes sent to and received
from *other* ranks (a rank's own segment of an all-to-all stays local; an all-reduce counts a ring's
2 (W-1)/W of the buffer each way), and the wall time inside the calls (on CUDA, synchronized before and
after each, so the time is the collective's).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Sequence

import torch


@dataclass
class CommStats:
    collectives: int = 0
    sent: int = 0
    received: int = 0
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return self.sent + self.received

    def reset(self) -> None:
        self.collectives, self.sent, self.received, self.seconds = 0, 0, 0, 0.0

    def run(self, collective, *tensors: torch.Tensor, sent: int, received: int, **kwargs) -> None:
        """``collective(*tensors, **kwargs)``, counted with the given off-rank byte counts."""
        on_cuda = any(t.is_cuda for t in tensors)
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        collective(*tensors, **kwargs)
        if on_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.collectives += 1
        self.sent += sent
        self.received += received


def all_to_all(
    stats: CommStats, group, me: int, sends: Sequence[List[torch.Tensor]], receive_sizes: Sequence[int], dtype, device
) -> List[torch.Tensor]:
    """One ``all_to_all_single`` over ``group``: ``sends[r]`` (flat pieces, concatenated) go to group rank
    r; returns, per group rank, the flat buffer it sent here (``receive_sizes[r]`` elements)."""
    empty = torch.empty(0, dtype=dtype, device=device)
    send = torch.cat([torch.cat(pieces) if pieces else empty for pieces in sends])
    received = torch.empty(sum(receive_sizes), dtype=dtype, device=device)
    send_sizes = [sum(p.numel() for p in pieces) for pieces in sends]
    stats.run(
        torch.distributed.all_to_all_single, received, send, output_split_sizes=list(receive_sizes),
        input_split_sizes=send_sizes, group=group,
        sent=(sum(send_sizes) - send_sizes[me]) * send.element_size(),
        received=(sum(receive_sizes) - receive_sizes[me]) * send.element_size(),
    )
    return list(received.split(list(receive_sizes)))


def all_reduce_sum(stats: CommStats, group, size: int, tensor: torch.Tensor) -> None:
    """In-place sum over ``group`` (of ``size`` ranks)."""
    ring = 2 * (size - 1) * tensor.numel() * tensor.element_size() // size
    stats.run(torch.distributed.all_reduce, tensor, group=group, sent=ring, received=ring)
