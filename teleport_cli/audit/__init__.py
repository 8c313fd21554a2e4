"""What ``teleport report`` and ``teleport inspect`` measure: geometry, drift, null spaces.

=============  ==========================================================================
``geometry``   gradient norm, Lanczos top eigenvalue, Hutchinson trace, SAM sharpness
``settings``   the report's options
``compare``    two models (or one) on data sets: drift, geometry, null spaces
``report``     files in, an audit out (also ``apply --report``)
``html``       the self-contained HTML page with matplotlib plots
``survey``     what each layer offers at tau (``teleport inspect``)
=============  ==========================================================================

Names are imported lazily (PEP 562).
"""

import importlib

_EXPORTS = {
    "measure": ".geometry",
    "top_eigenvalue": ".geometry",
    "AuditSettings": ".settings",
    "Audit": ".compare",
    "audit_models": ".compare",
    "report": ".report",
    "render": ".html",
    "inspect_checkpoint": ".survey",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
