"""The load stage of ``teleport apply``: checkpoint, model, calibration and held-out data.

Order: read the checkpoint; build the model (``--model`` flags or the metadata) and load its
state dict strictly; read the data with the checkpoint's ``data_config`` (image preprocessing,
text vocabulary); keep a seeded choice of ``--samples`` calibration samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import Checkpoint, load_checkpoint
from .config import LOSSES
from .data_sources import LoadedData, choose_samples, load_data
from .errors import InputError
from .factories import ModelChoice, choose_model
from .models import load_strict


@dataclass
class Inputs:
    """Everything ``apply`` reads, ready for the teleport.

    Attributes:
        checkpoint: the file's tensors, metadata and hash.
        model: the built model with the checkpoint's weights loaded (CPU, as stored).
        calibration: the calibration set (after ``--samples``).
        holdout: the held-out set, or None (a split of the calibration set is used).
        data_config: the checkpoint's ``data_config`` (``{}`` when absent).
        loss: the checkpoint's ``loss`` entry (``ce``/``lm``), or None when absent.
    """

    checkpoint: Checkpoint
    model: ModelChoice
    calibration: LoadedData
    holdout: LoadedData | None
    data_config: dict
    loss: str | None


def load_inputs(
    checkpoint: str | Path,
    data: str | Path,
    holdout: str | Path | None = None,
    *,
    model: str | None = None,
    model_kwargs: str | dict | None = None,
    samples: int | None = None,
    seed: int = 0,
) -> Inputs:
    """Read and check every input of ``teleport apply``.

    Raises:
        InputError: unreadable or unfit checkpoint, model or data; a metadata ``loss`` that is
            not one of :data:`teleport_cli.config.LOSSES`.
    """
    ckpt = load_checkpoint(checkpoint)
    choice = choose_model(ckpt.metadata, str(checkpoint), model, model_kwargs)
    load_strict(choice.model, ckpt.state_dict, str(checkpoint))
    data_config = ckpt.json_field("data_config", {}) or {}
    if not isinstance(data_config, dict):
        raise InputError(f"{checkpoint}: metadata 'data_config' must be a JSON object")
    loss = ckpt.metadata.get("loss")
    if loss is not None and loss not in LOSSES:
        raise InputError(f"{checkpoint}: metadata 'loss' is {loss!r}, not one of {', '.join(LOSSES)}", hint="pass --loss")
    cal = choose_samples(load_data(data, data_config, choice.model, what="calibration"), samples, seed)
    hold = load_data(holdout, data_config, choice.model, what="held-out") if holdout is not None else None
    return Inputs(ckpt, choice, cal, hold, data_config, loss)
