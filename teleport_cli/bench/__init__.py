"""The resumed-training benchmark behind ``teleport bench`` (scripts live in the top-level ``bench/``).

=============  ==========================================================================
``settings``   what every variant shares (optimizer, lr, K, seeds)
``resume``     the variants, the resumed runs and their figures
``plots``      PNG training and held-out curves
=============  ==========================================================================

Names are imported lazily (PEP 562).
"""

import importlib

_EXPORTS = {
    "BenchSettings": ".settings",
    "run_bench": ".resume",
    "plot_curves": ".plots",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
