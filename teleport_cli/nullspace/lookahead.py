"""The look-ahead objective: the calibration loss after k virtual SGD steps at the resume lr.

``F(theta) = L(theta_k)`` with ``theta_{i+1} = theta_i - lr * grad L(theta_i)``, minimised on the
level set (design notes, Sec. 4; not in arXiv:2502.11362). Since ``L(theta)`` is fixed on the level
set, for k = 1 this maximises ``lr ||g||^2 - lr^2/2 g^T H g`` to second order: it rewards gradient
norm and penalises curvature along g at once.

Its gradient is backpropagated through the virtual steps:
``v_k = grad L(theta_k)``, then ``v_i = v_{i+1} - lr * H(theta_i) v_{i+1}`` for i = k-1 .. 0,
each ``H v`` a streaming Hessian-vector product over the whole calibration set
(:mod:`teleport_cli.nullspace.hvp`; a forward difference reuses the gradient at theta_i). Cost per
evaluation: k + 1 gradient passes and k Hessian-vector products. With the calibration set in one
batch, the score at theta_k is a forward pass whose graph is kept, and its backward runs only
when the point is accepted and the direction needs it: a candidate the score rejects costs
k gradient passes and one forward pass.
"""

from __future__ import annotations

import torch

from .derivatives import GradientState, PendingGradient, full_gradient, one_batch
from .hvp import HessianVectorProduct


def _pending_last(model, batches, loss_fn, params, grads, lr: float, n: int) -> PendingGradient:
    """The last virtual step without touching the model: ``theta_k = theta_{k-1} - lr g`` as fresh
    leaf tensors fed through ``torch.func.functional_call`` (the same float operations as the
    in-place step), so the forward pass's graph stays valid after the parameters are restored and
    the gradient at theta_k costs only its backward, when an accepted step needs it."""
    names = {id(p): name for name, p in model.named_parameters()}
    moved = [(p.detach() - lr * g).requires_grad_(True) for p, g in zip(params, grads)]
    table = {names[id(p)]: m for p, m in zip(params, moved)}
    return PendingGradient(model, batches, loss_fn, moved, n,
                           forward=lambda x: torch.func.functional_call(model, table, (x,)))


class LookaheadObjective:
    """Minimise the calibration loss after ``steps`` virtual SGD steps at learning rate ``lr``."""

    name = "lookahead"
    sign = -1.0

    def __init__(self, lr: float, steps: int = 1, hvp: str | HessianVectorProduct = "exact") -> None:
        self.lr = float(lr)
        self.steps = int(steps)
        self.hvp = hvp if isinstance(hvp, HessianVectorProduct) else HessianVectorProduct(hvp)
        self._cache: tuple[GradientState, list[GradientState]] | None = None

    def _trajectory(self, model, batches, loss_fn, params, state: GradientState, n: int) -> list[GradientState]:
        """Gradient states at theta_0 .. theta_k (the parameters are restored afterwards)."""
        if self._cache is not None and self._cache[0] is state:
            return self._cache[1]
        origin = [p.detach().clone() for p in params]
        states = [state]
        try:
            for i in range(self.steps):
                if i == self.steps - 1 and one_batch(batches):
                    states.append(_pending_last(model, batches, loss_fn, params, states[-1].grads, self.lr, n))
                    break
                with torch.no_grad():
                    for p, g in zip(params, states[-1].grads):
                        p.sub_(self.lr * g)
                states.append(full_gradient(model, batches, loss_fn, params, n))
        finally:
            with torch.no_grad():
                for p, o in zip(params, origin):
                    p.copy_(o)
        self._cache = (state, states)
        return states

    def score(self, model, batches, loss_fn, params, state: GradientState, n: int) -> float:
        """``L(theta_k)``: mean calibration loss after the virtual steps (nats); with one batch a
        forward pass at theta_k, whose graph :meth:`direction` reuses for the gradient there."""
        return self._trajectory(model, batches, loss_fn, params, state, n)[-1].loss

    def direction(self, model, batches, loss_fn, params, wrt, state: GradientState, n: int) -> list[torch.Tensor]:
        """``d L(theta_k) / d wrt`` by reverse accumulation through the virtual steps."""
        states = self._trajectory(model, batches, loss_fn, params, state, n)
        origin = [p.detach().clone() for p in params]
        last = states[-1].gradient() if isinstance(states[-1], PendingGradient) else states[-1]
        v = [g.clone() for g in last.grads]
        try:
            for i in reversed(range(self.steps)):
                with torch.no_grad():  # move to theta_i = theta_0 - lr * sum_{j<i} g_j, by the same
                    for p, o in zip(params, origin):  # float operations as the trajectory took
                        p.copy_(o)
                    for t in range(i):
                        for p, g in zip(params, states[t].grads):
                            p.sub_(self.lr * g)
                hv = self.hvp(model, batches, loss_fn, params, v, params, n, grads=states[i].grads)
                v = [a - self.lr * b for a, b in zip(v, hv)]
        finally:
            with torch.no_grad():
                for p, o in zip(params, origin):
                    p.copy_(o)
        index = {id(p): i for i, p in enumerate(params)}
        return [v[index[id(w)]] for w in wrt]
