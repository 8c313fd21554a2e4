"""The backtracking line search and step bookkeeping that every teleport loop shares.

A loop proposes a candidate at step length ``eta`` (writing the tensors in place), the caller's
rule accepts or rejects it; a rejected candidate is undone and ``eta`` halves, at most
``max_backtracks`` times (design notes, Sec. 5: a fixed step on 1/2 ||g||^2 diverges).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import torch

from ..records import StepRecord, TeleportStats

C = TypeVar("C")


def drift_ok(loss: float, loss0: float, tolerance: float, noise_floor: float = 0.0) -> bool:
    """The drift rule shared by the loop and verification: ``|L - L0| <= tol*|L0| + 1e-6 + floor``."""
    return abs(loss - loss0) <= tolerance * abs(loss0) + 1e-6 + noise_floor


def gradient_norm_step(params, state, loss0: float, propose: Callable, eta: float, config, noise_floor: float, log: "StepLog"):
    """One backtracked step of a gradient-norm ascent held to the level set (the baselines' rule).

    A candidate is accepted when the calibration-loss drift passes :func:`drift_ok` and the
    gradient norm grew. Returns ``(state, eta, stop)``: the new state (the old one if nothing was
    accepted), the step length used, and ``"backtracking"``, ``"target_ratio"`` or None.
    """

    def accept(cand) -> bool:
        return drift_ok(cand.loss, loss0, config.tolerance, noise_floor) and cand.grad_norm > state.grad_norm

    cand, eta, backtracks = backtrack(params, propose, accept, eta, config.max_backtracks, log.reject)
    if cand is None:
        return state, eta, "backtracking"
    return cand, eta, "target_ratio" if log.accept(eta, cand.loss, cand.grad_norm, backtracks) else None


def backtrack(
    tensors: Sequence[torch.Tensor],
    propose: Callable[[float], C],
    accept: Callable[[C], bool],
    eta: float,
    max_backtracks: int,
    on_reject: Callable[[], None],
    give_up: Callable[[], bool] | None = None,
) -> tuple[C | None, float, int]:
    """Try ``propose(eta)`` with halving ``eta`` until ``accept`` holds.

    Args:
        tensors: the tensors ``propose`` writes in place; restored after each rejection.
        propose: sets the tensors to the candidate at step length ``eta``; returns what
            ``accept`` needs (e.g. the gradient state there).
        accept: the acceptance rule.
        eta: the first step length tried.
        max_backtracks: halvings allowed after the first try.
        on_reject: called once per rejected candidate.
        give_up: asked after each rejection (after ``on_reject``); True ends the search there, as
            if the halvings had run out (None: never).

    Returns:
        (candidate or None, the step length of the last try, number of rejections). On None
        the tensors hold their values from before the search.
    """
    current = [t.detach().clone() for t in tensors]
    backtracks = 0
    while True:
        cand = propose(eta)
        if accept(cand):
            return cand, eta, backtracks
        backtracks += 1
        on_reject()
        with torch.no_grad():
            for t, c in zip(tensors, current):
                t.copy_(c)
        if backtracks > max_backtracks or (give_up is not None and give_up()):
            return None, eta, backtracks
        eta *= 0.5


@dataclass
class StepLog:
    """Counts accepted and rejected steps, keeps the history, reports progress, checks the target.

    ``on_step(accepted, record, log)`` is called after every attempt: ``record`` is the
    accepted step's :class:`StepRecord`, or None for a rejection; ``log`` is this log (its
    ``rejected`` and ``grad_norm0`` give the counts and the start for a progress display).
    """

    target_ratio: float | None
    grad_norm0: float
    on_step: Callable[[int, StepRecord | None, "StepLog"], None] | None = None
    accepted: int = 0
    rejected: int = 0
    history: list[StepRecord] = field(default_factory=list)

    def reject(self) -> None:
        self.rejected += 1
        if self.on_step is not None:
            self.on_step(self.accepted, None, self)

    def accept(self, eta: float, loss: float, grad_norm: float, backtracks: int) -> bool:
        """Record an accepted step; True when ``grad_norm / grad_norm0`` reached the target ratio."""
        self.accepted += 1
        self.history.append(StepRecord(self.accepted, eta, loss, grad_norm, backtracks))
        if self.on_step is not None:
            self.on_step(self.accepted, self.history[-1], self)
        return self.target_ratio is not None and self.grad_norm0 > 0 and grad_norm / self.grad_norm0 >= self.target_ratio

    def stats(self, loss0: float, state, stop: str, start: float, objective: str, score0: float, score: float) -> TeleportStats:
        """What the loop did: losses and gradient norms before and after (``state`` is the last
        accepted gradient state), the step counts and history, and the seconds since ``start``
        (a ``time.perf_counter()`` reading)."""
        return TeleportStats(loss0, state.loss, self.grad_norm0, state.grad_norm, self.accepted, self.rejected, stop,
                             time.perf_counter() - start, tuple(self.history), objective, score0, score)
