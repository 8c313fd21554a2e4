"""Verification: determinism first, then loss, logits and accuracy before and after.

The gate (shared with the ascent loop): a data set passes when
``|L_after - L_before| <= tolerance * |L_before| + 1e-6 + noise_floor``, where the noise floor
is the loss difference between two identical runs of the original model.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import InputError
from ..parallel.collective import all_reduce_max, all_reduce_sum
from ..records import SetCheck
from .derivatives import Batches
from .linesearch import drift_ok
from .losses import IGNORE, counted_targets

# A run-to-run loss difference above this share of the loss cannot come from floating-point
# reordering: something random runs in the forward pass.
MAX_NOISE = 1e-4


def forward_checked(model: nn.Module, x: torch.Tensor, source: str) -> torch.Tensor:
    """``model(x)``, turning shape errors into a one-line InputError that names the data."""
    try:
        return model(x)
    except (RuntimeError, ValueError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"the samples of {source} (shape {tuple(x.shape[1:])} each) do not fit the model: {first}",
            hint="check that the data were preprocessed for this checkpoint",
        ) from None


# the original's outputs are kept for verify up to this many bytes (else verify reruns the original)
KEEP_BYTES = 64 * 2**20


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Batches, loss_fn: Callable, source: str = "data", keep: list | None = None) -> float:
    """Mean loss over all batches (nats), in one streaming pass.

    ``keep``: a list that receives each batch's outputs as float32 (for :func:`compare`'s
    ``reference``); emptied again, and left empty, once they pass ``KEEP_BYTES``.
    """
    total, n, kept = 0.0, 0, 0
    for x, y in batches:
        out = forward_checked(model, x, source)
        total += float(loss_fn(out, y))
        n += int(x.shape[0])
        if keep is not None and kept <= KEEP_BYTES:
            kept += out.numel() * 4
            if kept <= KEEP_BYTES:
                keep.append(out.float())
            else:
                keep.clear()
    total, n = all_reduce_sum((), total, n)  # data parallel: over every rank's shard
    return total / max(n, 1)


def check_targets(model: nn.Module, data, source: str) -> None:
    """Class targets must index the model's outputs: ``0 <= y < C`` with C the last logit dimension.

    (PyTorch's cross-entropy would raise for other values, or silently skip -100.) A language
    model's targets (``N x T`` for ``N x T x C`` logits) may be ``-100``: not counted
    (:mod:`teleport_cli.nullspace.losses`).

    Raises:
        InputError: targets whose shape is not ``N`` followed by the logits' middle dimensions
            (``N`` for ``N x C`` logits, ``N x T`` for ``N x T x C``), or a target outside
            ``[0, C)``, naming how many and the first one.
    """
    x = data.inputs[:1].to(next(model.parameters()).device)
    with torch.no_grad():
        logits = forward_checked(model, x, source)
    classes = int(logits.shape[-1])
    y = data.targets
    if tuple(y.shape[1:]) != tuple(logits.shape[1:-1]):
        want = " x ".join(["N", *map(str, logits.shape[1:-1])])
        raise InputError(
            f"{source}: targets have shape {tuple(y.shape)}, but the model's logits {tuple(logits.shape)} need targets of shape {want}",
            hint="store one class index per sample (per position for a language model)",
        )
    bad = (y < 0) | (y >= classes)
    if logits.ndim == 3:  # a language model's uncounted targets (padding, -100)
        bad &= y != IGNORE
    if bool(bad.any()):
        first = int(y[bad].reshape(-1)[0])
        raise InputError(
            f"{source}: targets must be class indices in [0, {classes}); found {first} ({int(bad.sum())} targets out of range)",
            hint="check the labels and that the data belong to this model",
        )


def noise_floor(model: nn.Module, batches: Batches, loss_fn: Callable, source: str = "data",
                keep: list | None = None) -> tuple[float, float]:
    """Run the model twice on the same data; return (loss, |difference|).

    ``keep``: receives the second run's outputs per batch (see :func:`evaluate_loss`), so that
    :func:`compare` need not run the original a third time.

    Raises:
        InputError: the two runs differ by more than ``MAX_NOISE`` of the loss (dropout or other
            randomness active in eval mode, or modules left in training mode).
    """
    a = evaluate_loss(model, batches, loss_fn, source)
    b = evaluate_loss(model, batches, loss_fn, source, keep)
    floor = abs(a - b)
    if floor > MAX_NOISE * max(abs(a), 1e-12):
        training = [n for n, m in model.named_modules() if m.training]
        cause = (
            f"modules still in training mode: {', '.join(training[:5])}"
            if training
            else "randomness in forward (dropout applied regardless of eval mode, random layers) or non-deterministic kernels"
        )
        raise InputError(
            f"the model is not deterministic: two identical runs on {source} give losses {a:.6g} and {b:.6g} ({cause})",
            hint="make forward deterministic in eval mode; a teleport cannot be verified otherwise",
        )
    return a, floor


@torch.no_grad()
def compare(
    original: nn.Module,
    teleported: nn.Module,
    batches: Batches,
    loss_fn: Callable,
    *,
    name: str,
    tolerance: float,
    floor: float,
    reference: list[torch.Tensor] | None = None,
) -> SetCheck:
    """Run both models on every batch and compare loss, logits and accuracy (streaming).

    ``reference``: the original's float32 outputs per batch from an earlier pass over the same
    batches (``noise_floor(..., keep=...)``); used instead of running ``original`` again when it
    holds one tensor per batch.
    """
    reference = reference if reference and hasattr(batches, "__len__") and len(reference) == len(batches) else None
    loss0 = loss1 = 0.0
    correct0 = correct1 = n = labels = 0  # n: samples (losses are per sample); labels: targets (tokens for lm)
    max_diff = max_logit = 0.0
    for i, (x, y) in enumerate(batches):
        a = reference[i] if reference is not None else forward_checked(original, x, name).float()
        b = forward_checked(teleported, x, name).float()
        loss0 += float(loss_fn(a, y))
        loss1 += float(loss_fn(b, y))
        correct0 += int((a.argmax(-1) == y).sum())
        correct1 += int((b.argmax(-1) == y).sum())
        if a.ndim == 3:  # a language model: logits at counted targets only (padded positions may move)
            keep = y != IGNORE
            a, b = a[keep], b[keep]
        if a.numel():
            max_diff = max(max_diff, float((a - b).abs().max()))
            max_logit = max(max_logit, float(a.abs().max()))
        n += int(x.shape[0])
        labels += counted_targets(y)
    loss0, loss1, correct0, correct1, n, labels = all_reduce_sum((), loss0, loss1, correct0, correct1, n, labels)
    max_diff, max_logit = all_reduce_max(max_diff, max_logit)
    n, labels = int(n), int(labels)
    loss0, loss1 = loss0 / n, loss1 / n
    return SetCheck(
        name=name,
        samples=n,
        loss_before=loss0,
        loss_after=loss1,
        max_abs_logit_diff=max_diff,
        max_abs_logit=max_logit,
        accuracy_before=correct0 / labels,
        accuracy_after=correct1 / labels,
        tolerance=tolerance,
        noise_floor=floor,
        passed=bool(drift_ok(loss1, loss0, tolerance, floor) and torch.isfinite(torch.tensor(loss1))),
    )
