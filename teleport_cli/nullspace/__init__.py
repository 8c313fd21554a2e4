"""The method itself: capture -> bases -> teleport -> verify (arXiv:2502.11362).

Named ``nullspace`` rather than ``teleport``: ``teleport_cli.teleport`` is the library function.

=================  =======================================================================
``layers``         what a teleportable layer is; its input rows and weight blocks
``selection``      which modules of a model move, and why the others do not
``attention``      ``nn.MultiheadAttention``'s projections
``capture``        streaming forward hooks: one float64 Gram matrix per layer
``bases``          null-space bases of the Grams, and projection onto them
``losses``         summed cross-entropy of classifiers and language models
``derivatives``    gradients and Hessian-vector products over the calibration set
``hvp``            Hessian-vector products by finite differences or double backward (``--hvp``)
``memory``         ``--batch-size auto`` under ``--max-memory``
``batching``       ``--batch-size auto`` for a teleport (the smallest choice over ranks)
``objectives``     gradient norm, and the registry of objectives
``lookahead``      the loss after k virtual SGD steps
``trace``          Hutchinson's Hessian trace (minimised)
``linesearch``     backtracking and the drift gates every loop shares
``guard``          the guard samples' confidence bound on unseen drift
``ascent``         the projected ascent loop
``verify``         loss, logits and accuracy before and after
``storage_dtype``  verification again after the cast back to float16/bfloat16
=================  =======================================================================

Names are imported lazily (PEP 562).
"""

from .. import lazy_exports

_EXPORTS = {
    "find_layers": ".selection",
    "LayerSpec": ".layers",
    "capture_grams": ".capture",
    "layer_basis": ".bases",
    "LayerBasis": ".bases",
    "LOSS_FUNCTIONS": ".losses",
    "full_gradient": ".derivatives",
    "hessian_vector_product": ".derivatives",
    "make_objective": ".objectives",
    "ascend": ".ascent",
    "compare": ".verify",
    "noise_floor": ".verify",
    "verify_storage": ".storage_dtype",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
