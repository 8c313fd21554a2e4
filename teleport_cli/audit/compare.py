"""The audit behind ``teleport report``: compare two models (or describe one) on data sets.

For two models A (reference) and B of the same architecture:

* per data set (calibration, optional held-out): mean loss and accuracy of both and their
  difference, max and mean ``|logit_B - logit_A|`` over all samples and classes, and the
  drift gate of ``teleport apply`` (:func:`teleport_cli.nullspace.linesearch.drift_ok`, with A's noise floor);
* per Linear/Conv2d layer: relative output drift ``||Z_B - Z_A||_F / ||Z_A||_F`` over the
  whole calibration set (forward hooks on both models), relative weight change
  ``||W_B - W_A||_F / ||W_A||_F``, and A's Gram rank and null-space dimension at tau;
* geometry of each model on the calibration set (:mod:`teleport_cli.audit.geometry`);
* stability: heavy-ball SGD with step ``lr`` and momentum ``beta`` on a quadratic diverges
  once the top Hessian eigenvalue exceeds ``2 (1 + beta) / lr`` (``2 / lr`` without momentum;
  Polyak 1964; Cohen et al., ICLR 2021, "edge of stability"). Not for adaptive optimisers.

With one model only the geometry and the layers' null spaces are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..data.tensors import TensorData
from ..errors import ConfigError
from ..nullspace.ascent import relative_changes
from ..nullspace.bases import layer_basis
from ..nullspace.capture import capture_grams
from ..nullspace.derivatives import Batches
from ..nullspace.linesearch import drift_ok
from ..nullspace.losses import IGNORE, counted_targets, loss_for
from ..nullspace.selection import find_layers
from ..nullspace.verify import check_targets, forward_checked, noise_floor
from ..records import _finite
from .geometry import measure
from .settings import AuditSettings

ADAPTIVE_NOTE = (
    "the 2(1+beta)/lr edge holds for plain SGD and heavy-ball momentum only; it does not cover "
    "adaptive optimizers (Adam, AdamW, RMSprop, Adagrad), whose step is preconditioned per parameter"
)
DRIFT_RULE = "|L_B - L_A| <= tolerance * |L_A| + 1e-6 + noise floor"


@dataclass
class Audit:
    """An audit's result: the JSON document and the Gram eigenvalues of A for the plots.

    Attributes:
        doc: JSON-ready dict (``teleport report --json``).
        eigenvalues: layer name -> ``(groups, d_in)`` float64 ascending Gram eigenvalues of A.
        spectrum_layers: the layers whose spectrum is plotted.
    """

    doc: dict
    eigenvalues: dict[str, torch.Tensor] = field(default_factory=dict)
    spectrum_layers: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool | None:
        """The invariance verdict; None with one model (nothing to compare)."""
        return self.doc["invariance"]["passed"]


@torch.no_grad()
def compare_set(a: nn.Module, b: nn.Module, batches: Batches, loss_fn: Callable, *, name: str, tolerance: float, floor: float) -> dict:
    """Loss, accuracy and logit differences of two models on one data set (streaming)."""
    loss_a = loss_b = abs_sum = 0.0
    correct_a = correct_b = n = labels = entries = 0  # n: samples (losses are per sample); labels: counted targets
    max_diff = 0.0
    for x, y in batches:
        za = forward_checked(a, x, name).double()
        zb = forward_checked(b, x, name).double()
        loss_a += float(loss_fn(za, y))
        loss_b += float(loss_fn(zb, y))
        correct_a += int((za.argmax(-1) == y).sum())
        correct_b += int((zb.argmax(-1) == y).sum())
        diff = (zb - za).abs()
        if diff.ndim == 3:  # a language model: logits at counted targets only (padded positions may move)
            diff = diff[y != IGNORE]
        if diff.numel():
            max_diff = max(max_diff, float(diff.max()))
        abs_sum += float(diff.sum())
        entries += diff.numel()
        n += int(x.shape[0])
        labels += counted_targets(y)
    loss_a, loss_b = loss_a / n, loss_b / n
    return {
        "samples": n,
        "loss_a": loss_a,
        "loss_b": loss_b,
        "loss_diff": loss_b - loss_a,
        "relative_loss_drift": _finite(abs(loss_b - loss_a) / abs(loss_a)) if loss_a else None,
        "accuracy_a": correct_a / labels,
        "accuracy_b": correct_b / labels,
        "accuracy_diff": (correct_b - correct_a) / labels,
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": abs_sum / max(entries, 1),
        "tolerance": tolerance,
        "passed": bool(drift_ok(loss_b, loss_a, tolerance, floor) and torch.isfinite(torch.tensor(loss_b))),
    }


@torch.no_grad()
def _excluded_change(a: nn.Module, b: nn.Module, name: str) -> float | None:
    """Relative change of an excluded module's weight (or of a bare parameter), None if it has none."""
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    key = name if name in params_a else f"{name}.weight"
    if key not in params_a or key not in params_b:
        return None
    w0, w1 = params_a[key].detach().double(), params_b[key].detach().double()
    denom = float(w0.norm())
    return float((w1 - w0).norm()) / denom if denom > 0 else 0.0


def output_drift(a: nn.Module, b: nn.Module, names: list[str], batches: Batches) -> dict[str, float]:
    """``||Z_B - Z_A||_F / ||Z_A||_F`` of each named module's output over all batches.

    Both models see the same batch; A's outputs of that batch are held until B has run
    (one batch of layer outputs in memory at a time). A layer that is never called gets NaN.
    """
    mods_a, mods_b = dict(a.named_modules()), dict(b.named_modules())
    held: dict[str, torch.Tensor] = {}
    num = {k: 0.0 for k in names}
    den = {k: 0.0 for k in names}

    def first(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    def keep(name):
        return lambda m, args, out: held.__setitem__(name, first(out).detach())

    def diff(name):
        def hook(m, args, out):
            out = first(out)
            ref = held.pop(name).double()
            num[name] += float(((out.detach().double() - ref) ** 2).sum())
            den[name] += float((ref**2).sum())

        return hook

    handles = [mods_a[k].register_forward_hook(keep(k)) for k in names] + [mods_b[k].register_forward_hook(diff(k)) for k in names]
    try:
        for x, _ in batches:
            a(x)
            b(x)
            held.clear()
    finally:
        for h in handles:
            h.remove()
    return {k: (num[k] ** 0.5 / den[k] ** 0.5 if den[k] > 0 else (0.0 if num[k] == 0 else float("inf"))) for k in names}


def stability(top_eigenvalues: dict[str, float], lr: float | None, momentum: float) -> dict | None:
    """The SGD stability check: ``lambda_max > 2 (1 + beta) / lr`` is flagged unstable."""
    if lr is None:
        return None
    edge = 2.0 * (1.0 + momentum) / lr
    out = {"lr": lr, "momentum": momentum, "edge": edge, "note": ADAPTIVE_NOTE}
    for key, lam in top_eigenvalues.items():
        known = lam is not None
        out[key] = {"top_eigenvalue": lam, "ratio_to_edge": lam / edge if known else None, "unstable": bool(lam > edge) if known else None}
    return out


def _default_spectrum_layers(names: list[str]) -> list[str]:
    if len(names) <= 3:
        return list(names)
    return [names[0], names[len(names) // 2], names[-1]]


def audit_models(
    a: nn.Module,
    b: nn.Module | None,
    calibration: TensorData,
    holdout: TensorData | None = None,
    settings: AuditSettings | None = None,
    *,
    sources: tuple[str, str | None] = ("A", "B"),
) -> Audit:
    """Audit model ``a`` (and its comparison with ``b``) on the data sets.

    Both models must be in eval mode on the same device; they are not changed.

    Raises:
        InputError: data that do not fit the models, or a non-deterministic model A.
        ConfigError: a ``spectrum_layers`` name that is not a Linear/Conv2d layer of A.
    """
    s = settings or AuditSettings()
    loss_fn = loss_for(s.loss, calibration.targets, calibration.source)
    device = next(a.parameters()).device
    cal = calibration.batches(s.batch_size, device)
    check_targets(a, calibration, calibration.source)
    if holdout is not None:
        check_targets(a, holdout, holdout.source)
    _, floor = noise_floor(a, cal, loss_fn, calibration.source)
    layers, excluded = find_layers(a)
    accs = capture_grams(a, layers, cal)
    bases, failed = {}, {}
    for sp, _ in layers:
        if accs[sp.name].calls > 0:
            try:
                bases[sp.name] = layer_basis(sp.name, accs[sp.name].gram, s.tau)
            except torch.linalg.LinAlgError as e:  # LAPACK gives up on some large rank-deficient Grams
                failed[sp.name] = "Gram eigendecomposition failed: " + str(e).split(":")[0]
    modules = dict(a.named_modules())
    names = list(dict.fromkeys([sp.module_name or sp.name for sp, _ in layers] + [ex.name for ex in excluded if ex.name in modules]))
    drift = output_drift(a, b, names, cal) if b is not None else {}
    change = relative_changes(b, a, [sp for sp, _ in layers]) if b is not None else {}
    if b is not None:
        change.update({ex.name: _excluded_change(a, b, ex.name) for ex in excluded})
    rows = []
    for sp, _ in layers:
        basis = bases.get(sp.name)
        note = "" if basis is not None else failed.get(sp.name, "never called on the calibration set")
        if basis is not None and not accs[sp.name].plain:
            note = "not a plain F.linear/F.conv2d of its input: apply leaves it alone"
        rows.append({"name": sp.name, "kind": sp.kind, "d_in": sp.d_in, "groups": sp.groups,
                     "rank": basis.rank if basis else None, "null_dim": basis.null_dim if basis else None,
                     "output_drift": _finite(drift.get(sp.module_name or sp.name)), "rel_weight_change": _finite(change.get(sp.name)), "note": note})
    for ex in excluded:
        rows.append({"name": ex.name, "kind": ex.kind, "d_in": None, "groups": None, "rank": None, "null_dim": None,
                     "output_drift": _finite(drift.get(ex.name)), "rel_weight_change": _finite(change.get(ex.name)), "note": ex.reason})
    chosen = list(s.spectrum_layers) or _default_spectrum_layers(list(bases))
    unknown = [c for c in chosen if c not in bases]
    if unknown:
        raise ConfigError(f"--spectrum-layer {', '.join(unknown)} is not a captured Linear/Conv2d layer", hint="choose from: " + ", ".join(bases))

    models = {"a": a} if b is None else {"a": a, "b": b}
    geo = {k: measure(m, cal, loss_fn, iterations=s.iterations, probes=s.probes, radius=s.radius, seed=s.seed).to_dict() for k, m in models.items()}
    datasets = {}
    if b is not None:
        datasets["calibration"] = compare_set(a, b, cal, loss_fn, name="calibration", tolerance=s.tolerance, floor=floor)
        if holdout is not None:
            hold = holdout.batches(s.batch_size, device)
            datasets["holdout"] = compare_set(a, b, hold, loss_for(s.loss, holdout.targets, holdout.source), name="holdout", tolerance=s.holdout_tolerance, floor=floor)
    passed = all(d["passed"] for d in datasets.values()) if b is not None else None
    doc = {
        "a": sources[0],
        "b": sources[1] if b is not None else None,
        "settings": s.to_dict(),
        "calibration": {"source": calibration.source, "samples": len(calibration)},
        "holdout": {"source": holdout.source, "samples": len(holdout)} if holdout is not None else None,
        "datasets": datasets,
        "layers": rows,
        "geometry": geo,
        "stability": stability({k: g["top_eigenvalue"] for k, g in geo.items()}, s.lr, s.momentum),
        "invariance": {"passed": passed, "rule": DRIFT_RULE, "noise_floor": floor,
                       "checked": list(datasets)},
    }
    return Audit(doc, {k: v.eigenvalues for k, v in bases.items()}, chosen)
