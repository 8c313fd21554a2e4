"""Hessian-vector products of the calibration loss: by finite differences of gradients, or exact.

Modes (``--hvp``):

* ``forward``: ``H v ~ (g(w + eps v) - g(w)) / eps``. It reuses the gradient ``g(w)`` the step
  already has, so one product costs one extra gradient pass. Truncation error O(eps ||v||).
* ``central``: ``H v ~ (g(w + eps v) - g(w - eps v)) / (2 eps)``: two gradient passes,
  truncation error O(eps^2 ||v||^2).
* ``exact``: double backward (:func:`~teleport_cli.nullspace.derivatives.hessian_vector_product`).
* ``auto``: on its first product, compares the (projected) forward differences at ``eps`` and
  ``eps / 4``. Within ``AGREEMENT`` (relative) it keeps forward differences; otherwise it
  switches to ``exact`` where the model has a double backward, and where it has none (torch has
  no derivative of ``hardsigmoid_backward``: MobileNetV3, LCNet) it keeps forward differences at
  the step of least disagreement among ``eps / 4^k``, k = 0..3, and says so.

The step is ``eps = sqrt(u) (1 + ||w||) / ||v||`` with ``u`` the machine epsilon of the compute
dtype and ``||w||`` the norm of all trainable parameters (Nocedal and Wright, Numerical
Optimization, 2nd ed., Sec. 8.1, Eq. 8.6 and the choice of eps below it), so the perturbation
``eps v`` has norm ``sqrt(u) (1 + ||w||)`` whatever the scale of ``v``. Both gradients of a
difference stream the same batches in the same order with TF32 off on CUDA (both are in fp32),
and the weights are restored bit for bit after each perturbation.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import torch

from ..config import HVP_MODES
from ..errors import InputError
from .derivatives import Batches, full_gradient, hessian_vector_product

# auto keeps finite differences when the projected products at eps and eps/4 agree to this
AGREEMENT = 1e-2
SHRINK = 4.0

Vec = list[torch.Tensor]
Check = Callable[[Sequence[torch.Tensor], Vec], Vec]


def _norm(ts) -> float:
    return math.sqrt(sum(float((t.detach().double() ** 2).sum()) for t in ts))


def relative_difference(a: Vec, b: Vec) -> float:
    """``||a - b|| / max(||a||, ||b||)`` over lists of tensors (0 when both are zero)."""
    scale = max(_norm(a), _norm(b))
    return _norm([x.double() - y.double() for x, y in zip(a, b)]) / scale if scale > 0 else 0.0


def base_epsilon(params: Sequence[torch.Tensor], vector: Sequence[torch.Tensor]) -> float:
    """``sqrt(u) (1 + ||w||) / ||v||`` with u the machine epsilon of the parameters' dtype."""
    u = torch.finfo(params[0].dtype).eps
    vn = _norm(vector)
    return math.sqrt(u) * (1.0 + _norm(params)) / vn if vn > 0 else 0.0


@contextlib.contextmanager
def full_precision_matmul() -> Iterator[None]:
    """TF32 off for CUDA matmuls and cuDNN convolutions inside the block (restored after)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def missing_double_backward(error: BaseException) -> bool:
    """Whether ``error`` is autograd's "derivative for ... is not implemented"."""
    text = str(error)
    return isinstance(error, (RuntimeError, NotImplementedError)) and "derivative for" in text and "not implemented" in text


def gradient_at(model, batches: Batches, loss_fn, params, vector, step: float, n: int) -> Vec:
    """The calibration-loss gradient at ``w + step * v`` (all ``params``); ``w`` is restored exactly."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, v in zip(params, vector):
                p.add_(v, alpha=step)
        with full_precision_matmul():
            return full_gradient(model, batches, loss_fn, params, n).grads
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


class HessianVectorProduct:
    """``H v`` of the mean calibration loss by the mode in :data:`HVP_MODES` (see the module docstring).

    Call it as ``hvp(model, batches, loss_fn, params, vector, wrt, n, grads=None)``: ``vector`` holds
    one tensor per ``params`` entry (same shapes and dtype), the result one per ``wrt`` entry (a
    subset of ``params``). ``grads`` is the gradient at the current point over ``params`` on the
    same batches (a forward difference reuses it; without it one more pass computes it). ``check``
    maps ``(wrt, hv)`` to the vector ``auto`` compares (the null-space projection in the ascent).

    Raises:
        InputError: mode ``exact`` on a model with an op that has no double backward.
    """

    def __init__(self, mode: str = "exact", check: Check | None = None) -> None:
        if mode not in HVP_MODES:
            raise ValueError(f"hvp mode must be one of {HVP_MODES}")
        self.requested = mode
        self.mode = None if mode == "auto" else mode
        self.check = check
        self.factor = 1.0  # eps = factor * base_epsilon
        self.epsilon: float | None = None  # the last step used, in units of w per unit of v
        self.disagreement: float | None = None
        self.note = ""
        self.products = 0

    def to_dict(self) -> dict:
        """The choice, for the JSON output: requested and used mode, eps/base eps, the disagreement."""
        return {"requested": self.requested, "mode": self.mode or "auto", "epsilon_factor": self.factor, "epsilon": self.epsilon,
                "disagreement": self.disagreement, "agreement_threshold": AGREEMENT, "note": self.note, "products": self.products}

    def __call__(self, model, batches: Batches, loss_fn, params, vector, wrt, n: int, grads: Vec | None = None) -> Vec:
        self.products += 1
        if self.mode is None:
            return self._decide(model, batches, loss_fn, params, vector, wrt, n, grads)
        return self._product(self.mode, self.factor, model, batches, loss_fn, params, vector, wrt, n, grads)

    def _restrict(self, params, wrt, full: Vec) -> Vec:
        index = {id(p): i for i, p in enumerate(params)}
        return [full[index[id(w)]] for w in wrt]

    def _product(self, mode, factor, model, batches, loss_fn, params, vector, wrt, n, grads) -> Vec:
        if mode == "exact":
            try:
                return hessian_vector_product(model, batches, loss_fn, params, vector, wrt, n)
            except RuntimeError as e:
                if not missing_double_backward(e):
                    raise
                raise InputError(f"--hvp exact needs a double backward, which this model lacks ({str(e).splitlines()[0]})",
                                 hint="use --hvp auto or forward (finite differences of gradients)") from None
        eps = factor * base_epsilon(params, vector)
        self.epsilon = eps
        if eps == 0.0:
            return [torch.zeros_like(w) for w in wrt]
        plus = gradient_at(model, batches, loss_fn, params, vector, eps, n)
        if mode == "central":
            minus = gradient_at(model, batches, loss_fn, params, vector, -eps, n)
            return self._restrict(params, wrt, [(a - b) / (2 * eps) for a, b in zip(plus, minus)])
        if grads is None:
            with full_precision_matmul():
                grads = full_gradient(model, batches, loss_fn, params, n).grads
        return self._restrict(params, wrt, [(a - b) / eps for a, b in zip(plus, grads)])

    def _compare(self, wrt, a: Vec, b: Vec) -> float:
        if self.check is not None:
            a, b = self.check(wrt, a), self.check(wrt, b)
        return relative_difference(a, b)

    def _decide(self, model, batches, loss_fn, params, vector, wrt, n, grads) -> Vec:
        if grads is None:
            with full_precision_matmul():
                grads = full_gradient(model, batches, loss_fn, params, n).grads
        args = (model, batches, loss_fn, params, vector, wrt, n, grads)
        first = self._product("forward", 1.0, *args)
        second = self._product("forward", 1.0 / SHRINK, *args)
        self.disagreement = self._compare(wrt, first, second)
        if self.disagreement <= AGREEMENT:
            self.mode, self.factor, self.epsilon = "forward", 1.0, base_epsilon(params, vector)
            self.note = "finite differences at eps and eps/4 agree"
            return first
        try:
            exact = hessian_vector_product(model, batches, loss_fn, params, vector, wrt, n)
        except RuntimeError as e:
            if not missing_double_backward(e):
                raise
        else:
            self.mode, self.epsilon = "exact", None
            self.note = f"finite differences at eps and eps/4 differ by {self.disagreement:.3g} > {AGREEMENT:g}: double backward"
            return exact
        # no double backward: the step of least disagreement among eps / 4^k
        best = (self.disagreement, 1.0, first)
        factor, previous = 1.0 / SHRINK, second
        for _ in range(3):
            nxt = self._product("forward", factor / SHRINK, *args)
            d = self._compare(wrt, previous, nxt)
            if d < best[0]:
                best = (d, factor, previous)
            factor, previous = factor / SHRINK, nxt
        self.disagreement, self.factor, chosen = best
        self.mode, self.epsilon = "forward", self.factor * base_epsilon(params, vector)
        self.note = (f"the model has no double backward: kept forward differences at eps*{self.factor:g}, "
                     f"where consecutive steps disagree by {self.disagreement:.3g}"
                     + (" (above the threshold: the direction is approximate)" if self.disagreement > AGREEMENT else ""))
        return chosen
