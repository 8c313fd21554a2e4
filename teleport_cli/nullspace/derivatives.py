"""Gradients and Hessian-vector products of the mean calibration loss, streamed over batches.

``L = (1/N) sum_b L_b``, with ``L_b`` a batch's summed loss divided by N. The gradient
``g = sum_b grad L_b`` takes one streaming pass; the Hessian-vector product
``H v = sum_b grad <grad L_b, v>`` takes a second one, by double backward with ``v`` held
constant (arXiv:2502.11362, Eq. 4 and its gradient ``H g``). Activations are freed after every
batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..parallel.collective import all_reduce_sum

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def count_samples(batches: Batches) -> int:
    """Samples in ``batches``, summed over the ranks of a data-parallel run."""
    return int(all_reduce_sum((), float(sum(int(x.shape[0]) for x, _ in batches)))[0])


@dataclass
class GradientState:
    """Loss and gradient of the calibration loss at one point.

    Attributes:
        loss: mean calibration loss (nats).
        grads: one tensor per parameter of ``params`` (same shapes), detached.
        grad_norm: L2 norm over all of ``grads``.
    """

    loss: float
    grads: list[torch.Tensor]
    grad_norm: float


def full_gradient(model: nn.Module, batches: Batches, loss_fn: Callable, params: Sequence[torch.Tensor], n: int) -> GradientState:
    """Loss and gradient of the mean calibration loss over all batches (one streaming pass)."""
    grads = [torch.zeros_like(p) for p in params]
    total = 0.0
    for x, y in batches:
        loss_b = loss_fn(model(x), y) / n
        gs = torch.autograd.grad(loss_b, params, allow_unused=True)
        for acc, g in zip(grads, gs):
            if g is not None:
                acc += g
        total += float(loss_b.detach())
    total, = all_reduce_sum(grads, total)  # data parallel: the sums of every rank's shard
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    return GradientState(total, grads, norm)


def hessian_vector_product(
    model: nn.Module,
    batches: Batches,
    loss_fn: Callable,
    params: Sequence[torch.Tensor],
    vector: Sequence[torch.Tensor],
    wrt: Sequence[torch.Tensor],
    n: int,
) -> list[torch.Tensor]:
    """``H v`` restricted to ``wrt``: ``sum_b d/d(wrt) <grad_params L_b, v>`` over all batches.

    Args:
        params: the parameters the gradient is taken with respect to (all trainable ones).
        vector: one tensor per ``params`` entry (held constant).
        wrt: the parameters the product is returned for (a subset of ``params``).
        n: total number of calibration samples (L_b is the batch's summed loss / n).

    Returns:
        one tensor per ``wrt`` entry.
    """
    out = [torch.zeros_like(w) for w in wrt]
    # fused scaled-dot-product attention kernels have no double backward: use the math backend
    with sdpa_kernel([SDPBackend.MATH]):
        _accumulate_hvp(model, batches, loss_fn, params, vector, wrt, n, out)
    all_reduce_sum(out)
    return out


def _accumulate_hvp(model, batches, loss_fn, params, vector, wrt, n, out) -> None:
    for x, y in batches:
        loss_b = loss_fn(model(x), y) / n
        gs = torch.autograd.grad(loss_b, params, create_graph=True, allow_unused=True)
        dot = sum((g * v).sum() for g, v in zip(gs, vector) if g is not None)
        hv = torch.autograd.grad(dot, wrt, allow_unused=True)
        for acc, h in zip(out, hv):
            if h is not None:
                acc += h.detach()
