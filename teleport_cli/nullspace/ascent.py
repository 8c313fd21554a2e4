"""The projected ascent loop: move the teleportable weights inside their null spaces.

Each step (arXiv:2502.11362, Algorithm 1, with the step control of the design notes, Sec. 5):

1. ``d = grad of the objective`` w.r.t. each teleported weight (``H g`` for the gradient norm);
2. project each layer's ``d`` onto its null space, group by group: ``P = d N N^T``;
   and, with ``tangent``, remove its component along the projected loss gradient;
3. take a normalised step ``W += eta * ||W_T|| * P / ||P||`` (``W_T``: all teleported weights),
   then cap each layer's total relative change ``||W - W0|| / ||W0||`` at ``max_step``;
4. accept if the calibration-loss drift ``|L - L0| <= tolerance * |L0| + 1e-6 + noise floor``
   and the objective improved; otherwise restore, halve ``eta`` and retry (``max_backtracks``);
   after a step accepted at its first try, ``eta`` grows by ``step_growth`` (up to
   ``max_step``): a backtracking line search with a growing first trial, as in trust-region
   methods (Nocedal and Wright, Numerical Optimization, Sec. 3.5 and 4.1).

The loop changes the given model's weights in place (the caller passes a copy), reports
progress through a callback and never prints.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from ..config import TeleportConfig
from ..records import StepRecord, TeleportStats
from .bases import LayerBasis
from .derivatives import Batches, GradientState, full_gradient
from .layers import LayerSpec, from_blocks, layer_weight, weight_blocks
from .linesearch import StepLog, backtrack, drift_ok
from .objectives import GradNormObjective

# A projected direction smaller than this share of the unprojected one is roundoff (float32
# gradients leak about 1e-7 into directions where the exact value is zero); the normalised
# step would blow it up to a full step, so it counts as zero.
NOISE = 1e-6


def _norm(ts) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in ts)))


def _tangent(projected, moving, bases, state: GradientState, params, wrt) -> list[torch.Tensor]:
    """Remove from the step its component along the projected loss gradient ``q``.

    With tau < 1 the null spaces are approximate and the loss changes to first order by
    ``<q, step>``; taking ``step - (<step, q> / <q, q>) q`` keeps the step tangent to the level
    set (the first-order condition of level-set teleportation, Mishkin et al. 2024). With
    exact null spaces ``q = 0`` and nothing changes.
    """
    index = {id(p): i for i, p in enumerate(params)}
    grads = [state.grads[index[id(w)]] for w in wrt]
    q = [_project(spec, bases, g) for (spec, _), g in zip(moving, grads)]
    qq = sum(float((t.double() ** 2).sum()) for t in q)
    if qq <= (NOISE * _norm(grads)) ** 2:  # q is roundoff: the null spaces are exact here
        return projected
    pq = sum(float((a.double() * b.double()).sum()) for a, b in zip(projected, q))
    # project again: the correction is a null-space vector up to roundoff, which this removes
    return [_project(spec, bases, p - (pq / qq) * t) for (spec, _), p, t in zip(moving, projected, q)]


@torch.no_grad()
def _mean_loss(model: nn.Module, batches: Batches, loss_fn: Callable) -> float:
    total, n = 0.0, 0
    for x, y in batches:
        total += float(loss_fn(model(x), y))
        n += int(x.shape[0])
    return total / max(n, 1)


def _project(spec: LayerSpec, bases: dict[str, LayerBasis], t: torch.Tensor) -> torch.Tensor:
    return from_blocks(spec, bases[spec.name].project(weight_blocks(spec, t)), t.shape)


def ascend(
    model: nn.Module,
    batches: Batches,
    layers: list[tuple[LayerSpec, nn.Module]],
    bases: dict[str, LayerBasis],
    config: TeleportConfig,
    loss_fn: Callable,
    *,
    noise_floor: float = 0.0,
    objective=None,
    on_step: Callable[[int, StepRecord | None], None] | None = None,
    guard: Batches | None = None,
    guard_tolerance: float = 0.0,
) -> TeleportStats:
    """Run projected ascent on ``model`` in place and return what happened.

    With ``guard`` (calibration samples kept out of the Grams and the objective), a step is
    also rejected when the guard loss drifts beyond ``guard_tolerance`` by the same rule: the
    null spaces are exact only on the samples they were built from, and the guard measures
    what the move does to samples they have not seen (early stopping on a validation split).

    Args:
        model: the model to move (a copy of the original), in eval mode on its device.
        batches: re-iterable calibration batches ``(inputs, targets)``.
        layers: the teleportable layers; only those with a basis in ``bases`` and a non-empty
            null space move.
        bases: name -> null-space basis (from :func:`teleport_cli.nullspace.bases.layer_basis`).
        config: step size, cap, tolerance, steps, target ratio, backtracks.
        loss_fn: summed loss of a batch, ``(logits, targets) -> scalar``.
        noise_floor: loss difference between two identical evaluations (added to the rule).
        on_step: called after every attempt with (step index, record or None if rejected).

    Returns:
        :class:`~teleport_cli.records.TeleportStats`.
    """
    start = time.perf_counter()
    objective = objective or GradNormObjective()
    moving = [(spec, module) for spec, module in layers if spec.name in bases and bases[spec.name].null_dim > 0]
    params = [p for p in model.parameters() if p.requires_grad]
    wrt = [layer_weight(spec, module) for spec, module in moving]
    n = sum(int(x.shape[0]) for x, _ in batches)

    state = full_gradient(model, batches, loss_fn, params, n)
    loss0, gnorm0 = state.loss, state.grad_norm
    guard0 = _mean_loss(model, guard, loss_fn) if guard is not None else 0.0
    score = objective.score(model, batches, loss_fn, params, state, n) if moving else 0.0
    score0 = score
    if not moving:
        return TeleportStats(loss0, loss0, gnorm0, gnorm0, 0, 0, "no_freedom", time.perf_counter() - start, (), objective.name)

    w0 = [w.detach().clone() for w in wrt]
    w0_norms = [float(w.double().norm()) for w in w0]
    total_norm = _norm(w0)
    eta = config.step_size
    log = StepLog(config.target_ratio, gnorm0, on_step)
    stop = "steps"
    while log.accepted < config.steps:
        direction = objective.direction(model, batches, loss_fn, params, wrt, state, n)
        projected = [_project(spec, bases, d) * objective.sign for (spec, _), d in zip(moving, direction)]
        if config.tangent:
            projected = _tangent(projected, moving, bases, state, params, wrt)
        pnorm = _norm(projected)
        if pnorm <= NOISE * _norm(direction):  # nothing but roundoff is left: no freedom
            stop = "no_freedom"
            break
        current = [w.detach().clone() for w in wrt]

        def propose(eta: float):
            scale = eta * total_norm / pnorm
            with torch.no_grad():
                for w, c, p, base, base_norm in zip(wrt, current, projected, w0, w0_norms):
                    new = c + scale * p
                    moved = float((new - base).double().norm())
                    if base_norm > 0 and moved > config.max_step * base_norm:
                        new = base + (new - base) * (config.max_step * base_norm / moved)
                    w.copy_(new)
            return {}

        def accept(cand: dict) -> bool:
            # the drift gates first, on forward passes only: most rejections end here, before
            # the backward pass the gradient state needs (profiled on test_resnet: 5.5 s -> 4.6 s)
            if not drift_ok(_mean_loss(model, batches, loss_fn), loss0, config.tolerance, noise_floor):
                return False
            if guard is not None and not drift_ok(_mean_loss(model, guard, loss_fn), guard0, guard_tolerance, noise_floor):
                return False
            cand["state"] = full_gradient(model, batches, loss_fn, params, n)
            if not drift_ok(cand["state"].loss, loss0, config.tolerance, noise_floor):
                return False
            cand["score"] = objective.score(model, batches, loss_fn, params, cand["state"], n)
            return objective.sign * (cand["score"] - score) > 0

        cand, eta, backtracks = backtrack(wrt, propose, accept, eta, config.max_backtracks, log.reject)
        if cand is None:
            stop = "backtracking"
            break
        state, score = cand["state"], cand["score"]
        if log.accept(eta, state.loss, state.grad_norm, backtracks):
            stop = "target_ratio"
            break
        if backtracks == 0:
            eta = min(eta * config.step_growth, config.max_step)
    return log.stats(loss0, state, stop, start, objective.name, score0, score)


def relative_changes(model: nn.Module, original: nn.Module, specs: list[LayerSpec]) -> dict[str, float]:
    """``||W - W0||_F / ||W0||_F`` for each layer of two models of the same architecture (by spec name)."""
    out = {}
    for spec in specs:
        w = model.get_parameter(spec.weight_key).detach().double()
        w0 = original.get_parameter(spec.weight_key).detach().double()
        denom = float(w0.norm())
        out[spec.name] = float((w - w0).norm()) / denom if denom > 0 else 0.0
    return out
