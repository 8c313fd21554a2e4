"""The losses a calibration set is measured with: summed cross-entropy in nats.

Every loss here returns a SUM over the samples of a batch; callers divide by the global sample
count N, so the calibration loss is ``L = (1/N) sum_n l(f(x_n), y_n)`` whatever the batching.

Language-model targets may be ``-100`` (:data:`IGNORE`: padding, or positions a file leaves out,
as transformers marks them). The loss of a set is then the sum of the cross-entropies of the
counted targets divided by their count C over the whole set (transformers' convention for one
batch, ``model(..., labels=...).loss``): :func:`loss_for` binds the set's mean count per sample
``C / N`` as the per-sample denominator, so that the division by N still gives ``sum / C``.
Without ignored targets ``C / N = T`` and this is the per-token mean of
:func:`next_token_cross_entropy_sum` unchanged.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import InputError

IGNORE = -100  # a language-model target that is not counted (padding, or left out by the file)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (nats) of ``(N, C)`` logits against ``(N,)`` int64 class targets.

    Raises:
        InputError: the logits are not ``(N, C)`` (a language model needs ``--loss lm``).
    """
    if logits.ndim != 2:
        raise InputError(f"--loss ce needs (N, C) logits, the model returned {tuple(logits.shape)}", hint="use --loss lm for a language model")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, targets, reduction="sum")


def next_token_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, tokens_per_sample: float | None = None) -> torch.Tensor:
    """``--loss lm``: the summed next-token cross-entropy (nats) over a batch, per ``tokens_per_sample``.

    ``logits`` ``(N, T, V)``, ``targets`` ``(N, T)`` int64 (the input shifted by one token;
    :data:`IGNORE` where not counted): ``(1/c) sum_n sum_t CE(logits[n, t], targets[n, t])``
    over counted targets, with ``c = tokens_per_sample`` (default T). With the default and no
    ignored target this is the sum over sequences of each one's mean cross-entropy, and divided
    by N (as every loss here is) the mean cross-entropy per token; with ``c = C / N`` of the whole
    set (:func:`loss_for`) it is ``sum / C``, the mean over the counted tokens of the set.

    Raises:
        InputError: logits not ``(N, T, V)`` or targets not ``(N, T)``.
    """
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise InputError(
            f"--loss lm needs (N, T, V) logits and (N, T) targets, got {tuple(logits.shape)} and {tuple(targets.shape)}",
            hint="use --loss ce for a classifier",
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE)
    return total / (targets.shape[1] if tokens_per_sample is None else tokens_per_sample)


def sample_terms(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The terms of ``loss_fn``'s sum over a batch, one per sample (shape ``N``, the logits' dtype
    or float32): for :func:`cross_entropy_sum` one ``reduction="none"`` call, whose value for each
    row is bit for bit that of a batch of that row alone (checked in tests/nullspace/test_guard.py);
    for any other loss one call per sample.

    Raises:
        InputError: as ``loss_fn`` (logits of the wrong shape).
    """
    if loss_fn is cross_entropy_sum and logits.ndim == 2:
        return F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, targets, reduction="none")
    return torch.stack([loss_fn(logits[i:i + 1], targets[i:i + 1]) for i in range(int(logits.shape[0]))])


LOSS_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"ce": cross_entropy_sum, "lm": next_token_cross_entropy_sum}


def counted_targets(targets: torch.Tensor) -> int:
    """How many targets count (are not :data:`IGNORE`)."""
    return int((targets != IGNORE).sum())


def loss_for(name: str, targets: torch.Tensor, source: str = "data") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The summed batch loss ``name`` for the set whose targets are ``targets`` (``N`` or ``N x T``).

    For ``lm`` with ignored targets: :func:`next_token_cross_entropy_sum` with
    ``tokens_per_sample = C / N``, C the counted targets of the whole set, so that
    ``(1/N) sum_batches loss`` is ``(1/C) sum CE`` whatever the batching. A subset of the set
    (the guard's) keeps the set's ``C / N``: its per-sample losses stay the terms of the set's loss.
    Otherwise ``LOSS_FUNCTIONS[name]`` itself.

    Raises:
        InputError: an ``lm`` set in which no target counts.
    """
    fn = LOSS_FUNCTIONS[name]
    if name != "lm" or targets.ndim != 2:
        return fn
    counted = counted_targets(targets)
    if counted == targets.numel():
        return fn
    if counted == 0:
        raise InputError(f"{source}: no target counts (every one is padding or -100)", hint="pass sequences with at least one real target")
    return partial(fn, tokens_per_sample=counted / targets.shape[0])
