"""``--batch-size auto`` for a teleport: the measurement of :mod:`teleport_cli.nullspace.memory`
on the model's teleportable layers, and in a data-parallel run the smallest choice over ranks."""

from __future__ import annotations

import dataclasses

from torch import nn

from ..config import TeleportConfig
from ..parallel import group as parallel
from ..parallel.collective import all_reduce_min
from .losses import LOSS_FUNCTIONS
from .selection import find_layers
from .verify import check_targets


def resolve_batch_size(model: nn.Module, cal, config: TeleportConfig, event) -> tuple[TeleportConfig, dict]:
    """``batch_size="auto"``: measure and pick the batch (:func:`teleport_cli.nullspace.memory.choose_batch_size`).

    ``event(stage, done, total, info)`` gets ``batch-size`` progress. Under torchrun each rank
    measures its own memory and every rank takes the smallest choice.

    Returns the config with the chosen batch size and the choice as a dict (for the JSON and metadata).
    """
    from .memory import choose_batch_size

    check_targets(model, cal, cal.source)  # the data must fit the model before the probe runs it
    event("batch-size", 0, 1, {})
    layers, _ = find_layers(model, config.layers, config.exclude)
    with parallel.local():  # no collective in the probe (its forked child must never touch the group)
        choice = choose_batch_size(model, cal, LOSS_FUNCTIONS[config.loss], next(model.parameters()).device,
                                   max_memory=config.max_memory, gram_blocks=[(s.groups, s.d_in) for s, _ in layers])
    choice = dataclasses.replace(choice, batch_size=int(all_reduce_min(choice.batch_size)[0]))  # what every rank can afford
    event("batch-size", 1, 1, {"batch_size": choice.batch_size})
    return config.replace(batch_size=choice.batch_size), choice.to_dict()
