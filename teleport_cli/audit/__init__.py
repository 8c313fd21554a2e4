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

from .. import lazy_exports

_EXPORTS = {
    "measure": ".geometry",
    "top_eigenvalue": ".geometry",
    "AuditSettings": ".settings",
    "Audit": ".compare",
    "audit_models": ".compare",
    "render": ".html",
    "inspect_checkpoint": ".survey",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
