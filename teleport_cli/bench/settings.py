"""What every variant of the resumed-training benchmark shares. Torch-free, for the CLI."""

from __future__ import annotations

from dataclasses import dataclass

OPTIMIZERS = ("sgd", "momentum", "adam")
DEFAULT_LR = {"sgd": 0.05, "momentum": 0.01, "adam": 1e-3}
VARIANTS = ("original", "nullspace", "periodic", "random", "levelset", "symmetry")
RESULT_FILE = "bench.json"
PLOT_FILES = ("train_loss.png", "holdout_loss.png")  # --out receives these and RESULT_FILE


@dataclass(frozen=True)
class BenchSettings:
    """What every variant shares: optimizer, learning rate, K steps, batch size, seeds."""

    optimizer: str = "sgd"
    lr: float | None = None
    steps: int = 100
    batch_size: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)
    holdout_every: int = 10
    period: int = 25
    calibration_samples: int = 256
    variants: tuple[str, ...] = VARIANTS

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def window(self) -> int:
        return max(1, self.steps // 10)
