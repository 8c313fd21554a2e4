"""The losses a calibration set is measured with: summed cross-entropy in nats.

Every loss here returns a SUM over the samples of a batch; callers divide by the global sample
count N, so the calibration loss is ``L = (1/N) sum_n l(f(x_n), y_n)`` whatever the batching.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import InputError


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
    """``--loss lm``: summed over sequences, each sequence's mean next-token cross-entropy (nats).

    ``logits`` ``(N, T, V)``, ``targets`` ``(N, T)`` int64 (the input shifted by one token):
    ``sum_n (1/T) sum_t CE(logits[n, t], targets[n, t])``. Divided by N (as every loss here is)
    this is the mean cross-entropy per token; accuracy is then per token.

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
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / targets.shape[1]


LOSS_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"ce": cross_entropy_sum, "lm": next_token_cross_entropy_sum}
