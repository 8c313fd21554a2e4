"""Resumed-training benchmark: does training from a teleported checkpoint reach a loss faster?

For each variant (no teleport, null-space teleport once, periodic teleport, a random move in the
same null space, level-set teleportation, symmetry teleportation on the built-in MLP only:
skipped, with a note under ``skipped``, on other models) and each seed, training resumes for K
steps with the same optimizer, learning rate, seed and batch order, and records the minibatch
training loss at every step and the held-out loss at a few steps. Figures (issue 6):

* ``final_loss``: mean training loss over the last ``w = max(1, K // 10)`` steps;
* ``steps_to_target_ratio``: the first step t at which the trailing ``w``-step mean of the
  variant's curve reaches the original run's ``final_loss``, divided by K (< 1 is faster; None if
  never reached). On a flat, noisy curve the original itself touches its final loss before K:
  ``self_steps_to_target_ratio_per_seed`` of the original (mean: ``self_steps_to_target_ratio``,
  the original's row of the table) is the baseline to compare with;
* the ``random`` variant's ``teleport_seconds``: the seconds of the Grams and bases it shares
  with the null-space teleport (``grams_and_bases_seconds``) plus its projection;
* ``teleport_equivalent_steps``: the teleport's wall-clock seconds divided by the original run's
  seconds per training step; ``net_ratio = (t + equivalent steps) / K``.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..baselines.levelset import levelset_teleport
from ..baselines.symmetry import symmetry_teleport
from ..config import TeleportConfig
from ..data.tensors import TensorData
from ..models.builtin import MLP
from ..nullspace.layers import weight_blocks
from ..nullspace.losses import LOSS_FUNCTIONS
from ..nullspace.selection import find_layers
from ..pipeline import teleport
from .settings import BenchSettings


@dataclass
class Run:
    """One resumed run: the minibatch training loss per step and (step, held-out loss) pairs."""

    train: list[float]
    holdout: list[tuple[int, float]]
    seconds: float
    teleport_seconds: float = 0.0


def _optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


@torch.no_grad()
def _mean_loss(model: nn.Module, data: TensorData, loss_fn: Callable, batch: int = 512) -> float:
    total = 0.0
    for x, y in data.batches(batch, next(model.parameters()).device):
        total += float(loss_fn(model(x), y))
    return total / len(data)


def resume(
    model: nn.Module,
    train: TensorData,
    holdout: TensorData,
    settings: BenchSettings,
    seed: int,
    loss_name: str = "ce",
    every: Callable[[nn.Module, int], float] | None = None,
) -> Run:
    """Train a copy of ``model`` for ``settings.steps`` steps; the batch order depends only on ``seed``.

    ``every(model, step)``, if given, is called before steps ``period, 2 period, ...``; it may move
    the weights in place (periodic teleport) and returns the seconds it took; the optimizer
    state is reset after it (it no longer matches the moved weights).
    """
    loss_fn = LOSS_FUNCTIONS[loss_name]
    model = copy.deepcopy(model).train()
    device = next(model.parameters()).device
    opt = _optimizer(settings.optimizer, model.parameters(), settings.learning_rate)
    g = torch.Generator().manual_seed(seed)
    n, b = len(train), settings.batch_size
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(settings.steps * b // n + 1)])
    run = Run([], [(0, _mean_loss(model.eval(), holdout, loss_fn))], 0.0)
    model.train()
    evaluating = 0.0  # held-out evaluation is not training: kept out of the seconds per step
    start = time.perf_counter()
    for k in range(settings.steps):
        if every is not None and k > 0 and k % settings.period == 0:
            run.teleport_seconds += every(model, k)
            opt = _optimizer(settings.optimizer, model.parameters(), settings.learning_rate)
        idx = order[k * b : (k + 1) * b]
        x, y = train.inputs[idx].to(device), train.targets[idx].to(device)
        opt.zero_grad()
        loss = loss_fn(model(x), y) / x.shape[0]  # loss functions sum per-sample losses
        loss.backward()
        opt.step()
        run.train.append(float(loss.detach()))
        if (k + 1) % settings.holdout_every == 0 or k + 1 == settings.steps:
            paused = time.perf_counter()
            run.holdout.append((k + 1, _mean_loss(model.eval(), holdout, loss_fn)))
            model.train()
            evaluating += time.perf_counter() - paused
    run.seconds = time.perf_counter() - start - run.teleport_seconds - evaluating
    return run


def smoothed(curve: list[float], w: int) -> list[float]:
    """Trailing means: element t (0-based) is the mean of curve[t-w+1 .. t] (t >= w-1)."""
    out, acc = [], 0.0
    for t, v in enumerate(curve):
        acc += v
        if t >= w:
            acc -= curve[t - w]
        if t >= w - 1:
            out.append(acc / w)
    return out


def steps_to_target(curve: list[float], target: float, w: int) -> int | None:
    """First step count t (1-based) whose trailing w-step mean is <= target, or None."""
    for i, v in enumerate(smoothed(curve, w)):
        if v <= target:
            return i + w
    return None


def random_null_move(original: nn.Module, teleported: nn.Module, outcome, seed: int) -> nn.Module:
    """A random move in the same null spaces with each layer's displacement norm of the teleport."""
    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(original)
    layers, _ = find_layers(original)
    with torch.no_grad():
        for spec, _ in layers:
            basis = outcome.bases.get(spec.name)
            if basis is None:
                continue
            w0, w1 = original.get_parameter(spec.weight_key), teleported.get_parameter(spec.weight_key)
            norm = float((w1 - w0).norm())
            if norm == 0.0:
                continue
            r = torch.randn(w0.shape, generator=g).to(w0)
            p = basis.project(weight_blocks(spec, r)).reshape(w0.shape)
            model.get_parameter(spec.weight_key).copy_(w0 + p * (norm / float(p.norm())))
    return model


@dataclass
class VariantResult:
    """Aggregates over seeds for one variant (JSON-ready via ``to_dict``)."""

    name: str
    runs: list[Run] = field(default_factory=list)
    teleport_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def to_dict(self, settings: BenchSettings, reference: "VariantResult | None") -> dict:
        w, k = settings.window, settings.steps
        finals = [statistics.fmean(r.train[-w:]) for r in self.runs]
        held = [r.holdout[-1][1] for r in self.runs]
        sec_per_step = statistics.fmean(r.seconds for r in (reference or self).runs) / k
        tele = self.teleport_seconds + statistics.fmean(r.teleport_seconds for r in self.runs)
        out = {
            "final_loss_mean": statistics.fmean(finals),
            "final_loss_std": statistics.pstdev(finals),
            "holdout_final_mean": statistics.fmean(held),
            "holdout_final_std": statistics.pstdev(held),
            "teleport_seconds": tele,
            "teleport_equivalent_steps": tele / sec_per_step if sec_per_step > 0 else None,
            "seconds_per_step": sec_per_step,
            **self.info,
        }
        if reference is None:  # how early the original's own noisy curve first touches its final loss
            own = [steps_to_target(r.train, f, w) for r, f in zip(self.runs, finals)]
            out["self_steps_to_target_ratio_per_seed"] = per = [None if t is None else t / k for t in own]
            out["self_steps_to_target_ratio"] = statistics.fmean(per) if all(x is not None for x in per) else None
        else:
            ratios, nets = [], []
            for r, ref in zip(self.runs, reference.runs):
                t = steps_to_target(r.train, statistics.fmean(ref.train[-w:]), w)
                ratios.append(None if t is None else t / k)
                nets.append(None if t is None else (t + out["teleport_equivalent_steps"]) / k)
            reached = [x for x in ratios if x is not None]
            out["steps_to_target_ratio"] = statistics.fmean(reached) if len(reached) == len(ratios) else None
            out["steps_to_target_ratio_per_seed"] = ratios
            out["net_ratio"] = statistics.fmean(nets) if all(x is not None for x in nets) else None
        out["train_curve_mean"] = [statistics.fmean(v) for v in zip(*(r.train for r in self.runs))]
        first = self.runs[0].holdout
        out["holdout_curve_mean"] = [(first[i][0], statistics.fmean(r.holdout[i][1] for r in self.runs)) for i in range(len(first))]
        return out


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_bench(
    model: nn.Module,
    train: TensorData,
    holdout: TensorData,
    config: TeleportConfig,
    settings: BenchSettings,
    on_event: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Teleport ``model`` by every variant and resume training from each; return the JSON document.

    The calibration set is a seeded subset (``config.seed``) of ``settings.calibration_samples``
    training samples: the level set that matters is the training loss's.
    """
    event = on_event or (lambda *a: None)
    loss_fn = LOSS_FUNCTIONS[config.loss]
    device = next(model.parameters()).device
    k = min(settings.calibration_samples, len(train))
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))[:k].sort().values
    cal = train.subset(idx, train.source + " (calibration subset)")
    model = model.eval()

    starts: dict[str, tuple[nn.Module, float, dict]] = {"original": (model, 0.0, {})}
    spans: dict[str, float] = {}

    def timing(stage: str, done: int, total: int, info: dict) -> None:  # when the Grams start and the bases end
        if stage == "capture" and "grams" not in spans:
            spans["grams"] = time.perf_counter()
        if stage == "bases" and done == total:
            spans["bases"] = time.perf_counter()

    outcome, secs = _timed(lambda: teleport(model, cal, config, holdout=holdout, on_event=timing))
    info = {"verified": outcome.verified, "grad_norm_ratio": outcome.stats.grad_norm_ratio,
            "calibration_drift": outcome.verification.calibration.loss_drift, "holdout_drift": outcome.verification.holdout.loss_drift}
    starts["nullspace"] = (outcome.model, secs, info)
    if "periodic" in settings.variants:
        starts["periodic"] = (outcome.model, secs, {"period": settings.period})
    if "random" in settings.variants:
        # its cost: the same Grams and bases as the teleport (it reuses them), plus the projection
        moved, move_secs = _timed(lambda: random_null_move(model, outcome.model, outcome, config.seed))
        grams_and_bases = spans.get("bases", 0.0) - spans.get("grams", 0.0)
        starts["random"] = (moved, grams_and_bases + move_secs, {"grams_and_bases_seconds": grams_and_bases})
    if "levelset" in settings.variants:
        copy_ = copy.deepcopy(model)
        stats, secs = _timed(lambda: levelset_teleport(copy_, cal.batches(config.batch_size, device), config, loss_fn))
        starts["levelset"] = (copy_, secs, {"grad_norm_ratio": stats.grad_norm_ratio, "calibration_drift": abs(stats.loss_after - stats.loss_before) / abs(stats.loss_before)})
    skipped = {}
    if "symmetry" in settings.variants and not isinstance(model, MLP):
        skipped["symmetry"] = "symmetry teleportation needs the built-in mlp architecture"
    elif "symmetry" in settings.variants:
        copy_ = copy.deepcopy(model)
        stats, secs = _timed(lambda: symmetry_teleport(copy_, cal.batches(config.batch_size, device), config, loss_fn))
        starts["symmetry"] = (copy_, secs, {"grad_norm_ratio": stats.grad_norm_ratio, "calibration_drift": abs(stats.loss_after - stats.loss_before) / abs(stats.loss_before)})

    periodic_config = config.replace(steps=max(1, config.steps // 5))

    def periodic(m: nn.Module, step: int) -> float:
        start = time.perf_counter()
        out = teleport(m, cal, periodic_config, holdout=holdout)
        if out.verified:
            m.load_state_dict(out.model.state_dict())
        return time.perf_counter() - start

    results: dict[str, VariantResult] = {}
    names = [v for v in settings.variants if v in starts]
    total = len(names) * len(settings.seeds)
    for i, name in enumerate(names):
        start_model, secs, info = starts[name]
        res = VariantResult(name, teleport_seconds=secs, info=info)
        for j, seed in enumerate(settings.seeds):
            event("train", i * len(settings.seeds) + j, total)
            res.runs.append(resume(start_model, train, holdout, settings, seed, config.loss, periodic if name == "periodic" else None))
        results[name] = res
    event("train", total, total)
    ref = results.get("original")
    return {
        "settings": {**settings.__dict__, "seeds": list(settings.seeds), "variants": list(settings.variants), "lr": settings.learning_rate, "window": settings.window},
        "teleport": config.to_dict(),
        "calibration_samples": k,
        "variants": {name: r.to_dict(settings, None if name == "original" else ref) for name, r in results.items()},
        **({"skipped": skipped} if skipped else {}),
    }
