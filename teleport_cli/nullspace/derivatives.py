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
from ..parallel.group import active

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
    return _streamed_gradient(model, batches, loss_fn, params, n)


def _streamed_gradient(forward: Callable, batches: Batches, loss_fn: Callable, params: Sequence[torch.Tensor], n: int) -> GradientState:
    grads = [torch.zeros_like(p) for p in params]
    total = 0.0
    for x, y in batches:
        loss_b = loss_fn(forward(x), y) / n
        gs = torch.autograd.grad(loss_b, params, allow_unused=True)
        for acc, g in zip(grads, gs):
            if g is not None:
                acc += g
        total += float(loss_b.detach())
    total, = all_reduce_sum(grads, total)  # data parallel: the sums of every rank's shard
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    return GradientState(total, grads, norm)


def whole_set(fit_state: GradientState, model: nn.Module, guard: Batches, loss_fn: Callable, n_fit: int, n_all: int) -> GradientState:
    """Loss and gradient over fit + guard samples from the fit part's state and one gradient pass
    over the guard alone: ``L = (n_fit L_fit + n_guard L_guard) / n`` and likewise the gradient
    (both are means of per-sample terms), instead of a pass over the whole calibration set.
    ``fit_state`` is over the trainable parameters of ``model`` (in ``model.parameters()`` order)."""
    params = [p for p in model.parameters() if p.requires_grad]
    part = full_gradient(model, guard, loss_fn, params, n_all)  # the guard's share: its summed loss / n
    w = n_fit / n_all
    grads = [w * a + b for a, b in zip(fit_state.grads, part.grads)]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    return GradientState(w * fit_state.loss + part.loss, grads, norm)


def one_batch(batches: Batches) -> bool:
    """Whether a pass over ``batches`` is a single batch whose graph may be kept (one process
    only: under torchrun every rank must take the same path, so the same collectives)."""
    return hasattr(batches, "__len__") and len(batches) == 1 and active() is None


class PendingGradient:
    """The mean calibration loss now, its gradient (a :class:`GradientState`) on demand.

    With one batch, the forward pass runs with autograd on and keeps its graph: ``loss`` is the
    gradient pass's own loss and :meth:`gradient` costs only the backward, with the same values
    as :func:`full_gradient` (the same operations in the same order). With more batches (or a
    stream without a length) ``loss`` comes from a no-grad forward pass and :meth:`gradient`
    runs :func:`full_gradient`: the graphs of all batches at once would break the batch-size
    budget. Callers test the loss first and take the gradient only when they need it, so a
    rejected candidate costs one forward pass and an accepted one a single gradient pass.

    ``params`` may be fresh leaf tensors fed to the model by ``forward(x)`` (for example through
    ``torch.func.functional_call``); ``forward`` defaults to ``model``. The parameters must not
    be changed in place between construction and :meth:`gradient`.
    """

    def __init__(self, model: nn.Module, batches: Batches, loss_fn: Callable, params: Sequence[torch.Tensor], n: int,
                 forward: Callable | None = None) -> None:
        self.model, self.batches, self.loss_fn, self.params, self.n = model, batches, loss_fn, list(params), n
        self.forward = forward or model
        self._loss_b: torch.Tensor | None = None
        self._state: GradientState | None = None
        if one_batch(batches):
            x, y = next(iter(batches))
            self._loss_b = loss_fn(self.forward(x), y) / n
            self.loss = 0.0 + float(self._loss_b.detach())
        else:
            with torch.no_grad():
                self.loss = sum(float(loss_fn(self.forward(x), y)) for x, y in batches) / max(n, 1)
        self.loss, = all_reduce_sum((), self.loss)  # data parallel: ranks may differ in path, not in collectives

    def gradient(self) -> GradientState:
        """Loss and gradient at the point of construction (computed once)."""
        if self._state is None:
            if self._loss_b is None:
                self._state = _streamed_gradient(self.forward, self.batches, self.loss_fn, self.params, self.n)
            else:
                gs = torch.autograd.grad(self._loss_b, self.params, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else torch.zeros_like(p) + g for p, g in zip(self.params, gs)]
                all_reduce_sum(grads, 0.0)  # the same collectives as _streamed_gradient's
                norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
                self._state = GradientState(self.loss, grads, norm)
                self._loss_b = None  # the graph is freed
        return self._state


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
