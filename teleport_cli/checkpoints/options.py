"""How a command treats a checkpoint file: which weights move, and what happens to the rest.

Torch-free, so that the CLI can declare its flags without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

WEIGHT_CHOICES = ("state_dict", "ema")


@dataclass(frozen=True)
class FileOptions:
    """How ``teleport apply`` treats the checkpoint file (the CLI flags of the same names).

    Attributes:
        weights: ``state_dict`` (default) or ``ema``: which weights are teleported.
        keep_ema: leave EMA weights untouched instead of re-seeding them.
        keep_optimizer_state: keep the optimizer state although the weights moved.
        trust_pickle: unpickle without the weights-only restriction (runs code from the file).
    """

    weights: str = "state_dict"
    keep_ema: bool = False
    keep_optimizer_state: bool = False
    trust_pickle: bool = False

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_CHOICES:
            raise ConfigError(f"--weights must be one of {', '.join(WEIGHT_CHOICES)}")
        if self.weights == "ema" and self.keep_ema:
            raise ConfigError("--keep-ema cannot be combined with --weights ema", hint="--weights ema moves the EMA weights")
