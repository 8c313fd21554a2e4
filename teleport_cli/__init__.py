"""teleport-cli: null-space teleportation of PyTorch checkpoints (arXiv:2502.11362).

Library API::

    from teleport_cli import TeleportConfig, teleport
    outcome = teleport(model, (inputs, targets), TeleportConfig(tau=0.99, steps=30))
    if outcome.verified:
        model.load_state_dict(outcome.state_dict())
"""

__version__ = "0.1.0"

from .config import TeleportConfig  # noqa: E402
from .pipeline import TeleportOutcome, apply, teleport  # noqa: E402

__all__ = ["TeleportConfig", "TeleportOutcome", "apply", "teleport", "__version__"]
