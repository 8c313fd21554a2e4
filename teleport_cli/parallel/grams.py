"""The Gram accumulators of the capture, summed over the ranks' shards.

Each rank captured its shard (:func:`teleport_cli.nullspace.capture.capture_grams`); the Gram of
the set is the sum of the shards' Grams (``X^T X = sum_r X_r^T X_r``), reduced in float64. A
layer counts as plain when every rank whose hook fired found it plain (the largest error is
kept), and as a dead branch only when no rank's hook fired. A rank with no sample contributes
zeros and still joins.
"""

from __future__ import annotations

from .collective import all_reduce_max, all_reduce_sum
from .group import active


def all_reduce_accumulators(accs: dict) -> None:
    """Sum, in place, accumulators with ``gram`` (``(groups, d_in, d_in)`` or None), ``rows``,
    ``calls``, ``plain`` (None, True, False), ``plain_error`` and ``spec.groups``/``spec.d_in``
    (:class:`~teleport_cli.nullspace.capture.GramAccumulator`) over all ranks; a no-op alone."""
    group = active()
    if group is None:
        return
    import torch

    accs = [accs[name] for name in sorted(accs)]  # the same order on every rank
    dtypes = [a.gram.dtype if a.gram is not None else None for a in accs]
    grams = [a.gram.to(torch.float64) if a.gram is not None else
             torch.zeros(a.spec.groups, a.spec.d_in, a.spec.d_in, dtype=torch.float64, device=group.device) for a in accs]
    counts = [v for a in accs for v in (a.calls, a.rows, a.plain is not None, a.plain is False)]
    counts = all_reduce_sum(grams, *map(float, counts))
    errors = all_reduce_max(*(a.plain_error if a.plain is not None else 0.0 for a in accs))
    for i, (a, g, dtype) in enumerate(zip(accs, grams, dtypes)):
        calls, rows, fired, bad = (int(c) for c in counts[4 * i: 4 * i + 4])
        a.calls, a.rows = calls, rows
        a.gram = None if calls == 0 else g.to(dtype or torch.float64)
        a.plain = None if fired == 0 else bad == 0
        a.plain_error = errors[i]
