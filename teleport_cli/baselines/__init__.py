"""Teleports without a null space, for comparison: level-set and symmetry teleportation.

=============  ==========================================================================
``levelset``   Mishkin et al. 2024: projected gradient-norm ascent on the loss level set
``symmetry``   Zhao et al. 2022: GL(k) symmetry of the built-in MLP
=============  ==========================================================================

Names are imported lazily (PEP 562).
"""

from .. import lazy_exports

_EXPORTS = {
    "levelset_teleport": ".levelset",
    "symmetry_teleport": ".symmetry",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
