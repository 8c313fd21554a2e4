"""The projected ascent loop: move the teleportable weights inside their null spaces.

Each step (arXiv:2502.11362, Algorithm 1, with the step control of the design notes, Sec. 5):

1. ``d = grad of the objective`` w.r.t. each teleported weight (``H g`` for the gradient norm);
2. project each layer's ``d`` onto its null space, group by group: ``P = d N N^T``;
   and, with ``tangent``, remove its component along the projected loss gradient (with
   ``guard_tangent`` also along the projected gradients of the guard's bound terms);
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

import contextlib
import dataclasses
import time
from typing import Callable

import torch
from torch import nn

from ..config import TeleportConfig
from ..parallel.collective import agree, broadcast_
from ..parallel.group import active
from ..records import StepRecord, TeleportStats
from .bases import LayerBasis
from .derivatives import Batches, GradientState, PendingGradient, count_samples, full_gradient
from .guard import Guard
from .hvp import full_precision_matmul
from .layers import LayerSpec, from_blocks, layer_weight, weight_blocks
from .linesearch import StepLog, backtrack, drift_ok
from .objectives import GradNormObjective

# A projected direction smaller than this share of the unprojected one is roundoff (float32
# gradients leak about 1e-7 into directions where the exact value is zero); the normalised
# step would blow it up to a full step, so it counts as zero.
NOISE = 1e-6
# a line search ends after this many consecutive candidates, each shorter than every step accepted
# so far, that passed every drift gate but did not improve the objective: halving on reaches only
# changes the objective no longer resolves (on test_resnet, seed 0, the last search's six such
# candidates, eta 2.4e-6 down to 7.6e-8 below the shortest accepted 4.9e-6, all changed the
# look-ahead loss by +1.8e-6 to +4.7e-6, whatever their length). Longer candidates may overshoot
# after a growth and be followed by an accepted halving: they do not count.
FLAT_REJECTIONS = 2


# the clock of --max-seconds (a module attribute, so that tests can replace it by a fake clock)
clock = time.perf_counter


class _OutOfTime(Exception):
    """``config.max_seconds`` ran out during a step: the loop keeps its last accepted point."""


def _out_of_time(config: TeleportConfig, start: float, local: bool = False) -> bool:
    """Whether the --max-seconds budget is spent; ``local``: this process's clock alone, else rank
    0's decision (under torchrun every rank asks at the same points, so the collectives match)."""
    if config.max_seconds is None:
        return False
    late = clock() - start >= config.max_seconds
    return late if local else agree(late)


class _Timed:
    """``batches`` with the --max-seconds clock read before every batch: a pass (gradient, Hessian-
    vector product, drift check, look-ahead) raises :class:`_OutOfTime` between two batches once
    the budget is spent, instead of running to its end. Every pass restores the weights it
    perturbs in a ``finally``, so the loop's weights are those of its last accepted step or candidate."""

    def __init__(self, batches: Batches, config: TeleportConfig, start: float) -> None:
        self.batches, self.config, self.start = batches, config, start

    def __iter__(self):
        for batch in self.batches:
            # one process only: under torchrun ranks differ in their batches, so the clock is
            # read between passes, where every rank asks (rank 0 decides)
            if active() is None and _out_of_time(self.config, self.start, local=True):
                raise _OutOfTime
            yield batch

    def __len__(self) -> int:
        return len(self.batches)


def _norm(ts) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in ts)))


def _dot(a, b) -> float:
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))


def _tangent(projected, moving, bases, gradients) -> list[torch.Tensor]:
    """Remove from the step its components along the projected loss gradients ``q_j``.

    ``gradients``: one or more gradients (each a list over the moving weights), e.g. the
    calibration loss's and, with ``guard_tangent``, the guard's mean loss's. With tau < 1 the
    null spaces are approximate and a loss changes to first order by ``<q, step>``; removing
    the step's component in the span of the ``q_j`` (Gram-Schmidt, then one projection) keeps
    it tangent to every such level set to first order (the first-order condition of level-set
    teleportation, Mishkin et al. 2024). A ``q`` that is roundoff (exact null spaces: ``q = 0``)
    or already in the span of the others is skipped.
    """
    basis = []  # (q_j, <q_j, q_j>), orthogonal to each other
    for grads in gradients:
        q = [_project(spec, bases, g) for (spec, _), g in zip(moving, grads)]
        for b, bb in basis:  # Gram-Schmidt against the directions kept so far
            c = _dot(q, b) / bb
            q = [t - c * u for t, u in zip(q, b)]
        qq = _dot(q, q)
        if qq <= (NOISE * _norm(grads)) ** 2:  # roundoff: the null spaces are exact for this loss
            continue
        basis.append((q, qq))
    if not basis:
        return projected
    out = projected
    for b, bb in basis:
        c = _dot(out, b) / bb
        out = [p - c * t for p, t in zip(out, b)]
    # project again: the correction is a null-space vector up to roundoff, which this removes
    return [_project(spec, bases, p) for (spec, _), p in zip(moving, out)]


def _moving_grads(state: GradientState, params, wrt) -> list[torch.Tensor]:
    index = {id(p): i for i, p in enumerate(params)}
    return [state.grads[index[id(w)]] for w in wrt]


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
    on_step: Callable[[int, StepRecord | None, StepLog], None] | None = None,
    guard: Batches | None = None,
    guard_tolerance: float = 0.0,
    guard_trust: float | None = None,
    guard_rule: str = "gate",
    round_to: dict[str, torch.dtype] | None = None,
    states: dict | None = None,
    clock_start: float | None = None,
    start_state: GradientState | None = None,
) -> TeleportStats:
    """Run projected ascent on ``model`` in place and return what happened.

    With ``guard`` (calibration samples kept out of the Grams and the objective), a step is
    also rejected when the guard loss drifts beyond ``guard_tolerance`` by the same rule: the
    null spaces are exact only on the samples they were built from, and the guard measures
    what the move does to samples they have not seen (early stopping on a validation split).
    With ``guard_trust`` (the held-out tolerance) each candidate is also tested by the guard's
    confidence bound (:mod:`teleport_cli.nullspace.guard`). With ``guard_rule`` ``gate`` (the
    default) a step that fails it is rejected like any other; with ``step_back`` failing steps
    are accepted and the loop ends at the furthest accepted point that passed it (the steps
    after it are undone and counted in ``step_backs``). bench/guard_margin.py measured both
    (docs/guard.md): the gate kept more gradient-norm gain at 5 guard samples.

    With ``round_to`` (weight key -> stored dtype, e.g. ``torch.float16``) every candidate is
    rounded to its stored dtype before it is checked, so the drift rules judge the weights as
    they will be written and the cast back changes nothing.

    Args:
        model: the model to move (a copy of the original), in eval mode on its device.
        batches: re-iterable calibration batches ``(inputs, targets)``.
        layers: the teleportable layers; only those with a basis in ``bases`` and a non-empty
            null space move.
        bases: name -> null-space basis (from :func:`teleport_cli.nullspace.bases.layer_basis`).
        config: step size, cap, tolerance, steps, target ratio, backtracks.
        loss_fn: summed loss of a batch, ``(logits, targets) -> scalar``.
        noise_floor: loss difference between two identical evaluations (added to the rule).
        on_step: called after every attempt with (accepted steps, record or None if rejected, the StepLog).
        guard, guard_tolerance, guard_trust, guard_rule: see above.
        round_to: see above; keys are ``spec.weight_key``.
        states: if given, receives the :class:`GradientState` (over the trainable parameters) at
            the start (``"before"``) and at the end (``"after"``), for callers that report
            figures over a larger set without another pass over these batches.
        clock_start: the :data:`clock` reading from which ``config.max_seconds`` counts (the
            teleport's start, so that capture and bases count too); None: the ascent's start.
            The clock is read before every batch of every pass after the first gradient (in
            one process; under torchrun between passes, on rank 0).
        start_state: the gradient state at the model's weights over ``batches`` and the trainable
            parameters (in full fp32), when the caller has it (the look-ahead's Lanczos took it);
            None: the loop's first pass computes it.

    Returns:
        :class:`~teleport_cli.records.TeleportStats`.
    """
    start = time.perf_counter()
    budget_start = clock() if clock_start is None else clock_start
    objective = objective or GradNormObjective(config.hvp)
    moving = [(spec, module) for spec, module in layers if spec.name in bases and bases[spec.name].null_dim > 0]
    params = [p for p in model.parameters() if p.requires_grad]
    wrt = [layer_weight(spec, module) for spec, module in moving]
    n = count_samples(batches)
    hvp = getattr(objective, "hvp", None)
    if hvp is None:
        return _ascend(model, batches, moving, bases, config, loss_fn, noise_floor, objective, on_step, guard, guard_tolerance,
                           guard_trust, guard_rule, round_to, start, params, wrt, n, states, budget_start, start_state)
    spec_of = {id(w): spec for (spec, _), w in zip(moving, wrt)}
    # auto compares what the step uses: the products projected onto the null spaces
    hvp.check = lambda ws, hv: [_project(spec_of[id(w)], bases, h) for w, h in zip(ws, hv) if id(w) in spec_of]
    # finite differences: both gradients of a difference in full fp32 (no TF32 on CUDA)
    with full_precision_matmul() if hvp.requested != "exact" else contextlib.nullcontext():
        stats = _ascend(model, batches, moving, bases, config, loss_fn, noise_floor, objective, on_step, guard, guard_tolerance,
                           guard_trust, guard_rule, round_to, start, params, wrt, n, states, budget_start, start_state)
    return dataclasses.replace(stats, hvp=hvp.to_dict())


def _ascend(model, batches, moving, bases, config, loss_fn, noise_floor, objective, on_step, guard, guard_tolerance,
            guard_trust, guard_rule, round_to, start, params, wrt, n, states, budget_start, start_state) -> TeleportStats:
    """The loop of :func:`ascend` (arguments as there)."""
    state = start_state if start_state is not None else full_gradient(model, batches, loss_fn, params, n)
    loss0, gnorm0 = state.loss, state.grad_norm
    states = {} if states is None else states
    states["before"] = states["after"] = state
    watch = Guard(model, guard, loss_fn, guard_tolerance, guard_trust, noise_floor, config.guard_z) if guard is not None else None
    dtypes = [(round_to or {}).get(spec.weight_key) for spec, _ in moving]
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
    rejections: dict[str, int] = {}  # rejected candidates by the rule that rejected them
    why = ["objective"]
    kept = (0, w0, state, score)  # the furthest accepted point the guard trusts: (step, weights, state, score)
    shortest = None  # the shortest accepted step length (None before the first: no candidate counts as shorter)
    batches = _Timed(batches, config, budget_start)  # from here on, every pass reads the clock between batches
    while log.accepted < config.steps:
        if _out_of_time(config, budget_start):
            stop = "max_seconds"
            break
        try:
            direction = objective.direction(model, batches, loss_fn, params, wrt, state, n)
        except _OutOfTime:  # the weights are restored by the pass: still the last accepted step
            stop = "max_seconds"
            break
        projected = [_project(spec, bases, d) * objective.sign for (spec, _), d in zip(moving, direction)]
        if config.tangent:
            gradients = [_moving_grads(state, params, wrt)]
            if config.guard_tangent != "off" and watch is not None:  # and to the guard's bound terms
                gradients += watch.gradients(model, wrt, spread=config.guard_tangent == "bound")
            projected = _tangent(projected, moving, bases, gradients)
        broadcast_(projected)  # rank 0's step on every rank: the weights stay bit-identical
        pnorm = _norm(projected)
        if agree(pnorm <= NOISE * _norm(direction)):  # nothing but roundoff is left: no freedom
            stop = "no_freedom"
            break
        current = [w.detach().clone() for w in wrt]

        def propose(eta: float):
            scale = eta * total_norm / pnorm
            with torch.no_grad():
                for w, c, p, base, base_norm, dt in zip(wrt, current, projected, w0, w0_norms, dtypes):
                    new = c + scale * p
                    moved = float((new - base).double().norm())
                    if base_norm > 0 and moved > config.max_step * base_norm:
                        new = base + (new - base) * (config.max_step * base_norm / moved)
                    w.copy_(new if dt is None else new.to(dt))  # rounded as it will be stored
            return {"eta": eta}

        flat = [0]  # consecutive candidates of this search shorter than every accepted step that only the objective rejected

        def accept(cand: dict) -> bool:
            if _out_of_time(config, budget_start):
                raise _OutOfTime
            chain, flat[0] = flat[0], 0
            # the gates first, before the backward pass the gradient state needs: the guard's (a
            # no-grad forward over its 20%; it rejected 70 of the 77 rejected candidates on the four
            # shipped mid samples, seed 0, the objective 7, the fit set's drift none), then the fit
            # set's drift on its forward pass (with one batch the gradient pass's own,
            # PendingGradient); every rule is a function of the candidate alone, so their order
            # changes the cost, never the decision
            if watch is not None:
                gate, cand["trusted"] = watch.check(model)
                why[0] = "guard" if not gate else "trust"
                if not gate or (guard_rule == "gate" and not cand["trusted"]):
                    return False
            pending = PendingGradient(model, batches, loss_fn, params, n)
            why[0] = "calibration"
            if not agree(drift_ok(pending.loss, loss0, config.tolerance, noise_floor)):
                return False
            cand["state"] = pending.gradient()
            if not agree(drift_ok(cand["state"].loss, loss0, config.tolerance, noise_floor)):
                return False
            cand["score"] = objective.score(model, batches, loss_fn, params, cand["state"], n)
            why[0] = "objective"
            improved = agree(objective.sign * (cand["score"] - score) > 0)
            flat[0] = chain + 1 if not improved and shortest is not None and cand["eta"] < shortest else 0
            return improved

        def rejected() -> None:
            rejections[why[0]] = rejections.get(why[0], 0) + 1
            log.reject()

        try:
            cand, eta, backtracks = backtrack(wrt, propose, accept, eta, config.max_backtracks, rejected,
                                              give_up=lambda: flat[0] >= FLAT_REJECTIONS)
        except _OutOfTime:  # undo the candidate: the weights stay at the last accepted step
            with torch.no_grad():
                for w, c in zip(wrt, current):
                    w.copy_(c)
            stop = "max_seconds"
            break
        if cand is None:
            stop = "backtracking"
            break
        state, score, shortest = cand["state"], cand["score"], eta if shortest is None else min(shortest, eta)
        if cand.get("trusted", True):
            kept = (log.accepted + 1, [w.detach().clone() for w in wrt], state, score)
        if agree(log.accept(eta, state.loss, state.grad_norm, backtracks)):
            stop = "target_ratio"
            break
        if backtracks == 0:
            eta = min(eta * config.step_growth, config.max_step)
    step_backs = log.accepted - kept[0]
    if step_backs:  # back along the accepted path to the furthest point the guard trusts
        with torch.no_grad():
            for w, v in zip(wrt, kept[1]):
                w.copy_(v)
        state, score = kept[2], kept[3]
        log.accepted = kept[0]
    states["after"] = state
    return dataclasses.replace(log.stats(loss0, state, stop, start, objective.name, score0, score), step_backs=step_backs,
                               rejections=rejections)


def relative_changes(model: nn.Module, original: nn.Module, specs: list[LayerSpec]) -> dict[str, float]:
    """``||W - W0||_F / ||W0||_F`` for each layer of two models of the same architecture (by spec name)."""
    out = {}
    for spec in specs:
        w = model.get_parameter(spec.weight_key).detach().double()
        w0 = original.get_parameter(spec.weight_key).detach().double()
        denom = float(w0.norm())
        out[spec.name] = float((w - w0).norm()) / denom if denom > 0 else 0.0
    return out
