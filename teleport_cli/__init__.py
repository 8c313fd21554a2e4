"""teleport-cli: null-space teleportation of PyTorch checkpoints (arXiv:2502.11362).

Library API::

    from teleport_cli import TeleportConfig, teleport
    outcome = teleport(model, (inputs, targets), TeleportConfig(tau=0.99, steps=30))
    if outcome.verified:
        model.load_state_dict(outcome.state_dict())

The package follows the pipeline, one subpackage per stage or role, each importing only those
before it (``tests/test_structure.py`` holds the order)::

    errors, records, config      the exception family, frozen records, the options object
    checkpoints/                 load and save: every container, training state, atomic writes
    data/                        calibration and held-out sets: tensors, images, tokens
    models/                      architecture to nn.Module, strict loading, built-in models
    nullspace/                   capture -> bases -> teleport -> verify (the method itself)
    baselines/                   level-set and symmetry teleportation, for comparison
    audit/                       geometry, ``teleport report`` and ``teleport inspect``
    pipeline                     the stages in order (``apply``, ``teleport``)
    bench/                       the resumed-training benchmark behind ``teleport bench``
    cli/                         the ``teleport`` command

Names are imported lazily (PEP 562), so ``import teleport_cli`` imports no torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {"TeleportConfig": ".config", "TeleportOutcome": ".pipeline", "apply": ".pipeline", "teleport": ".pipeline"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
