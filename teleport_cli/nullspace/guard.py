"""The guard: calibration samples kept out of the Grams, and what they let the ascent trust.

The null spaces are exact only on the samples the Grams were built from; a guard of ``n``
calibration samples the Grams never saw measures what a move does to unseen samples (early
stopping on a validation split). Two rules use it (docs/guard.md):

* the **gate** (every step): the guard's mean loss obeys the calibration drift rule
  ``|L_g - L_g0| <= tolerance * |L_g0| + 1e-6 + floor``; a step that breaks it is rejected;
* the **trust** (every accepted point): an upper confidence bound on the held-out drift,
  ``|mean(d)| + z * std(d) / sqrt(n) <= holdout_tolerance * |L_g0| + 1e-6 + floor`` with
  ``d_i = l_i(W) - l_i(W0)`` the paired per-sample loss changes on the guard (a one-sided
  z-test on the mean of paired differences; ``--guard-z``, default 1.5, about 93%: z = 2 lost
  gain on the shipped samples with no exit 4 to show for it, docs/guard.md). By default a step whose point
  the guard does not trust is rejected; the ascent's ``step_back`` rule instead ends at the
  furthest accepted point the guard trusts.

The held-out set is never seen here: it verifies the final point once.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..parallel.collective import agree, all_gather_cat, all_reduce_sum
from .derivatives import Batches, full_gradient
from .linesearch import drift_ok
from .losses import sample_terms

# one-sided z of the confidence bound by default (P(N(0,1) > 1.5) = 6.7%; TeleportConfig.guard_z)
Z = 1.5


@torch.no_grad()
def sample_losses(model: nn.Module, batches: Batches, loss_fn: Callable, gather: bool = True) -> torch.Tensor:
    """Per-sample losses (float64, shape ``N``) of ``loss_fn`` (a summed batch loss), one forward per batch
    (data parallel: every rank's shard, in the set's order; ``gather=False``: this rank's shard)."""
    out = []
    for x, y in batches:
        logits = model(x)
        out.append(sample_terms(loss_fn, logits, y).double())
    out = torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
    return all_gather_cat(out) if gather else out


class Guard:
    """The guard's per-sample losses at the original weights and the two rules above.

    Args:
        model: the model at its original weights (eval mode).
        batches: the guard samples.
        loss_fn: summed loss of a batch.
        tolerance: relative drift of the gate (the calibration tolerance).
        trust_tolerance: relative drift the confidence bound must meet (the held-out tolerance);
            None: every point is trusted (no step-back).
        noise_floor: loss difference between two identical evaluations.
        z: the one-sided z of the confidence bound.
    """

    def __init__(self, model: nn.Module, batches: Batches, loss_fn: Callable, tolerance: float,
                 trust_tolerance: float | None, noise_floor: float = 0.0, z: float = Z) -> None:
        self.batches, self.loss_fn, self.z = batches, loss_fn, z
        self.tolerance, self.trust_tolerance, self.noise_floor = tolerance, trust_tolerance, noise_floor
        self.local0 = sample_losses(model, batches, loss_fn, gather=False)  # this rank's shard
        self.losses0 = all_gather_cat(self.local0)
        self.loss0 = float(self.losses0.mean())

    def check(self, model: nn.Module) -> tuple[bool, bool]:
        """(gate passed, point trusted) for the model's current weights."""
        d = sample_losses(model, self.batches, self.loss_fn) - self.losses0
        gate = drift_ok(self.loss0 + float(d.mean()), self.loss0, self.tolerance, self.noise_floor)
        gate = agree(gate)  # rank 0's decisions
        return gate, agree(gate and self.trusted(d))

    def gradients(self, model: nn.Module, wrt: list[torch.Tensor], spread: bool = False) -> list[list[torch.Tensor]]:
        """Gradients with respect to ``wrt`` (tensors of the model) at the current weights of the
        guard's mean loss and, with ``spread``, of the sample variance ``s^2`` of the paired
        changes ``d_i`` (the two terms of the confidence bound): one streaming pass over the guard.

        ``grad s^2 = 2/(n-1) sum_i (d_i - mean d) grad l_i = 2/(n-1) (sum_i d_i grad l_i - n mean(d) grad mean l)``,
        so both come from the per-sample losses of one forward per batch (two backward passes).
        """
        n = int(self.losses0.numel())
        if not spread:
            return [full_gradient(model, self.batches, self.loss_fn, wrt, n).grads]
        g1, g2 = [torch.zeros_like(w) for w in wrt], [torch.zeros_like(w) for w in wrt]
        start, dsum = 0, 0.0
        for x, y in self.batches:
            logits = model(x)
            losses = sample_terms(self.loss_fn, logits, y)
            d = losses.detach().double() - self.local0[start:start + len(losses)]
            start += len(losses)
            dsum += float(d.sum())
            for acc, loss in ((g1, losses.sum()), (g2, (losses * d.to(losses.dtype)).sum())):
                for a, g in zip(acc, torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True)):
                    if g is not None:
                        a += g
        dsum, = all_reduce_sum(g1 + g2, dsum)  # data parallel: every rank's shard
        mean = dsum / n
        return [[a / n for a in g1], [2.0 / max(n - 1, 1) * (b - mean * a) for a, b in zip(g1, g2)]]

    def trusted(self, d: torch.Tensor) -> bool:
        """The confidence-bound rule on paired per-sample loss changes ``d`` (shape ``n``)."""
        if self.trust_tolerance is None:
            return True
        n = int(d.numel())
        spread = float(d.std()) / math.sqrt(n) if n > 1 else math.inf
        bound = abs(float(d.mean())) + self.z * spread
        return bound <= self.trust_tolerance * abs(self.loss0) + 1e-6 + self.noise_floor
