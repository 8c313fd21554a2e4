"""The library API inside a data-parallel training job (DDP): which module moves, and what is refused.

``teleport_cli.teleport(ddp_model, ...)`` teleports ``ddp_model.module`` (never through DDP's
reducer, whose hooks would all-reduce gradients the teleport has already reduced, and with no
copy of the wrapper). It runs in eval mode; a model handed over in training mode with
BatchNorm or SyncBatchNorm layers is refused: in training mode their forward uses batch
statistics (SyncBatchNorm with collectives of its own), so the loss the training sees is not
the eval-mode loss whose level set the teleport keeps.
"""

from __future__ import annotations

import sys
import warnings

from ..errors import ConfigError
from .group import active


def _callers_group() -> bool:
    """Whether a process group runs that the caller started (not this package's, for apply)."""
    dist = sys.modules.get("torch.distributed")
    ours = active() is not None and active().owned
    return not ours and dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def teleported_module(model):
    """``model.module`` for a ``DistributedDataParallel`` wrapper, else ``model``.

    Raises:
        ConfigError: a wrapper, or any model inside a process group the caller started, in
            training mode with BatchNorm/SyncBatchNorm layers (call ``model.eval()`` first).

    In those two cases a ``UserWarning`` says to reset the optimizer state on every rank.
    """
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.parallel import DistributedDataParallel

    wrapped = isinstance(model, DistributedDataParallel)
    module: nn.Module = model.module if wrapped else model
    parallel = wrapped or _callers_group()
    if parallel and module.training:
        norms = [name for name, m in module.named_modules() if isinstance(m, _BatchNorm)]
        if norms:
            raise ConfigError(
                f"the model is in training mode with BatchNorm/SyncBatchNorm layers ({', '.join(norms[:3])}): in a data-parallel "
                "job their batch statistics would not match the eval-mode loss the teleport keeps",
                hint="call model.eval() before teleport() and model.train() after it",
            )
    if parallel:
        warnings.warn(OPTIMIZER_NOTE, stacklevel=3)
    return module


OPTIMIZER_NOTE = ("the teleported weights replace the old ones on every rank: reset the optimizer state (momentum, Adam moments) "
                  "on all ranks, it describes the old weights")
