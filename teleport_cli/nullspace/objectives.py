"""Losses and teleport objectives, evaluated over the WHOLE calibration set.

The calibration loss is ``L = (1/N) sum_n l(f(x_n), y_n)``. The gradient-norm objective of
arXiv:2502.11362 (Eq. 4) is ``L_tel = 1/2 ||grad L||^2``; its gradient is the Hessian-vector
product ``H g``. ``L_tel`` is not a sum over batches, so it is computed in two streaming passes:
first the full gradient ``g = sum_b grad L_b`` (with ``L_b`` the batch's share of L), then
``H g = sum_b grad <grad L_b, g>`` (per-batch Hessian-vector products by double backward,
g held constant). Activations are freed after every batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import InputError

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


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


def count_samples(batches: Batches) -> int:
    return sum(int(x.shape[0]) for x, _ in batches)


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


class GradNormObjective:
    """Maximise ``1/2 ||grad L||^2`` (arXiv:2502.11362, Eq. 4); the ascent direction is ``H g``."""

    name = "grad-norm"
    sign = +1.0

    def direction(self, model, batches, loss_fn, params, wrt, state: GradientState, n: int) -> list[torch.Tensor]:
        """Gradient of the objective with respect to ``wrt`` at the point where ``state`` was taken."""
        return hessian_vector_product(model, batches, loss_fn, params, state.grads, wrt, n)

    def score(self, model, batches, loss_fn, params, state: GradientState, n: int) -> float:
        """The objective's value at the point where ``state`` was taken (no extra pass)."""
        return 0.5 * state.grad_norm**2


def make_objective(name: str, *, lr: float | None = None, lookahead_steps: int = 1, probes: int = 4, seed: int = 0):
    """The objective called ``name`` (one of :data:`teleport_cli.config.OBJECTIVES`).

    Raises:
        ConfigError: unknown name, or ``lookahead`` without a learning rate.
    """
    from .errors import ConfigError

    if name == "grad-norm":
        return GradNormObjective()
    if name == "lookahead" and lr is not None:
        from .objective_lookahead import LookaheadObjective

        return LookaheadObjective(lr, lookahead_steps)
    if name == "trace":
        from .objective_trace import TraceObjective

        return TraceObjective(probes, seed)
    raise ConfigError(f"objective {name!r} cannot be built (lookahead needs --lr)", hint="use grad-norm, lookahead with --lr, or trace")
