"""One typed options object for a teleport; the CLI's ``apply`` flags mirror its fields.

The defaults were chosen by measurement on the shipped mid-training MLP checkpoint
(``sample_checkpoints/mlp_digits_mid.safetensors``); docs/defaults.md has the sweep.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import ConfigError

LOSSES = ("ce", "lm")
OBJECTIVES = ("grad-norm", "lookahead", "trace")
METHODS = ("nullspace", "levelset", "symmetry")
DEVICES = ("auto", "cpu", "cuda")
# seeds torch.Generator.manual_seed accepts (a signed or unsigned 64-bit integer), less one at the
# top: the guard split is seeded with seed + 1
SEED_RANGE = (-(2**63), 2**64 - 2)
HVP_MODES = ("auto", "forward", "central", "exact")
EIGH_DTYPES = ("float64", "float32")
GUARD_TANGENTS = ("off", "mean", "bound")


@dataclass(frozen=True)
class TeleportConfig:
    """Settings of one null-space teleport (arXiv:2502.11362, Algorithm 1, with step control).

    Attributes:
        tau: fraction of each layer's input energy (trace of its Gram matrix) that must be
            kept invariant, in (0, 1]. ``1.0`` is the numerically exact null space
            (eigenvalues <= d_in * float64 eps * largest, as ``numpy.linalg.matrix_rank``);
            below 1 the smallest eigen-directions holding at most ``1 - tau`` of the trace
            count as null (approximate invariance on the whole input distribution).
        steps: maximum number of accepted ascent steps.
        step_size: length of one step relative to the norm of all teleported weights
            (the step is ``step_size * ||W|| * P / ||P||`` with P the projected gradient).
        step_growth: after a step accepted at its first try, the next step length is
            multiplied by this, up to ``max_step`` (a rejection halves it); 1 keeps the step
            length fixed. The defaults reach the same point as 100 fixed steps of 0.01 on the
            shipped MLP at about a third of the cost (docs/break_even.md).
        max_step: cap on each layer's total relative weight change ``||W - W0|| / ||W0||``.
        tolerance: relative calibration-loss drift allowed: a step (and the result) passes
            when ``|L - L0| <= tolerance * |L0| + 1e-6`` (plus the measured noise floor).
        holdout_tolerance: the same rule on the held-out set, checked by verification.
        target_ratio: stop once ``||g|| / ||g0||`` reaches this ratio (``None``: never).
        tangent: remove from each step its component along the projected loss gradient, so
            that with approximate null spaces (tau < 1) the step is tangent to the level set.
        guard_tangent: with ``tangent`` and a guard, ``mean`` also removes the step's component
            along the projected gradient of the guard's mean loss, so that it too is constant to
            first order along the step; ``bound`` also along that of the variance of the guard's
            per-sample loss changes (both terms of its confidence bound); one gradient pass over
            the guard per step; ``off``: neither (docs/guard.md has the measurements).
        max_backtracks: how many times a rejected step is halved before the loop stops (it
            stops earlier after two halvings in a row, shorter than every accepted step, that
            pass the drift gates but do not improve the objective: ``FLAT_REJECTIONS`` in
            :mod:`teleport_cli.nullspace.ascent`).
        batch_size: calibration samples per forward pass (memory, not the result: the
            objective is always over the whole calibration set), or ``"auto"``: the largest
            power of two <= 256 whose gradient and Hessian-vector product fit ``max_memory``
            (measured, :mod:`teleport_cli.nullspace.memory`).
        max_memory: memory budget in bytes for ``batch_size="auto"``; None: half of the free
            RAM (``MemAvailable``) or of the free GPU memory.
        max_seconds: stop the ascent at its last accepted step once this many wall-clock
            seconds have passed since the teleport started (``apply``: since it was called; capture,
            bases and the look-ahead's learning rate count, verification does not); the clock is
            read between batches of every pass (stop reason ``max_seconds``); None: no limit.
        guard_fraction: share of the calibration set kept out of the Grams and the objective
            (seeded) as a guard, at every tau: a step that moves the guard loss beyond
            ``tolerance`` is rejected, and the ascent ends at the furthest accepted point whose
            guard drift is within ``holdout_tolerance`` with a confidence bound (docs/guard.md).
            0 disables it (with fewer than 10 calibration samples none is split off).
        guard_z: one-sided z of the guard's confidence bound on the held-out drift
            (``|mean d| + guard_z * s / sqrt(n) <= holdout_tolerance * |L_guard0| + ...``; docs/guard.md).
        holdout_fraction: share of ``--data`` set aside as held-out set when no
            ``--holdout`` is given (seeded by ``seed``).
        seed: seed for the held-out split and any random choice.
        device: ``auto`` (a GPU when present), ``cpu`` or ``cuda``.
        loss: ``ce`` (cross-entropy on ``(N, C)`` class logits) or ``lm`` (next-token
            cross-entropy on ``(N, T, V)`` logits against ``(N, T)`` targets).
        objective: ``lookahead`` (default: minimise the loss after ``lookahead_steps`` virtual
            SGD steps at ``lr``), ``grad-norm`` (maximise 1/2 ||grad L||^2, the paper's) or
            ``trace`` (minimise Hutchinson's estimate of tr(H) with ``probes`` probes).
        method: ``nullspace`` (this tool: moves inside the layers' input null spaces), or a
            baseline that ascends the gradient norm on the level set without null spaces:
            ``levelset`` (Mishkin et al. 2024; any model, all parameters) or ``symmetry``
            (Zhao et al. 2022; GL(k) action between consecutive layers of the built-in MLP).
            Baselines always use the gradient-norm objective.
        lr: learning rate training resumes with. The look-ahead's virtual steps use it; without
            it they use ``1 / lambda_max`` of the calibration loss (half the SGD edge of
            stability). With it the result is also checked against the SGD stability edge
            ``2 (1 + momentum) / lr``.
        momentum: heavy-ball momentum training resumes with (for the stability edge).
        layers: fnmatch globs (:func:`fnmatch.fnmatchcase`) over the layer names ``teleport
            inspect`` lists; only matching layers move (empty: all teleportable layers).
        exclude: globs of layers that never move, even when ``layers`` matches them. A glob
            that matches no teleportable layer is a ``ConfigError`` when the model is seen.
        hvp: how the grad-norm and look-ahead objectives (and the look-ahead's ``1 / lambda_max``)
            take Hessian-vector products: ``forward`` (finite differences of gradients, one
            extra gradient pass), ``central`` (two), ``exact`` (double backward), or ``auto``
            (forward where the products at eps and eps/4 agree to 1e-2 on the first step, else
            exact; see :mod:`teleport_cli.nullspace.hvp` and docs/hvp.md).
        eigh: dtype of the Gram eigendecompositions where tau < 1: ``float64`` (default), or
            ``float32`` (1.7-2x faster on large Grams, diagonal-shifted, float64 fallback per
            group); float32 makes the bases, and so the teleport, follow float-order noise of
            the Grams (other batch sizes, other rank counts) about 50x more (docs/cost.md).
    """

    tau: float = 0.99
    steps: int = 100
    step_size: float = 0.01
    step_growth: float = 2.0
    max_step: float = 1.0
    tolerance: float = 5e-3
    holdout_tolerance: float = 2e-2
    target_ratio: float | None = None
    max_backtracks: int = 6
    tangent: bool = True
    guard_tangent: str = "off"
    batch_size: int | str = 256
    holdout_fraction: float = 0.2
    guard_fraction: float = 0.2
    guard_z: float = 1.5
    seed: int = 0
    device: str = "auto"
    loss: str = "ce"
    objective: str = "lookahead"
    method: str = "nullspace"
    lr: float | None = None
    momentum: float = 0.0
    lookahead_steps: int = 1
    probes: int = 4
    hvp: str = "auto"
    eigh: str = "float64"
    max_memory: int | None = None
    max_seconds: float | None = None
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field_ in ("layers", "exclude"):  # lists (e.g. from JSON) become tuples: the config stays hashable
            object.__setattr__(self, field_, tuple(getattr(self, field_)))
        checks = [
            (0.0 < self.tau <= 1.0, "--tau must be in (0, 1]", "use 1 for the exact null space"),
            (self.steps >= 1, "--steps must be at least 1", None),
            (self.step_size > 0 and math.isfinite(self.step_size), "--step-size must be > 0", None),
            (self.step_growth >= 1 and math.isfinite(self.step_growth), "--step-growth must be a finite number >= 1", "use 1 for a fixed step length"),
            (self.max_step > 0, "--max-step must be > 0", None),
            (self.tolerance >= 0, "--tolerance must be >= 0", None),
            (self.holdout_tolerance >= 0, "--holdout-tolerance must be >= 0", None),
            (self.target_ratio is None or self.target_ratio > 0, "--target-ratio must be > 0", None),
            (self.max_backtracks >= 0, "--max-backtracks must be >= 0", None),
            (self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size >= 1), "--batch-size must be 'auto' or at least 1", None),
            (self.max_memory is None or self.max_memory > 0, "--max-memory must be > 0", "e.g. 4GB or 512MB"),
            (self.max_seconds is None or (self.max_seconds > 0 and math.isfinite(self.max_seconds)), "--max-seconds must be a finite number > 0", None),
            (0.0 < self.holdout_fraction < 1.0, "holdout_fraction must be in (0, 1)", None),
            (0.0 <= self.guard_fraction < 1.0, "--guard-fraction must be in [0, 1)", None),
            (self.guard_z >= 0 and math.isfinite(self.guard_z), "--guard-z must be a finite number >= 0", None),
            (self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}", None),
            (self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}", None),
            (self.method in METHODS, f"--method must be one of {', '.join(METHODS)}", None),
            (self.method == "nullspace" or self.objective in ("grad-norm", "lookahead"), "--objective trace needs --method nullspace", None),
            (self.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}", None),
            (self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), "--lr must be a finite number > 0", None),
            (0.0 <= self.momentum < 1.0, "--momentum must be in [0, 1)", None),
            (self.lookahead_steps >= 1, "--lookahead-steps must be at least 1", None),
            (self.probes >= 1, "--probes must be at least 1", None),
            (SEED_RANGE[0] <= self.seed <= SEED_RANGE[1], f"--seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]", "a 64-bit seed"),
            (self.hvp in HVP_MODES, f"--hvp must be one of {', '.join(HVP_MODES)}", None),
            (self.eigh in EIGH_DTYPES, f"--eigh must be one of {', '.join(EIGH_DTYPES)}", None),
            (self.guard_tangent in GUARD_TANGENTS, f"--guard-tangent must be one of {', '.join(GUARD_TANGENTS)}", None),
            (self.method == "nullspace" or not (self.layers or self.exclude), "--layers and --exclude need --method nullspace", "the baselines move every trainable parameter"),
            (all(isinstance(g, str) and g for g in self.layers + self.exclude), "--layers and --exclude take non-empty globs", "e.g. --layers 'fc' --exclude 'layer1.*'"),
        ]
        for ok, message, hint in checks:
            if not ok:
                raise ConfigError(message, hint=hint)

    def to_dict(self) -> dict:
        """The settings as a JSON-ready dict (recorded in the output metadata)."""
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TeleportConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2, "MIB": 1024**2,
          "G": 1024**3, "GB": 1024**3, "GIB": 1024**3, "T": 1024**4, "TB": 1024**4, "TIB": 1024**4}


def parse_bytes(text: str) -> int:
    """``"4GB"``, ``"512MB"``, ``"1.5G"``, ``"1000000"`` -> bytes (binary units: 1 GB = 2^30 bytes).

    Raises:
        ConfigError: not a positive size with a known unit.
    """
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"--max-memory {text!r} is not a size", hint="use e.g. 4GB, 512MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])
