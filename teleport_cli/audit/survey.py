"""What each layer of a model offers at a given tau: capture, bases, and one summary per layer.

This is the first half of a teleport (load -> capture -> bases) without moving anything; it
is what ``teleport inspect`` prints, and :func:`summarise` is also how ``teleport apply``
reports its layers. Reasons a layer does not move, in the order they are checked: excluded
from the start (normalisation, embedding, tied, frozen, parametrized, other parameters), its
hook never fired on the calibration set (a dead branch: never treated as an empty null
space), its output is not the plain functional form of its input and stored weight, or its
null space at tau is empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.tensors import TensorData, as_tensor_data
from ..nullspace.bases import LayerBasis, layer_basis
from ..nullspace.capture import GramAccumulator, capture_grams
from ..nullspace.layers import Excluded, LayerSpec
from ..nullspace.selection import find_layers
from ..records import LayerSummary

DEAD = "never called on the calibration set (dead branch)"


def summarise(layers, excluded, accs, bases, changes) -> tuple[LayerSummary, ...]:
    """One :class:`LayerSummary` per teleportable layer (in module order), then the excluded ones."""
    out = []
    for spec, _ in layers:
        acc = accs[spec.name]
        basis = bases.get(spec.name)
        reason = ""
        if acc.calls == 0:
            reason = DEAD
        elif not acc.plain:
            func = "F.linear" if spec.kind.startswith(("linear", "mha", "hf_conv1d")) else f"F.{spec.kind}"
            reason = f"output is not {func} of its input and stored weight (relative error {acc.plain_error:.2g})"
        elif basis is not None and basis.null_dim == 0:
            reason = "null space is empty at this tau"
        out.append(
            LayerSummary(
                spec.name, spec.kind, spec.d_in, spec.d_out, spec.groups, acc.rows,
                basis.rank if basis else 0, basis.null_dim if basis else 0,
                not reason, reason, changes.get(spec.name, 0.0),
            )
        )
    for ex in excluded:
        out.append(LayerSummary(ex.name, ex.kind, 0, 0, 1, 0, 0, 0, False, ex.reason))
    return tuple(out)


def no_layer_reason(layers: tuple[LayerSummary, ...]) -> str | None:
    """Why no layer can move at any tau (None when some layer has, or at a lower tau could
    have, a null space): the kinds found and each distinct reason, with counts."""
    if any(not l.reason or l.reason == "null space is empty at this tau" for l in layers):
        return None
    if not layers:
        return "the model has no module with parameters"
    kinds: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for l in layers:
        kinds[l.kind] = kinds.get(l.kind, 0) + 1
        generic = l.reason.split(" (")[0] if l.reason.startswith(("output is not", "normalisation", "embedding")) else l.reason
        reasons[generic] = reasons.get(generic, 0) + 1
    found = ", ".join(f"{n} {k}" for k, n in kinds.items())
    why = "; ".join(f"{r} ({n})" for r, n in list(reasons.items())[:6])
    return f"found {found}; none is a Linear/Conv layer whose weight may move: {why}"


@dataclass
class Survey:
    """Capture and bases of one model on one calibration set.

    Attributes:
        layers: teleportable ``(spec, module)`` pairs; ``excluded``: the rest, with reasons.
        accs: name -> Gram accumulator; ``bases``: name -> basis (only for layers whose hook
            fired and that passed the plain-map check).
        summaries: one row per layer, as in ``teleport inspect``.
    """

    layers: list[tuple[LayerSpec, nn.Module]]
    excluded: list[Excluded]
    accs: dict[str, GramAccumulator]
    bases: dict[str, LayerBasis]
    summaries: tuple[LayerSummary, ...]
    samples: int


def survey_model(model: nn.Module, calibration, tau: float, *, batch_size: int = 256, layers: tuple[str, ...] = (),
                 exclude: tuple[str, ...] = ()) -> Survey:
    """Capture the Grams of ``model`` on ``calibration`` and summarise each layer at ``tau``.

    Args:
        model: any ``nn.Module``; run in eval mode (its mode is restored), on its own device.
        calibration: :class:`~teleport_cli.data.tensors.TensorData` or ``(inputs, targets)``.
        tau: in (0, 1]; 1 is the numerically exact null space (numpy's ``matrix_rank`` rule).
        layers, exclude: globs that narrow the layers that would move, as ``TeleportConfig``'s
            (:func:`teleport_cli.nullspace.selection.select_layers`).

    Raises:
        InputError: the data do not fit the model.
        ConfigError: a glob that matches no teleportable layer.
    """
    from ..nullspace.verify import forward_checked

    data = as_tensor_data(calibration, "calibration data")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        layers, excluded = find_layers(model, tuple(layers), tuple(exclude))
        batches = data.batches(batch_size, device)
        with torch.no_grad():  # shape errors as one-line InputErrors before any hook is set
            forward_checked(model, next(iter(batches))[0], data.source)
        accs = capture_grams(model, layers, batches)
    finally:
        model.train(was_training)
    bases = {
        spec.name: layer_basis(spec.name, accs[spec.name].gram, tau)
        for spec, _ in layers
        if accs[spec.name].calls > 0 and accs[spec.name].plain
    }
    return Survey(layers, excluded, accs, bases, summarise(layers, excluded, accs, bases, {}), len(data))


@dataclass
class InspectResult:
    """What ``teleport inspect`` reports."""

    checkpoint: str
    data: str
    arch: str
    tau: float
    survey: Survey

    def to_dict(self) -> dict:
        """The JSON document of ``teleport inspect --json``."""
        rows = []
        for s in self.survey.summaries:
            d = s.to_dict()
            d.pop("rel_weight_change")
            rows.append(d)
        return {
            "checkpoint": self.checkpoint,
            "data": self.data,
            "arch": self.arch,
            "tau": self.tau,
            "samples": self.survey.samples,
            "teleportable": sum(r["teleported"] for r in rows),
            "layers": rows,
        }


def inspect_checkpoint(checkpoint: str | Path, data: str | Path, tau: float = 0.99, *, batch_size: int = 256, device: str = "auto",
                       weights: str = "state_dict", trust_pickle: bool = False, model_spec: str | None = None,
                       model_kwargs: str | dict | None = None, layers: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> InspectResult:
    """Load a checkpoint and a calibration file and survey every layer at ``tau``.

    ``weights``, ``trust_pickle``, ``model_spec`` and ``model_kwargs`` choose the weight set and
    the architecture as ``teleport apply`` does (:func:`teleport_cli.models.loading.load_model`).

    Raises:
        InputError (exit 3): unreadable checkpoint or data, data that do not fit the model.
        ConfigError (exit 2): tau outside (0, 1], a ``layers``/``exclude`` glob that matches no
            teleportable layer.
    """
    from ..config import TeleportConfig
    from ..data.inputs import checkpoint_data_config
    from ..data.sources import load_data
    from ..models.device import resolve_device
    from ..models.loading import load_model

    TeleportConfig(tau=tau, batch_size=batch_size, device=device, layers=layers, exclude=exclude)  # validates the values
    model, ckpt, arch, _ = load_model(checkpoint, weights=weights, trust_pickle=trust_pickle, model_spec=model_spec, model_kwargs=model_kwargs)
    cal: TensorData = load_data(data, checkpoint_data_config(ckpt.metadata, str(checkpoint)), model, what="calibration").data
    model.to(resolve_device(device))
    return InspectResult(str(checkpoint), str(data), arch, tau, survey_model(model, cal, tau, batch_size=batch_size, layers=layers, exclude=exclude))
