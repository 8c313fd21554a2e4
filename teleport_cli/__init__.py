"""teleport-cli: null-space teleportation of PyTorch checkpoints (arXiv:2502.11362).

Library API::

    from teleport_cli import TeleportConfig, teleport
    outcome = teleport(model, (inputs, targets), TeleportConfig(tau=0.99, steps=30))
    if outcome.verified:
        model.load_state_dict(outcome.state_dict())

The package follows the pipeline, one subpackage per stage or role, each importing only those
before it (``tests/test_structure.py`` holds the order)::

    errors, records, config      the exception family, frozen records, the options object
    parallel/                    torchrun's process group, shards, all-reduces (a no-op alone)
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


def lazy_exports(package: str, exports: dict[str, str]):
    """A PEP 562 module ``__getattr__`` for ``package``: ``exports`` maps each public name to the
    module (relative to ``package``) that defines it, imported on first use. Every subpackage's
    ``__init__`` uses it, so that importing a package imports none of its heavy dependencies."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


__getattr__ = lazy_exports(__name__, _EXPORTS)
