"""The losses a calibration set is measured with: summed cross-entropy in nats.

Every loss here returns a SUM over the targets of a batch; callers divide by the global target
count N (:func:`target_count`: samples for ``ce``, next-token targets that are not
:data:`IGNORE_INDEX` for ``lm``), so the calibration loss is ``L = (1/N) sum_n l(f(x_n), y_n)``
whatever the batching, and for a language model it is the mean over every counted target of
the set (the value of Hugging Face's ``model(..., labels=...).loss`` over the whole set).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import InputError

IGNORE_INDEX = -100  # targets that count neither in the loss nor in N (padding; PyTorch's and transformers' convention)


def target_count(targets: torch.Tensor) -> int:
    """The number of targets a batch adds to N: every entry that is not :data:`IGNORE_INDEX`
    (``(N,)`` class targets: N; ``(N, T)`` token targets: the counted tokens)."""
    return int((targets != IGNORE_INDEX).sum())


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


def next_token_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``--loss lm``: next-token cross-entropy (nats) summed over the counted targets.

    ``logits`` ``(N, T, V)``, ``targets`` ``(N, T)`` int64 (the input shifted by one token;
    :data:`IGNORE_INDEX` for padding and masked targets): ``sum_{n,t counted} CE(logits[n, t],
    targets[n, t])``. Divided by the set's :func:`target_count` this is the mean cross-entropy
    per counted token over the whole set (not a mean of per-batch means); accuracy is per token.

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
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)


LOSS_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"ce": cross_entropy_sum, "lm": next_token_cross_entropy_sum}
