"""Load and save: every checkpoint container, its training state, and atomic writes.

The only importer of safetensors. Imports nothing from the teleport stage.

==================  ==========================================================================
``containers``      which container a path is; read one, write the same one back
``single``          one ``.safetensors`` file
``sharded``         sharded safetensors with ``model.safetensors.index.json``
``hf``              ``config.json`` folders as timm's ``save_for_hf`` writes them
``torchfile``       ``torch.save`` pickles and timm training checkpoints; safe unpickling
``base``            what every reader returns; key and tensor rules
``atomic``          output checks before any work; atomic file and folder writes
``publish``         publishing without replacing (link/unlink, renameat2 RENAME_NOREPLACE)
``temps``           locked ``.NAME.teleport-*.tmp`` temporaries; stale ones removed
``temps``           temporary names beside an output, their flocks, removal of stale ones
``publish``         the final rename that never replaces an output (link, renameat2)
``tensor_files``    one state dict or tensor file in, one out (calibration files, tests)
``options``         which weights move (``--weights``, ``--keep-ema``, ...)
``training_state``  EMA weights, optimizer state, ties and dtypes of what is written back
==================  ==========================================================================

Names are imported lazily (PEP 562).
"""

from .. import lazy_exports

_EXPORTS = {
    "read_checkpoint": ".containers",
    "write_checkpoint": ".containers",
    "check_output_for": ".containers",
    "LoadedCheckpoint": ".base",
    "WeightSet": ".base",
    "FileOptions": ".options",
    "load_checkpoint": ".tensor_files",
    "save_checkpoint": ".tensor_files",
    "read_tensor_file": ".tensor_files",
    "write_file_atomic": ".atomic",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
