"""Calibration and held-out sets: tensor files, image folders, token and text files.

=============  ==========================================================================
``tensors``    ``TensorData`` (inputs and targets), tensor files, the seeded held-out split
``images``     image folders through timm's eval transforms
``tokens``     token files and text with the checkpoint's vocabulary
``sources``    which kind of data a path holds, and ``--samples``
``inputs``     the data half of ``teleport apply``'s load stage
=============  ==========================================================================

Names are imported lazily (PEP 562).
"""

from .. import lazy_exports

_EXPORTS = {
    "TensorData": ".tensors",
    "load_tensor_data": ".tensors",
    "split_holdout": ".tensors",
    "load_image_folder": ".images",
    "load_text_file": ".tokens",
    "tokens_to_data": ".tokens",
    "load_data": ".sources",
    "load_data_inputs": ".inputs",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
