"""The curvature objective: Hutchinson's estimate of the Hessian trace, minimised on the level set.

``T(theta) = (1/P) sum_p v_p^T H(theta) v_p`` with P fixed Rademacher probes ``v_p`` over all
trainable parameters (Hutchinson 1990; ``E[v^T H v] = tr H``). The probes are drawn once from a
seeded generator so that the objective is the same function at every step (backtracking compares
its values). ``v^T H v`` is a sum over batches of ``v^T H_b v`` (double backward); its gradient
needs a third derivative (triple backward through the model), about 3x the cost of a Hessian-
vector product per probe.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..parallel.collective import all_reduce_sum
from .derivatives import GradientState


class TraceObjective:
    """Minimise the Hutchinson estimate of tr(H) over the calibration set with ``probes`` probes."""

    name = "trace"
    sign = -1.0

    def __init__(self, probes: int = 4, seed: int = 0) -> None:
        self.probes = int(probes)
        self.seed = int(seed)
        self._v: list[list[torch.Tensor]] | None = None

    def _vectors(self, params) -> list[list[torch.Tensor]]:
        if self._v is None:
            g = torch.Generator().manual_seed(self.seed)
            self._v = [
                [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p.device, p.dtype) for p in params]
                for _ in range(self.probes)
            ]
        return self._v

    def _run(self, model, batches, loss_fn, params, wrt, n: int) -> tuple[float, list[torch.Tensor] | None]:
        total = 0.0
        grads = [torch.zeros_like(w) for w in wrt] if wrt is not None else None
        with sdpa_kernel([SDPBackend.MATH]):
            for v in self._vectors(params):
                for x, y in batches:
                    loss_b = loss_fn(model(x), y) / n
                    gs = torch.autograd.grad(loss_b, params, create_graph=True, allow_unused=True)
                    dot = sum((g * u).sum() for g, u in zip(gs, v) if g is not None)
                    hv = torch.autograd.grad(dot, params, create_graph=wrt is not None, allow_unused=True)
                    quad = sum((h * u).sum() for h, u in zip(hv, v) if h is not None) / self.probes
                    total += float(quad.detach())
                    if wrt is not None and quad.requires_grad:
                        for acc, d in zip(grads, torch.autograd.grad(quad, wrt, allow_unused=True)):
                            if d is not None:
                                acc += d
        total, = all_reduce_sum(grads or (), total)  # data parallel: over every rank's shard
        return total, grads

    def score(self, model, batches, loss_fn, params, state: GradientState, n: int) -> float:
        """The Hutchinson trace estimate (units of loss / parameter^2)."""
        return self._run(model, batches, loss_fn, params, None, n)[0]

    def direction(self, model, batches, loss_fn, params, wrt, state: GradientState, n: int) -> list[torch.Tensor]:
        """Gradient of the trace estimate with respect to ``wrt`` (triple backward)."""
        return self._run(model, batches, loss_fn, params, wrt, n)[1]
