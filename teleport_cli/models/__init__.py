"""Architectures to ``nn.Module``: built-in models, timm names, ``package.module:factory``.

=============  ==========================================================================
``builtin``    the built-in ``mlp`` and ``char_lm``; timm names; metadata to a model
``char_lm``    the small causal character-level transformer
``factories``  ``--model`` and ``--model-kwargs`` (the only place that imports user code)
``loading``    checkpoint to loaded model, strictly
``device``     ``--device auto|cpu|cuda``
=============  ==========================================================================

Names are imported lazily (PEP 562).
"""

from .. import lazy_exports

_EXPORTS = {
    "MLP": ".builtin",
    "build_model": ".builtin",
    "CharLM": ".char_lm",
    "ModelChoice": ".factories",
    "choose_model": ".factories",
    "load_model": ".loading",
    "load_weights": ".loading",
    "resolve_device": ".device",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
