"""The collectives a data-parallel teleport needs, each a no-op without an active group.

* :func:`all_reduce_sum`: tensors summed in their own dtype (the float32 gradients and
  products, the float64 Grams), Python scalars in float64, each group of them in one call;
* :func:`all_reduce_max`, :func:`all_reduce_min`: scalars (the max |logit| difference, the
  batch size every rank can afford);
* :func:`agree`: rank 0's decision (accept, reject, stop), broadcast;
* :func:`broadcast_`: rank 0's tensors, in place (the step direction: bit-identical weights);
* :func:`all_gather_cat`: 1-D tensors of different lengths, concatenated in rank order (the
  guard's per-sample losses, in the set's order since the shards are contiguous);
* :func:`map_by_rank`: work split by key across ranks and every result sent to all (the
  eigendecompositions: eigh may differ between processes, so each is computed once);
* :func:`assert_identical`: every rank holds the same bits (tests).

A collective that fails (another rank died: gloo's "Connection closed by peer") or times out
raises :class:`~teleport_cli.errors.PeerFailed`, a one-line error.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Iterable, Sequence

from .group import active, guarded


def _dist():
    import torch.distributed as dist

    return dist


def all_reduce_sum(tensors: Sequence = (), *scalars: float) -> list[float]:
    """Sum ``tensors`` in place over all ranks and return ``scalars`` summed (float64).

    Tensors are packed into one flat buffer per (dtype, device) and reduced in their own dtype,
    as a single process accumulates them; scalars (losses, counts; exact up to 2^53) travel as
    one float64 tensor. In a single process: ``list(scalars)``, nothing touched.
    """
    group = active()
    if group is None:
        return list(scalars)
    import torch

    dist = _dist()
    buckets: dict = {}
    for t in tensors:
        if t is not None:
            buckets.setdefault((t.dtype, t.device), []).append(t)
    for ts in buckets.values():
        flat = torch.cat([t.detach().reshape(-1) for t in ts])
        guarded(lambda flat=flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
        offset = 0
        with torch.no_grad():
            for t in ts:
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()
    if not scalars:
        return []
    s = torch.tensor(scalars, dtype=torch.float64, device=group.device)
    guarded(lambda: dist.all_reduce(s, op=dist.ReduceOp.SUM))
    return s.tolist()


def _reduce_scalars(values: Sequence[float], op: str) -> list[float]:
    group = active()
    if group is None:
        return list(values)
    import torch

    dist = _dist()
    s = torch.tensor(list(values), dtype=torch.float64, device=group.device)
    guarded(lambda: dist.all_reduce(s, op=getattr(dist.ReduceOp, op)))
    return s.tolist()


def all_reduce_max(*values: float) -> list[float]:
    """The maximum over ranks of each value (float64)."""
    return _reduce_scalars(values, "MAX")


def all_reduce_min(*values: float) -> list[float]:
    """The minimum over ranks of each value (float64)."""
    return _reduce_scalars(values, "MIN")


def agree(decision: bool) -> bool:
    """Rank 0's ``decision``, on every rank (the single process's own)."""
    group = active()
    if group is None:
        return bool(decision)
    import torch

    dist = _dist()
    flag = torch.tensor([1 if decision else 0], dtype=torch.int32, device=group.device)
    guarded(lambda: dist.broadcast(flag, src=0))
    return bool(flag.item())


def broadcast_(tensors: Iterable) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values (packed per dtype and device)."""
    group = active()
    if group is None:
        return
    import torch

    dist = _dist()
    buckets: dict = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for ts in buckets.values():
        flat = torch.cat([t.detach().reshape(-1) for t in ts])
        guarded(lambda flat=flat: dist.broadcast(flat, src=0))
        offset = 0
        with torch.no_grad():
            for t in ts:
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()


def all_gather_cat(t):
    """Concatenate every rank's 1-D tensor ``t`` in rank order (lengths may differ, 0 included);
    returned on ``t``'s device and in its dtype. In a single process: ``t``."""
    group = active()
    if group is None:
        return t
    import torch

    dist = _dist()
    local = t.detach().to(group.device)
    size = torch.tensor([local.numel()], dtype=torch.int64, device=group.device)
    sizes = [torch.zeros_like(size) for _ in range(group.world_size)]
    guarded(lambda: dist.all_gather(sizes, size))
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = torch.zeros(longest, dtype=local.dtype, device=group.device)
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in range(group.world_size)]
    guarded(lambda: dist.all_gather(parts, padded))
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)


def _moved(obj, device):
    """``obj`` with every tensor inside (tuples, lists, dicts, dataclasses) on ``device``."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_moved(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _moved(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _moved(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init})
    return obj


def map_by_rank(fn: Callable, keys: Sequence, device=None) -> dict:
    """``{key: fn(key)}`` with key ``i`` computed on rank ``i % world_size`` alone and sent to all.

    The results are pickled through the CPU and their tensors put on ``device`` (default: kept
    on the CPU); each is computed by exactly one process, so every rank holds the same bits.
    In a single process: ``fn`` on every key, in order.
    """
    group = active()
    if group is None:
        return {k: fn(k) for k in keys}
    import torch

    mine = {i: _moved(fn(k), torch.device("cpu")) for i, k in enumerate(keys) if i % group.world_size == group.rank}
    everyone: list = [None] * group.world_size
    guarded(lambda: _dist().all_gather_object(everyone, mine))
    merged = {i: v for part in everyone for i, v in part.items()}
    return {k: _moved(merged[i], device) if device is not None else merged[i] for i, k in enumerate(keys)}


def digest(tensors: Iterable) -> str:
    """SHA-256 over the raw bytes of ``tensors`` (in order)."""
    import torch

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def assert_identical(tensors: Iterable, what: str = "weights") -> None:
    """Raise AssertionError unless every rank holds the same bits in ``tensors``."""
    group = active()
    if group is None:
        return
    everyone: list = [None] * group.world_size
    guarded(lambda: _dist().all_gather_object(everyone, digest(list(tensors))))
    if len(set(everyone)) != 1:
        raise AssertionError(f"{what} differ between ranks: {everyone}")
