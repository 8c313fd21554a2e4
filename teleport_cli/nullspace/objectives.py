"""The teleport objectives, evaluated over the WHOLE calibration set, and their registry.

The calibration loss is ``L = (1/N) sum_n l(f(x_n), y_n)``. The gradient-norm objective of
arXiv:2502.11362 (Eq. 4) is ``L_tel = 1/2 ||grad L||^2``; its gradient is the Hessian-vector
product ``H g``. ``L_tel`` is not a sum over batches, so it is computed in two streaming passes:
first the full gradient ``g = sum_b grad L_b`` (with ``L_b`` the batch's share of L), then
``H g`` (:mod:`teleport_cli.nullspace.hvp`: by finite differences of gradients, or per-batch
double backward with g held constant). Activations are freed after every batch.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .derivatives import GradientState
from .hvp import HessianVectorProduct
from .lookahead import LookaheadObjective
from .trace import TraceObjective


class GradNormObjective:
    """Maximise ``1/2 ||grad L||^2`` (arXiv:2502.11362, Eq. 4); the ascent direction is ``H g``."""

    name = "grad-norm"
    sign = +1.0

    def __init__(self, hvp: str | HessianVectorProduct = "exact") -> None:
        self.hvp = hvp if isinstance(hvp, HessianVectorProduct) else HessianVectorProduct(hvp)

    def direction(self, model, batches, loss_fn, params, wrt, state: GradientState, n: int) -> list[torch.Tensor]:
        """Gradient of the objective with respect to ``wrt`` at the point where ``state`` was taken
        (``H g``; a forward difference reuses ``state.grads``)."""
        return self.hvp(model, batches, loss_fn, params, state.grads, wrt, n, grads=state.grads)

    def score(self, model, batches, loss_fn, params, state: GradientState, n: int) -> float:
        """The objective's value at the point where ``state`` was taken (no extra pass)."""
        return 0.5 * state.grad_norm**2


def make_objective(name: str, *, lr: float | None = None, lookahead_steps: int = 1, probes: int = 4, seed: int = 0, hvp: str = "exact"):
    """The objective called ``name`` (one of :data:`teleport_cli.config.OBJECTIVES`); ``hvp`` is the
    Hessian-vector-product mode of grad-norm and lookahead (:data:`teleport_cli.nullspace.hvp.HVP_MODES`;
    the trace objective keeps its exact third derivative).

    Raises:
        ConfigError: unknown name, or ``lookahead`` without a learning rate.
    """
    if name == "grad-norm":
        return GradNormObjective(hvp)
    if name == "lookahead" and lr is not None:
        return LookaheadObjective(lr, lookahead_steps, hvp=hvp)
    if name == "trace":
        return TraceObjective(probes, seed)
    raise ConfigError(f"objective {name!r} cannot be built (lookahead needs --lr)", hint="use grad-norm, lookahead with --lr, or trace")
