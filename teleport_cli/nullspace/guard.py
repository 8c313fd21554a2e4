"""The guard: calibration samples kept out of the Grams, and what they let the ascent trust.

The null spaces are exact only on the samples the Grams were built from; a guard of ``n``
calibration samples the Grams never saw measures what a move does to unseen samples (early
stopping on a validation split). Two rules use it (docs/guard.md):

* the **gate** (every step): the guard's mean loss obeys the calibration drift rule
  ``|L_g - L_g0| <= tolerance * |L_g0| + 1e-6 + floor``; a step that breaks it is rejected;
* the **trust** (every accepted point): an upper confidence bound on the held-out drift,
  ``|mean(d)| + z * std(d) / sqrt(n) <= holdout_tolerance * |L_g0| + 1e-6 + floor`` with
  ``d_i = l_i(W) - l_i(W0)`` the paired per-sample loss changes on the guard (a one-sided
  z-test on the mean of paired differences; z = 2, about 98%). By default a step whose point
  the guard does not trust is rejected; the ascent's ``step_back`` rule instead ends at the
  furthest accepted point the guard trusts.

The held-out set is never seen here: it verifies the final point once.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..parallel.collective import agree, all_gather_cat
from .derivatives import Batches
from .linesearch import drift_ok

# one-sided z of the confidence bound (P(N(0,1) > 2) = 2.3%)
Z = 2.0


@torch.no_grad()
def sample_losses(model: nn.Module, batches: Batches, loss_fn: Callable) -> torch.Tensor:
    """Per-sample losses (float64, shape ``N``) of ``loss_fn`` (a summed batch loss), one forward per batch
    (data parallel: every rank's shard, in the set's order)."""
    out = []
    for x, y in batches:
        logits = model(x)
        out.extend(float(loss_fn(logits[i:i + 1], y[i:i + 1])) for i in range(int(x.shape[0])))
    return all_gather_cat(torch.tensor(out, dtype=torch.float64))


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
    """

    def __init__(self, model: nn.Module, batches: Batches, loss_fn: Callable, tolerance: float,
                 trust_tolerance: float | None, noise_floor: float = 0.0) -> None:
        self.batches, self.loss_fn = batches, loss_fn
        self.tolerance, self.trust_tolerance, self.noise_floor = tolerance, trust_tolerance, noise_floor
        self.losses0 = sample_losses(model, batches, loss_fn)
        self.loss0 = float(self.losses0.mean())

    def check(self, model: nn.Module) -> tuple[bool, bool]:
        """(gate passed, point trusted) for the model's current weights."""
        d = sample_losses(model, self.batches, self.loss_fn) - self.losses0
        gate = drift_ok(self.loss0 + float(d.mean()), self.loss0, self.tolerance, self.noise_floor)
        gate = agree(gate)  # rank 0's decisions
        return gate, agree(gate and self.trusted(d))

    def trusted(self, d: torch.Tensor) -> bool:
        """The confidence-bound rule on paired per-sample loss changes ``d`` (shape ``n``)."""
        if self.trust_tolerance is None:
            return True
        n = int(d.numel())
        spread = float(d.std()) / math.sqrt(n) if n > 1 else math.inf
        bound = abs(float(d.mean())) + Z * spread
        return bound <= self.trust_tolerance * abs(self.loss0) + 1e-6 + self.noise_floor
