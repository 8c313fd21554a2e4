"""Level-set teleportation (Mishkin, Bietti, Gower, "Level Set Teleportation: An Optimization
Perspective", 2024): a baseline that needs no null spaces and works on any model.

It maximises ``1/2 ||grad L||^2`` subject to ``L(theta) = L(theta_0)`` over ALL trainable
parameters, by a sequential-quadratic-programming style iteration:

1. ascent direction ``d = H g`` (a streaming Hessian-vector product), projected onto the tangent
   space of the level set: ``d_T = d - (<d, g> / ||g||^2) g``;
2. a normalised step ``theta += eta * ||theta|| * d_T / ||d_T||``;
3. a Newton correction back to the level set along the new gradient:
   ``theta -= ((L(theta) - L0) / ||g||^2) g`` (one step);
4. accept if the calibration-loss drift is within tolerance and the gradient norm grew,
   else halve ``eta`` (backtracking line search).

Invariance holds only to the tolerance, on the calibration set; the verification stage judges
the result like any other teleport.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from ..config import TeleportConfig
from ..nullspace.derivatives import Batches, full_gradient, hessian_vector_product
from ..nullspace.linesearch import StepLog, gradient_norm_step
from ..records import StepRecord, TeleportStats


def _dot(a, b) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def levelset_teleport(
    model: nn.Module,
    batches: Batches,
    config: TeleportConfig,
    loss_fn: Callable,
    *,
    noise_floor: float = 0.0,
    on_step: Callable[[int, StepRecord | None], None] | None = None,
) -> TeleportStats:
    """Run level-set teleportation on ``model`` in place (all trainable parameters move).

    Args:
        model: the model to move (a copy), eval mode, on its device.
        batches: re-iterable calibration batches.
        config: ``steps``, ``step_size`` (relative to the parameter norm), ``tolerance``,
            ``max_backtracks``, ``target_ratio``.
        loss_fn: summed batch loss.

    Returns:
        :class:`~teleport_cli.records.TeleportStats` (objective ``levelset``).
    """
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(int(x.shape[0]) for x, _ in batches)
    state = full_gradient(model, batches, loss_fn, params, n)
    loss0, gnorm0 = state.loss, state.grad_norm
    total_norm = _dot([p.detach() for p in params], [p.detach() for p in params]) ** 0.5
    eta = config.step_size
    log = StepLog(config.target_ratio, gnorm0, on_step)
    stop = "steps"
    while log.accepted < config.steps:
        d = hessian_vector_product(model, batches, loss_fn, params, state.grads, params, n)
        gg = _dot(state.grads, state.grads)
        coef = _dot(d, state.grads) / gg if gg > 0 else 0.0
        d = [a - coef * g for a, g in zip(d, state.grads)]
        dnorm = _dot(d, d) ** 0.5
        if dnorm == 0.0:
            stop = "no_freedom"
            break
        current = [p.detach().clone() for p in params]

        def propose(eta: float):
            with torch.no_grad():
                for p, c, t in zip(params, current, d):
                    p.copy_(c + (eta * total_norm / dnorm) * t)
            mid = full_gradient(model, batches, loss_fn, params, n)
            mg = mid.grad_norm**2
            if mg > 0:  # one Newton step back to the level set along the gradient
                with torch.no_grad():
                    for p, g in zip(params, mid.grads):
                        p.sub_(((mid.loss - loss0) / mg) * g)
            return full_gradient(model, batches, loss_fn, params, n)

        state, eta, ended = gradient_norm_step(params, state, loss0, propose, eta, config, noise_floor, log)
        if ended:
            stop = ended
            break
    return log.stats(loss0, state, stop, start, "levelset", 0.5 * gnorm0**2, 0.5 * state.grad_norm**2)
