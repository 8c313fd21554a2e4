"""The resumed-training benchmark behind ``teleport bench`` (scripts live in the top-level ``bench/``).

=============  ==========================================================================
``settings``   what every variant shares (optimizer, lr, K, seeds)
``resume``     the variants, the resumed runs and their figures
``plots``      PNG training and held-out curves
=============  ==========================================================================

Names are imported lazily (PEP 562).
"""

from .. import lazy_exports

_EXPORTS = {
    "BenchSettings": ".settings",
    "run_bench": ".resume",
    "plot_curves": ".plots",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
