"""Contiguous shards of an index range, one per rank, without padding.

Rank ``r`` of ``W`` gets ``[floor(r n / W), floor((r + 1) n / W))``: the shards cover ``0..n-1``
once, in rank order, and differ in size by at most one. Unlike ``DistributedSampler`` nothing is
repeated to even them out, so every sum over the shards is the sum over the set, and a rank may
get no sample at all (24 samples on 32 ranks); it still joins every collective.
"""

from __future__ import annotations

from .group import active


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The indices of ``0..n-1`` that ``rank`` of ``world_size`` holds (possibly empty).

    Raises:
        ValueError: ``rank`` outside ``[0, world_size)`` or ``n < 0``.
    """
    if not 0 <= rank < world_size or n < 0:
        raise ValueError(f"rank {rank} of {world_size} ranks, n={n}")
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def shard(data):
    """This rank's shard of a data set with ``__len__`` and ``subset(index_tensor)``
    (:class:`~teleport_cli.data.tensors.TensorData`); the set itself in a single process or for None."""
    group = active()
    if group is None or data is None:
        return data
    import torch

    part = shard_range(len(data), group.rank, group.world_size)
    return data.subset(torch.arange(part.start, part.stop, dtype=torch.long))
