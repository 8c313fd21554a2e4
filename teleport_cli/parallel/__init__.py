"""Data parallelism on ``torch.distributed``: the process group, sharding, and the reductions.

Every expensive quantity of a teleport is a sum over calibration samples (the Grams, the loss,
its gradient and Hessian-vector products, the drift, guard and verification figures), so each
rank streams its own shard and one all-reduce per quantity gives every rank the same step.

=============  =======================================================================
``group``      the process group: detected from torchrun's environment, started with
               ``gloo`` (CPU) or ``nccl`` (GPU) and a timeout; ``local()`` turns it off
``shards``     contiguous shards of an index range, without padding
``training``   the library API inside a DDP job: ``model.module``, BatchNorm refused in training mode
``grams``      the capture's Gram accumulators summed over the shards
``collective`` sums (float64 for scalars), maxima, minima, rank 0's decisions, broadcasts,
               gathers; a failed collective becomes :class:`~teleport_cli.errors.PeerFailed`
=============  =======================================================================

In a single process (no ``WORLD_SIZE`` above 1, no initialised group) every function returns
at once and ``torch.distributed`` is never initialised. Names are imported lazily (PEP 562).
"""

from .. import lazy_exports

_EXPORTS = {
    "ParallelGroup": ".group",
    "active": ".group",
    "env_rank": ".group",
    "env_world_size": ".group",
    "finish": ".group",
    "local": ".group",
    "start": ".group",
    "shard": ".shards",
    "shard_range": ".shards",
    "agree": ".collective",
    "all_gather_cat": ".collective",
    "all_reduce_max": ".collective",
    "all_reduce_min": ".collective",
    "all_reduce_sum": ".collective",
    "assert_identical": ".collective",
    "broadcast_": ".collective",
    "map_by_rank": ".collective",
    "all_reduce_accumulators": ".grams",
    "teleported_module": ".training",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
