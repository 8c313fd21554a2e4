"""Frozen records passed between the stages (load -> capture -> bases -> teleport -> verify -> save).

Each record converts to a JSON-ready dict with ``to_dict``; tensors never enter a record that
is serialised.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


def _finite(x: float | None) -> float | None:
    """JSON has no NaN or Inf: map them to None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class LayerSummary:
    """One teleportable layer and its freedom at the chosen tau.

    Attributes:
        name: qualified module name in the model (``fc1``, ``stages.0.conv``).
        kind: ``linear``, ``conv1d``/``conv2d``/``conv3d``, ``mha_in_proj``/``mha_out_proj``
            (and ``mha_q_proj``... for separate weights), or for an excluded module ``norm``,
            ``embedding`` or its lowercased class name.
        d_in: input dimension of one group's rows (``C_in/groups * kh * kw`` for a conv).
        d_out: output dimension of one group (``C_out/groups`` for a conv).
        groups: number of independent weight blocks (conv groups; 1 for Linear).
        rows: calibration rows seen (samples x positions x tokens).
        rank: rank of the Gram matrix (summed over groups).
        null_dim: null-space dimension at tau (summed over groups).
        teleported: whether the layer's weight was allowed to move.
        reason: why the layer is not teleported (empty when it is).
        rel_weight_change: ``||W - W0||_F / ||W0||_F`` after the teleport.
    """

    name: str
    kind: str
    d_in: int
    d_out: int
    groups: int
    rows: int
    rank: int
    null_dim: int
    teleported: bool
    reason: str = ""
    rel_weight_change: float = 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rel_weight_change"] = _finite(self.rel_weight_change)
        return d


@dataclass(frozen=True)
class StepRecord:
    """One accepted ascent step: its index, the relative step used, loss and gradient norm."""

    step: int
    step_size: float
    loss: float
    grad_norm: float
    backtracks: int

    def to_dict(self) -> dict:
        return {k: _finite(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class TeleportStats:
    """What the ascent loop did (no tensors).

    Attributes:
        loss_before, loss_after: calibration loss (mean over samples, nats) before/after.
        grad_norm_before, grad_norm_after: L2 norm of the gradient of the calibration loss
            with respect to all trainable parameters.
        steps_accepted: number of accepted steps; ``steps_rejected`` counts halvings.
        stop_reason: ``steps``, ``target_ratio``, ``backtracking``, ``no_freedom`` or
            ``max_seconds`` (the time budget ran out; the weights are those of the last
            accepted step).
        seconds: wall-clock time of the loop in seconds.
        hvp: how the Hessian-vector products were taken (mode requested and used, the
            finite-difference step, the measured disagreement; see teleport_cli.nullspace.hvp),
            or None where the objective takes none.
        step_backs: accepted steps undone at the end because the guard did not trust the
            points they reached (docs/guard.md); ``steps_accepted`` counts the steps kept.
        rejections: rejected candidates (``steps_rejected``) by the rule that rejected them:
            ``calibration`` (drift), ``guard`` (the guard's drift gate), ``trust`` (the guard's
            confidence bound), ``objective`` (no improvement).
    """

    loss_before: float
    loss_after: float
    grad_norm_before: float
    grad_norm_after: float
    steps_accepted: int
    steps_rejected: int
    stop_reason: str
    seconds: float
    history: tuple[StepRecord, ...] = field(default_factory=tuple)
    objective: str = "grad-norm"
    objective_before: float | None = None
    objective_after: float | None = None
    hvp: dict | None = None
    step_backs: int = 0
    rejections: dict = field(default_factory=dict)

    @property
    def grad_norm_ratio(self) -> float:
        return self.grad_norm_after / self.grad_norm_before if self.grad_norm_before > 0 else math.inf

    def to_dict(self) -> dict:
        return {
            "loss_before": _finite(self.loss_before),
            "loss_after": _finite(self.loss_after),
            "grad_norm_before": _finite(self.grad_norm_before),
            "grad_norm_after": _finite(self.grad_norm_after),
            "grad_norm_ratio": _finite(self.grad_norm_ratio),
            "steps_accepted": self.steps_accepted,
            "steps_rejected": self.steps_rejected,
            "step_backs": self.step_backs,
            "rejections": dict(self.rejections),
            "stop_reason": self.stop_reason,
            "objective": self.objective,
            "objective_before": _finite(self.objective_before),
            "objective_after": _finite(self.objective_after),
            "seconds": self.seconds,
            "hvp": self.hvp,
            "history": [h.to_dict() for h in self.history],
        }


@dataclass(frozen=True)
class SetCheck:
    """Verification on one data set: the original against the teleported model.

    Attributes:
        name: ``calibration`` or ``holdout``.
        samples: number of samples evaluated.
        loss_before, loss_after: mean loss (nats) of the original and teleported model.
        max_abs_logit_diff: max over samples and classes of |logit_after - logit_before|.
        max_abs_logit: max |logit| of the original model (scale for the logit change).
        accuracy_before, accuracy_after: top-1 accuracy in [0, 1].
        tolerance: relative loss tolerance applied.
        noise_floor: |loss difference| between two identical runs of the original model.
        passed: ``|loss_after - loss_before| <= tolerance * |loss_before| + 1e-6 + noise_floor``.
    """

    name: str
    samples: int
    loss_before: float
    loss_after: float
    max_abs_logit_diff: float
    max_abs_logit: float
    accuracy_before: float
    accuracy_after: float
    tolerance: float
    noise_floor: float
    passed: bool

    @property
    def loss_drift(self) -> float:
        """Relative loss change ``|L1 - L0| / |L0|``."""
        return abs(self.loss_after - self.loss_before) / max(abs(self.loss_before), 1e-12)

    def to_dict(self) -> dict:
        d = {k: (_finite(v) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}
        d["relative_loss_drift"] = _finite(self.loss_drift)
        return d

    def summary(self) -> dict:
        """The set's entry in ``teleport apply --json`` (``calibration``, ``holdout``)."""
        keys = ("loss_before", "loss_after", "relative_loss_drift", "max_abs_logit_diff", "accuracy_before",
                "accuracy_after", "samples", "tolerance", "passed")
        return {k: (self.loss_drift if k == "relative_loss_drift" else getattr(self, k)) for k in keys}


@dataclass(frozen=True)
class Verification:
    """Both checks and the overall verdict."""

    calibration: SetCheck
    holdout: SetCheck
    noise_floor: float

    @property
    def passed(self) -> bool:
        return self.calibration.passed and self.holdout.passed

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "noise_floor": self.noise_floor,
            "calibration": self.calibration.to_dict(),
            "holdout": self.holdout.to_dict(),
        }
