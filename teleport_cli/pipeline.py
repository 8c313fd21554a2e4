"""The stages in order: load -> capture -> bases -> teleport -> verify -> save.

:func:`teleport` is the library API (a model and data in memory, usable inside a training
loop); :func:`apply` is what ``teleport apply`` runs (files in, a verified file out).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import __version__
from .audit.survey import no_layer_reason
from .audit.survey import summarise as _summaries
from .checkpoints.containers import check_output_for, read_checkpoint, write_checkpoint
from .checkpoints.options import FileOptions
from .checkpoints.training_state import (
    assemble,
    moved_keys,
    moved_stored,
    stored_dtypes,
)
from .config import TeleportConfig
from .data.inputs import load_data_inputs
from .data.tensors import as_tensor_data, split_holdout
from .errors import ConfigError, NoStepAccepted, VerificationFailed
from .models.device import resolve_device
from .models.loading import load_weights
from .nullspace.ascent import ascend, relative_changes
from .nullspace.bases import LayerBasis, layer_basis
from .nullspace.capture import capture_grams
from .nullspace.derivatives import count_samples, full_gradient, whole_set
from .nullspace.hvp import HessianVectorProduct, full_precision_matmul
from .nullspace.losses import loss_for
from .nullspace.objectives import make_objective
from .nullspace.selection import find_layers
from .nullspace.storage_dtype import storage_failure, verify_storage
from .nullspace.verify import check_targets, compare, noise_floor
from .nullspace.batching import resolve_batch_size
from .parallel import group as parallel
from .parallel.collective import broadcast_, map_by_rank
from .parallel.shards import shard
from .parallel.training import teleported_module
from .records import LayerSummary, TeleportStats, Verification

# on_event(stage, done, total, info): stage is "batch-size", "capture", "bases", "lookahead-lr",
# "ascent", "verify" or "stability"; info is a dict, for "ascent" with "accepted", "rejected",
# "grad_norm_ratio" and "seconds" (since the ascent started)
Progress = Callable[[str, int, int, dict], None]


@dataclass
class TeleportOutcome:
    """Result of :func:`teleport`.

    Attributes:
        model: the teleported copy of the model (eval mode, same device).
        layers: one summary per layer, teleported or not (with the reason), then every other
            module that holds parameters (excluded, with the reason).
        stats: what the ascent loop did.
        verification: calibration and held-out checks against the original.
        holdout_indices: indices of the calibration data set aside as held-out set, or None.
        calibration_sha256: hash of the calibration samples actually used.
        stability: with ``config.lr``: top Hessian eigenvalues before and after against the
            SGD edge ``2 (1 + momentum) / lr`` (:func:`teleport_cli.audit.geometry.stability_check`).
        lookahead_lr: the learning rate of the look-ahead's virtual steps (``config.lr``, or
            ``1 / lambda_max`` of the calibration loss), None for other objectives.
        guard_samples: calibration samples kept out of the Grams and the objective as a guard.
    """

    model: nn.Module
    layers: tuple[LayerSummary, ...]
    bases: dict[str, LayerBasis]
    stats: TeleportStats
    verification: Verification
    holdout_indices: list[int] | None
    calibration_sha256: str
    stability: dict | None = None
    lookahead_lr: float | None = None
    guard_samples: int = 0
    batch: dict | None = None  # with batch_size "auto": the choice and its memory estimate (BatchChoice.to_dict)

    @property
    def verified(self) -> bool:
        return self.verification.passed

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


def teleport(
    model: nn.Module,
    calibration,
    config: TeleportConfig | None = None,
    *,
    holdout=None,
    on_event: Progress | None = None,
    storage_dtypes: dict[str, torch.dtype] | None = None, started: float | None = None,
) -> TeleportOutcome:
    """Teleport ``model`` along the calibration-loss level set and verify the result.

    The original model is left unchanged (its training mode is restored on return); the
    teleported copy is in ``outcome.model``. Runs on the device of the model's parameters.

    In a process group (torchrun, DDP) every rank passes the whole calibration set and streams
    its shard; :mod:`teleport_cli.parallel.training` says what happens to a DDP wrapper.

    Args:
        model: a classifier returning ``(N, C)`` logits.
        calibration: :class:`~teleport_cli.data.tensors.TensorData` or ``(inputs, targets)``.
        config: settings (defaults: :class:`~teleport_cli.config.TeleportConfig`).
        holdout: held-out data; when None, ``config.holdout_fraction`` of ``calibration``
            (seeded by ``config.seed``) is set aside.
        on_event: progress callback ``(stage, done, total, info)`` (see ``Progress``).
        storage_dtypes: state-dict key -> the dtype the weight will be stored in (float16,
            bfloat16); each ascent step is checked after rounding to it (docs/guard.md).

    Returns:
        :class:`TeleportOutcome`; check ``outcome.verified`` before using the weights.

    Raises:
        InputError: the data do not fit the model, or the model is not deterministic.
    """
    started, config = time.perf_counter() if started is None else started, config or TeleportConfig()
    event = on_event or (lambda stage, done, total, info: None)
    device = next(model.parameters()).device
    model = teleported_module(model)  # a DDP wrapper's module (docs/scale.md)
    joined = parallel.active() is None and parallel.start(device) is not None  # a caller's group (DDP), or torchrun's
    was_training = model.training
    model.eval()
    try:
        if parallel.active() is not None and config.method != "nullspace":
            raise ConfigError(f"--method {config.method} runs in one process only", hint="use --method nullspace under torchrun")
        cal = as_tensor_data(calibration, "calibration data")
        batch = None
        if config.batch_size == "auto":
            config, batch = resolve_batch_size(model, cal, config, event)
        check_targets(model, cal, cal.source)
        indices = None
        if holdout is None:
            cal, hold, indices = split_holdout(cal, config.holdout_fraction, config.seed)
        else:
            hold = as_tensor_data(holdout, "held-out data")
            check_targets(model, hold, hold.source)
        loss_fn, hold_loss_fn = loss_for(config.loss, cal.targets, cal.source), loss_for(config.loss, hold.targets, hold.source)
        cal_batches = shard(cal).batches(config.batch_size, device)  # data parallel: split the whole set, then shard
        hold_batches = shard(hold).batches(config.batch_size, device)
        fit, guard = cal, None
        if config.guard_fraction > 0 and config.method == "nullspace" and len(cal) >= 10:
            fit, guard_data, _ = split_holdout(cal, config.guard_fraction, config.seed + 1)
            guard = shard(guard_data).batches(config.batch_size, device)
        fit_batches = shard(fit).batches(config.batch_size, device)

        original_outputs: list = []  # the original's calibration outputs, kept for verify
        _, floor = noise_floor(model, cal_batches, loss_fn, cal.source, original_outputs)
        layers, excluded = find_layers(model, config.layers, config.exclude)
        done = [0]

        def captured(k: int) -> None:
            done[0] += k
            event("capture", done[0], len(fit), {})

        event("capture", 0, len(fit), {})
        precision = torch.float32 if config.eigh == "float32" and config.tau < 1.0 and next(model.parameters()).dtype != torch.float64 else torch.float64
        accs = capture_grams(model, layers, fit_batches, captured)
        basis_layers = [spec for spec, _ in layers if accs[spec.name].calls > 0 and accs[spec.name].plain]
        event("bases", 0, len(basis_layers), {})
        # data parallel: each eigendecomposition on one rank, sent to all (eigh may differ between processes)
        bases = map_by_rank(lambda name: layer_basis(name, accs[name].gram, config.tau, precision), [s.name for s in basis_layers], device)
        for spec in basis_layers:  # the bases are what the rest needs: the Grams' memory goes (docs/budget.md)
            accs[spec.name].gram = None
        event("bases", len(basis_layers), len(basis_layers), {})

        moved = copy.deepcopy(model)
        moved_layers, _ = find_layers(moved, config.layers, config.exclude)

        def stepped(step: int, record, log) -> None:
            ratio = log.history[-1].grad_norm / log.grad_norm0 if log.history and log.grad_norm0 > 0 else 1.0
            event("ascent", step, config.steps, {"accepted": log.accepted, "rejected": log.rejected,
                                                 "grad_norm_ratio": ratio, "seconds": time.perf_counter() - ascent_start[0]})

        ascent_start = [time.perf_counter()]

        lookahead_lr = config.lr
        fit_states: dict = {}  # the ascent's gradient states on the fit part, before and after (for whole_set)
        if config.method != "nullspace":  # baselines: gradient-norm ascent on the level set without null spaces
            from .baselines.levelset import levelset_teleport

            if config.method == "symmetry":
                from .baselines.symmetry import symmetry_teleport as move
            else:
                move = levelset_teleport
            stats = move(moved, cal_batches, config, loss_fn, noise_floor=floor, on_step=stepped)
        else:
            lanczos, start_state = None, None
            if config.objective == "lookahead" and lookahead_lr is None:
                from .audit.geometry import top_eigenvalue

                event("lookahead-lr", 0, 1, {})
                lanczos = HessianVectorProduct(config.hvp)
                with full_precision_matmul():  # one gradient for the Lanczos's differences and the ascent's start
                    start_state = full_gradient(model, fit_batches, loss_fn, [p for p in model.parameters() if p.requires_grad], count_samples(fit_batches))
                lookahead_lr = 1.0 / max(abs(top_eigenvalue(model, fit_batches, loss_fn, seed=config.seed, hvp=lanczos,
                                                            grads=start_state.grads)), 1e-12)
                event("lookahead-lr", 1, 1, {})
            ascent_start[0] = time.perf_counter()
            event("ascent", 0, config.steps, {"accepted": 0, "rejected": 0, "grad_norm_ratio": 1.0, "seconds": 0.0})
            objective = make_objective(config.objective, lr=lookahead_lr, lookahead_steps=config.lookahead_steps, probes=config.probes,
                                       seed=config.seed, hvp=config.hvp)
            stats = ascend(moved, fit_batches, moved_layers, bases, config, loss_fn, noise_floor=floor, objective=objective,
                           on_step=stepped, guard=guard, guard_tolerance=config.tolerance,
                           guard_trust=config.holdout_tolerance, round_to=storage_dtypes, states=fit_states,
                           clock_start=started, start_state=start_state)
            if stats.hvp is not None and lanczos is not None:  # how the look-ahead's 1/lambda_max was taken
                stats = dataclasses.replace(stats, hvp={**stats.hvp, "lanczos": lanczos.to_dict()})
        if guard is not None and "before" in fit_states:  # loss and gradient norm over the whole calibration set
            before = whole_set(fit_states["before"], model, guard, loss_fn, len(fit), len(cal))
            after = whole_set(fit_states["after"], moved, guard, loss_fn, len(fit), len(cal))
            stats = dataclasses.replace(stats, loss_before=before.loss, loss_after=after.loss,
                                        grad_norm_before=before.grad_norm, grad_norm_after=after.grad_norm)
        broadcast_(list(moved.parameters()))  # data parallel: every rank leaves with rank 0's weights
        changes = relative_changes(moved, model, [s for s, _ in layers])
        event("ascent", stats.steps_accepted, stats.steps_accepted, {"accepted": stats.steps_accepted, "rejected": stats.steps_rejected,
              "grad_norm_ratio": stats.grad_norm_ratio, "seconds": stats.seconds, "stop_reason": stats.stop_reason})
        event("verify", 0, 2, {})
        check_cal = compare(model, moved, cal_batches, loss_fn, name="calibration", tolerance=config.tolerance, floor=floor, reference=original_outputs)
        event("verify", 1, 2, {})
        check_hold = compare(model, moved, hold_batches, hold_loss_fn, name="holdout", tolerance=config.holdout_tolerance, floor=floor)
        event("verify", 2, 2, {})
        stable = None
        if config.lr is not None:
            from .audit.geometry import stability_check, top_eigenvalue

            event("stability", 0, 2, {})
            tops = [top_eigenvalue(m, cal_batches, loss_fn, seed=config.seed) for m in (model, moved)]
            stable = stability_check(tops[0], tops[1], config.lr, config.momentum)
            event("stability", 2, 2, {})
        return TeleportOutcome(
            moved,
            _summaries(layers, excluded, accs, bases, changes),
            bases,
            stats,
            Verification(check_cal, check_hold, floor),
            indices,
            cal.sha256(),
            stable,
            lookahead_lr if config.objective == "lookahead" and config.method == "nullspace" else None,
            len(cal) - len(fit),
            batch,
        )
    finally:
        model.train(was_training)
        if joined:  # a group this call joined: left as it was found
            parallel.finish()


@dataclass
class ApplyResult:
    """What ``teleport apply`` did: the outcome, the output path and the total seconds."""

    outcome: TeleportOutcome
    output: str | None
    seconds: float
    arch: str
    source: str
    files: dict | None = None  # container, which weights moved, EMA/optimizer, storage-dtype check
    original: nn.Module | None = None  # the model before the teleport (for apply --report)
    batch_size: int | None = None  # the calibration batch size used (chosen by "auto" or given)

    def to_dict(self) -> dict:
        """The JSON document of ``teleport apply --json``."""
        o = self.outcome
        v = o.verification

        return {
            "verified": v.passed and self.output is not None,  # exit 4 or 5: nothing written, nothing verified
            "output": self.output,
            "source": self.source,
            "arch": self.arch,
            "seconds": round(self.seconds, 3),
            "ascent_seconds": round(o.stats.seconds, 3),
            "grad_norm_before": o.stats.grad_norm_before,
            "grad_norm_after": o.stats.grad_norm_after,
            "grad_norm_ratio": o.stats.grad_norm_ratio,
            "steps_accepted": o.stats.steps_accepted,
            "steps_rejected": o.stats.steps_rejected,
            "step_backs": o.stats.step_backs,
            "rejections": dict(o.stats.rejections),
            "stop_reason": o.stats.stop_reason,
            "objective": o.stats.objective,
            "objective_before": o.stats.objective_before,
            "objective_after": o.stats.objective_after,
            "lookahead_lr": o.lookahead_lr,
            "hvp": o.stats.hvp,
            "guard_samples": o.guard_samples,
            "batch_size": self.batch_size,
            "memory": o.batch,
            "noise_floor": v.noise_floor,
            "stability": o.stability,
            "calibration": v.calibration.summary(),
            "holdout": v.holdout.summary(),
            "holdout_source": "split" if o.holdout_indices is not None else "file",
            "layers": [l.to_dict() for l in o.layers],
            **({"checkpoint": self.files} if self.files is not None else {}),
        }


def _versions() -> dict[str, str]:
    """Versions for the provenance metadata; read from the installed metadata, since importing
    timm only for its version took 1.5 s (profiled) on every apply, also for built-in models."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        timm_version = version("timm")
    except PackageNotFoundError:  # pragma: no cover - timm is a dependency
        timm_version = "not installed"
    return {"teleport_cli": __version__, "torch": torch.__version__, "timm": timm_version}


def apply(
    checkpoint: str | Path,
    data: str | Path,
    output: str | Path,
    config: TeleportConfig | None = None,
    *,
    holdout: str | Path | None = None,
    force: bool = False,
    on_event: Progress | None = None,
    files: FileOptions | None = None,
    module: nn.Module | None = None,
    model_spec: str | None = None,
    model_kwargs: str | dict | None = None,
    samples: int | None = None,
    loss_from_checkpoint: bool = False,
    on_written: Callable[[Path], None] | None = None,
) -> ApplyResult:
    """Load a checkpoint and data files, teleport, verify, and write the verified checkpoint.

    The output is written in the input's container (see :mod:`teleport_cli.checkpoints.containers`); ``files``
    chooses the weights to move and what happens to EMA weights and optimizer state
    (:mod:`teleport_cli.checkpoints.training_state`). ``module``: an instance of the architecture, for
    checkpoints whose metadata does not name one (its weights are replaced by the checkpoint's).
    ``model_spec``/``model_kwargs`` override the metadata's architecture (``--model``,
    ``--model-kwargs``; :mod:`teleport_cli.models.factories`); ``samples`` keeps a seeded choice of
    calibration samples (``--samples``, seeded by ``config.seed``); with ``loss_from_checkpoint``
    the checkpoint's ``loss`` metadata (if any) replaces ``config.loss``; ``on_written(out)`` runs
    once the output is in place (the CLI's commit point for Ctrl-C). Data kinds:
    :mod:`teleport_cli.data.sources`.

    Raises:
        InputError (exit 3): unreadable or unfit inputs.
        OutputError (exit 6): the output exists (without ``force``), is an input, or cannot be written.
        NoStepAccepted (exit 5): no step was accepted; nothing written.
        VerificationFailed (exit 4): a drift gate failed; nothing written.
    """
    start = time.perf_counter()
    config = config or TeleportConfig()
    files = files or FileOptions()
    ckpt = read_checkpoint(checkpoint, trust_pickle=files.trust_pickle)
    choice, weights = load_weights(ckpt, files, model_spec=model_spec, model_kwargs=model_kwargs, module=module)
    model, arch, kwargs, origin = choice.model, choice.arch, choice.kwargs, choice.origin
    inputs = load_data_inputs(ckpt.metadata, str(checkpoint), data, holdout, model, samples=samples, seed=config.seed)
    if loss_from_checkpoint and inputs.loss is not None:
        config = config.replace(loss=inputs.loss)
    cal = inputs.calibration.data
    hold = inputs.holdout.data if inputs.holdout is not None else None
    out = check_output_for(ckpt, output, [checkpoint, data, holdout], force)
    device = resolve_device(config.device)
    parallel.start(device)  # under torchrun: join the group (rank 0 alone writes, below)
    model.to(device)
    batch = None
    if config.batch_size == "auto":  # chosen here: the storage check below batches with it too
        was_training = model.training
        model.eval()
        config, batch = resolve_batch_size(model, as_tensor_data(cal, "calibration data"), config, on_event or (lambda *a: None))
        model.train(was_training)
    outcome = teleport(model, cal, config, holdout=hold, on_event=on_event, storage_dtypes=stored_dtypes(weights), started=start)
    outcome.batch = batch
    result = ApplyResult(outcome, None, time.perf_counter() - start, arch, str(checkpoint), original=model, batch_size=config.batch_size)
    if parallel.finish() > 0:  # every decision was rank 0's: it alone checks, writes and reports from here on
        return result
    why = no_layer_reason(outcome.layers) if outcome.stats.steps_accepted == 0 else None
    if why is not None:
        raise NoStepAccepted(
            f"no layer can be teleported, at any tau: {why}",
            hint="only plain nn.Linear/nn.Conv (and transformers Conv1D) weights that are trainable and untied move; see teleport inspect",
            result=result,
        )
    if outcome.stats.steps_accepted == 0:
        raise NoStepAccepted(
            f"no teleport step was accepted ({outcome.stats.stop_reason}): the weights did not move",
            hint="lower --tau: at this tau the null spaces hold no direction the objective can use (see teleport inspect)"
            if outcome.stats.stop_reason == "no_freedom" else "lower --step-size, raise --tolerance, or lower --tau for more freedom",
            result=result,
        )
    if not outcome.verified:
        failed = [c for c in (outcome.verification.calibration, outcome.verification.holdout) if not c.passed]
        detail = "; ".join(f"{c.name} loss {c.loss_before:.6g} -> {c.loss_after:.6g} (drift {c.loss_drift:.3g} > {c.tolerance:g})" for c in failed)
        raise VerificationFailed(
            f"verification failed: {detail}; nothing written",
            hint="raise --tau, lower --step-size or --steps, or use a larger calibration set",
            result=result,
        )
    new_state = {k: v.detach().cpu() for k, v in outcome.model.state_dict().items()}
    moved = moved_keys(model.state_dict(), new_state)
    sets, entries, actions = assemble(weights, new_state, moved)
    storage = verify_storage(model, outcome.model, moved_stored(weights, sets, moved), cal, hold, config, outcome.verification.noise_floor)
    result.files = {**actions, "storage": storage}
    if not storage["passed"]:
        raise storage_failure(storage, result)
    metadata = dict(ckpt.metadata)
    metadata.update(
        {
            "format": "pt",
            **({"arch": arch, "model_kwargs": kwargs if isinstance(kwargs, str) else json.dumps(kwargs)} if arch else {}),
            "teleport": json.dumps(config.to_dict()),
            "teleport_stats": json.dumps(outcome.stats.to_dict()),
            **({"memory": json.dumps(batch)} if batch is not None else {}),
            "verification": json.dumps(outcome.verification.to_dict()),
            "calibration_sha256": outcome.calibration_sha256,
            "holdout": json.dumps(
                {"source": "split", "seed": config.seed, "fraction": config.holdout_fraction, "indices": outcome.holdout_indices}
                if outcome.holdout_indices is not None
                else {"source": "file", "path": str(holdout)}
            ),
            "source_file": Path(checkpoint).name,
            "source_sha256": ckpt.sha256,
            "versions": json.dumps(_versions()),
            "checkpoint": json.dumps(result.files),
            "loss": config.loss,
            "model_origin": origin,
            "calibration_data": json.dumps(inputs.calibration.record()),
        }
    )
    metadata.setdefault("data_config", json.dumps({}))
    write_checkpoint(ckpt, out, sets, entries, metadata, force=force)
    if on_written is not None:
        on_written(out)
    result.output = str(out)
    result.seconds = time.perf_counter() - start
    return result
