"""Teleports without a null space, for comparison: level-set and symmetry teleportation.

=============  ==========================================================================
``levelset``   Mishkin et al. 2024: projected gradient-norm ascent on the loss level set
``symmetry``   Zhao et al. 2022: GL(k) symmetry of the built-in MLP
=============  ==========================================================================

Names are imported lazily (PEP 562).
"""

import importlib

_EXPORTS = {
    "levelset_teleport": ".levelset",
    "symmetry_teleport": ".symmetry",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
