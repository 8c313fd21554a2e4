"""The options of an audit (``teleport report``'s flags). Torch-free, for the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class AuditSettings:
    """Options of an audit (the ``teleport report`` flags).

    Attributes:
        tau: input energy kept invariant, for the null-space dimension (as ``apply --tau``).
        tolerance, holdout_tolerance: relative loss drift allowed on calibration / held-out set.
        lr, momentum: SGD step and heavy-ball momentum for the stability check (None: no check).
        iterations: Lanczos steps at most; probes: Hutchinson probes; radius: SAM rho
            (parameter units); seed: seeds both.
        batch_size: samples per forward pass (memory only).
        spectrum_layers: layers whose Gram spectrum is plotted (empty: first, middle, last).
    """

    tau: float = 0.99
    tolerance: float = 5e-3
    holdout_tolerance: float = 2e-2
    lr: float | None = None
    momentum: float = 0.0
    iterations: int = 20
    probes: int = 16
    radius: float = 0.05
    seed: int = 0
    batch_size: int = 256
    spectrum_layers: tuple[str, ...] = ()
    loss: str = "ce"

    def __post_init__(self) -> None:
        checks = [
            (0.0 < self.tau <= 1.0, "--tau must be in (0, 1]"),
            (self.tolerance >= 0 and self.holdout_tolerance >= 0, "--tolerance and --holdout-tolerance must be >= 0"),
            (self.lr is None or self.lr > 0, "--lr must be > 0"),
            (0.0 <= self.momentum < 1.0, "--momentum must be in [0, 1)"),
            (self.iterations >= 1, "--iterations must be at least 1"),
            (self.probes >= 1, "--probes must be at least 1"),
            (self.radius > 0, "--radius must be > 0"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spectrum_layers"] = list(self.spectrum_layers)
        return d
