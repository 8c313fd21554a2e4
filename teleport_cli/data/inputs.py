"""The data half of the load stage of ``teleport apply``: calibration and held-out sets.

Read with the checkpoint's ``data_config`` (image preprocessing, text vocabulary) and the built
model (timm defaults, channel check); a seeded choice of ``--samples`` calibration samples is
kept. The checkpoint and model half is :mod:`teleport_cli.checkpoints.containers` and
:mod:`teleport_cli.models.factories`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..config import LOSSES
from ..errors import InputError
from .sources import LoadedData, choose_samples, load_data


@dataclass
class DataInputs:
    """The data sets ``apply`` reads, and what the checkpoint says about them.

    Attributes:
        calibration: the calibration set (after ``--samples``).
        holdout: the held-out set, or None (a split of the calibration set is used).
        data_config: the checkpoint's ``data_config`` (``{}`` when absent).
        loss: the checkpoint's ``loss`` entry (``ce``/``lm``), or None when absent.
    """

    calibration: LoadedData
    holdout: LoadedData | None
    data_config: dict
    loss: str | None


def checkpoint_data_config(metadata: dict[str, str], source: str) -> dict:
    """The ``data_config`` metadata entry as a dict (``{}`` when absent).

    Raises:
        InputError: not a JSON object.
    """
    try:
        cfg = json.loads(metadata.get("data_config") or "{}")
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: metadata 'data_config' is not valid JSON ({e.msg})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{source}: metadata 'data_config' must be a JSON object")
    return cfg


def load_data_inputs(
    metadata: dict[str, str],
    source: str,
    data: str | Path,
    holdout: str | Path | None = None,
    model: nn.Module | None = None,
    *,
    samples: int | None = None,
    seed: int = 0,
) -> DataInputs:
    """Read and check the calibration and held-out sets of ``teleport apply``.

    Args:
        metadata: the checkpoint's metadata; ``source``: its path (for messages).
        model: the built model (image folders use its timm defaults and first convolution).

    Raises:
        InputError: unreadable or unfit data; a metadata ``loss`` that is not one of
            :data:`teleport_cli.config.LOSSES`.
    """
    data_config = checkpoint_data_config(metadata, source)
    loss = metadata.get("loss")
    if loss is not None and loss not in LOSSES:
        raise InputError(f"{source}: metadata 'loss' is {loss!r}, not one of {', '.join(LOSSES)}", hint="pass --loss")
    cal = choose_samples(load_data(data, data_config, model, what="calibration"), samples, seed)
    hold = load_data(holdout, data_config, model, what="held-out") if holdout is not None else None
    return DataInputs(cal, hold, data_config, loss)
