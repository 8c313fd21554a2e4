"""What ``teleport report`` runs: files in, an :class:`~teleport_cli.audit.compare.Audit` out.

Also builds the audit of a teleport that ``teleport apply --report`` has just done, on exactly
the calibration and held-out samples that the teleport used.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from ..checkpoints.containers import read_checkpoint
from ..config import LOSSES, TeleportConfig
from ..data.inputs import checkpoint_data_config
from ..data.sources import load_data
from ..data.tensors import split_holdout
from ..errors import InputError
from ..models.builtin import model_from_metadata
from ..models.device import resolve_device
from ..models.loading import load_model
from .compare import Audit, audit_models
from .settings import AuditSettings


def _spec(metadata: dict[str, str]) -> tuple[str | None, dict]:
    try:
        return metadata.get("arch"), json.loads(metadata.get("model_kwargs", "{}"))
    except json.JSONDecodeError:
        return metadata.get("arch"), {}


def load_pair(a_path: str | Path, b_path: str | Path | None, *, weights: str = "state_dict", trust_pickle: bool = False,
              model_spec: str | None = None, model_kwargs: str | dict | None = None) -> tuple[nn.Module, nn.Module | None, str, dict[str, str]]:
    """Rebuild checkpoint A from its metadata and load B into the same architecture.

    B may lack the ``arch`` metadata (a file this tool did not write): its tensors must then fit
    A's model strictly. When both name an architecture, they must name the same one (the same
    name and kwargs, or kwargs that build the same modules, e.g. defaults written out), unless
    ``model_spec``/``model_kwargs`` (``--model``, ``--model-kwargs``) choose it for both.

    Returns:
        (model A, model B or None, arch, A's metadata), both models in eval mode on the CPU.

    Raises:
        InputError: unreadable files, different architectures, or B's tensors do not fit.
    """
    given = {"model_spec": model_spec, "model_kwargs": model_kwargs}
    a, ca, arch, kwargs = load_model(a_path, weights=weights, trust_pickle=trust_pickle, **given)
    if b_path is None:
        return a.eval(), None, arch, ca.metadata
    cb = read_checkpoint(b_path, trust_pickle=trust_pickle)
    arch_b, kwargs_b = _spec(cb.metadata)
    if (model_spec is None and model_kwargs is None and arch_b is not None and (arch_b, kwargs_b) != (arch, kwargs)
            and repr(model_from_metadata(cb.metadata, str(b_path))[0]) != repr(a)):  # same modules: same architecture
        raise InputError(
            f"{a_path} and {b_path} are different architectures ({arch} {json.dumps(kwargs)} vs {arch_b} {json.dumps(kwargs_b)})",
            hint="teleport report compares two checkpoints of the same architecture; --model and --model-kwargs choose one for both",
        )
    b = load_model(b_path, weights=weights, trust_pickle=trust_pickle, like=ca.metadata, read=cb, **given)[0]
    return a.eval(), b.eval(), arch, ca.metadata


def report(
    a_path: str | Path,
    b_path: str | Path | None,
    data: str | Path,
    holdout: str | Path | None = None,
    settings: AuditSettings | None = None,
    *,
    device: str = "auto",
    weights: str = "state_dict",
    trust_pickle: bool = False,
    model_spec: str | None = None,
    model_kwargs: str | dict | None = None,
) -> Audit:
    """Audit checkpoint A (and B against it) on the calibration and optional held-out files.

    Raises:
        InputError (exit 3): unreadable or unfit inputs, different architectures.
        ConfigError (exit 2): an unknown ``spectrum_layers`` name.
    """
    a, b, arch, meta = load_pair(a_path, b_path, weights=weights, trust_pickle=trust_pickle, model_spec=model_spec, model_kwargs=model_kwargs)
    data_config = checkpoint_data_config(meta, str(a_path))  # any data apply reads: tokens, text, images, tensors
    cal = load_data(data, data_config, a, what="calibration").data
    hold = load_data(holdout, data_config, a, what="held-out").data if holdout is not None else None
    settings = settings or AuditSettings()
    if meta.get("loss") in LOSSES and settings.loss == AuditSettings.loss:  # the checkpoint's own loss (lm), as apply takes it
        settings = dataclasses.replace(settings, loss=meta["loss"])
    dev = resolve_device(device)
    a.to(dev)
    if b is not None:
        b.to(dev)
    audit = audit_models(a, b, cal, hold, settings, sources=(str(a_path), str(b_path) if b_path is not None else None))
    audit.doc["arch"] = arch
    audit.doc["weights"] = weights
    return audit


def report_for_apply(result, data: str | Path, holdout: str | Path | None, config: TeleportConfig) -> Audit:
    """The audit of the teleport in ``result`` (a :class:`~teleport_cli.pipeline.ApplyResult`).

    A is the source checkpoint, B the teleported model in memory (also when verification
    failed and nothing was written); the data sets are those the teleport used (the same seeded
    held-out split when no held-out file was given). Gates use the teleport's tolerances.
    """
    moved = result.outcome.model.eval()
    a = result.original.eval()  # the weights apply teleported (also --weights ema, --model)
    cal = load_data(data, None, a, what="calibration").data
    if holdout is None:
        cal, hold, _ = split_holdout(cal, config.holdout_fraction, config.seed)
    else:
        hold = load_data(holdout, None, a, what="held-out").data
    settings = AuditSettings(tau=config.tau, tolerance=config.tolerance, holdout_tolerance=config.holdout_tolerance,
                             batch_size=config.batch_size, seed=config.seed, loss=config.loss)
    audit = audit_models(a, moved, cal, hold, settings, sources=(result.source, result.output or "(teleported, not written)"))
    audit.doc["arch"] = result.arch
    return audit
