"""``teleport bench``: resume training from the original and from teleported variants, compare."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
from rich.table import Table

from ..bench.settings import (
    OPTIMIZERS,
    PLOT_FILES,
    RESULT_FILE,
    VARIANTS,
    BenchSettings,
)
from ..checkpoints.atomic import resolve_output, writable
from ..config import DEVICES, HVP_MODES, OBJECTIVES, TeleportConfig
from ..errors import OutputError, TeleportError
from .common import (
    EXIT_CODES_HELP,
    fail,
    model_options,
    progress_events,
    stderr_console,
    weight_options,
)

D = TeleportConfig()


def _table(doc: dict) -> Table:
    s = doc["settings"]
    t = Table(title=f"teleport bench: {s['optimizer']} lr {s['lr']:g}, K={s['steps']}, seeds {s['seeds']}", title_justify="left")
    for col in ("variant", "final loss", "held-out", "steps→target / K", "teleport s", "≈ steps", "net ratio", "grad-norm ×"):
        t.add_column(col, justify="left" if col == "variant" else "right")

    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    for name, v in doc["variants"].items():
        t.add_row(
            name,
            f"{v['final_loss_mean']:.4f} ± {v['final_loss_std']:.4f}",
            f"{v['holdout_final_mean']:.4f} ± {v['holdout_final_std']:.4f}",
            f(v.get("steps_to_target_ratio") if name != "original" else v.get("self_steps_to_target_ratio")),
            f(v["teleport_seconds"], "{:.2f}"),
            f(v["teleport_equivalent_steps"], "{:.0f}"),
            f(v.get("net_ratio")),
            f(v.get("grad_norm_ratio"), "{:.2f}"),
        )
    return t


def _out_folder(out_dir, inputs, force: bool) -> Path | None:
    """Create ``--out`` before any training (a bad folder fails in one line, not after the runs).

    Raises:
        OutputError: it is a file, a link loop, an input, holds an input, cannot be created or
            written, or already holds ``bench.json`` or a plot (without ``force``).
    """
    if out_dir is None:
        return None
    out = Path(out_dir)
    resolved = resolve_output(out, "--out")
    for i in (Path(p) for p in inputs if p is not None):
        if resolved == i.resolve():
            raise OutputError(f"--out {out_dir} is an input", hint="choose another folder")
        if i.resolve().is_relative_to(resolved):
            raise OutputError(f"--out {out_dir} holds the input {i}", hint="teleport-cli writes no results beside its inputs; choose another folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out_dir} is a file", hint="pass a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {out_dir} cannot be created ({e.strerror or e})", hint="choose a writable folder") from None
    if not writable(out):
        raise OutputError(f"--out {out_dir} is not writable", hint="choose a writable folder")
    there = [name for name in (RESULT_FILE, *PLOT_FILES) if (out / name).exists() or (out / name).is_symlink()]
    if there and not force:
        raise OutputError(f"--out {out_dir} already holds {', '.join(there)}", hint="pass --force to replace them, or choose another folder")
    return out


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("checkpoint", type=click.Path())
@click.option("--data", "train_path", required=True, type=click.Path(dir_okay=False), help="Training set (.safetensors); the calibration subset is drawn from it.")
@click.option("--holdout", required=True, type=click.Path(dir_okay=False), help="Held-out set (.safetensors).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="sgd", show_default=True, help="sgd, momentum (SGD with 0.9) or adam.")
@click.option("--lr", type=float, default=None, help="Learning rate (default: 0.05 sgd, 0.01 momentum, 1e-3 adam).")
@click.option("--steps", "k", type=int, default=100, show_default=True, help="Resumed training steps K.")
@click.option("--seeds", type=int, default=3, show_default=True, help="Number of seeds (0 .. S-1): batch orders shared by all variants.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Training batch size.")
@click.option("--variants", default=",".join(VARIANTS), show_default=True, help="Comma-separated subset of: " + ", ".join(VARIANTS) + ".")
@click.option("--period", type=int, default=25, show_default=True, help="Steps between teleports of the periodic variant (with --steps <= period it equals nullspace).")
@click.option("--calibration-samples", type=int, default=256, show_default=True, help="Training samples drawn (seeded) as calibration set.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=D.objective, show_default=True, help="Teleport objective.")
@click.option("--tau", type=float, default=D.tau, show_default=True, help="Input energy kept invariant per layer, for the teleported variants; 1 = exact null space.")
@click.option("--teleport-steps", type=int, default=D.steps, show_default=True, help="Accepted steps of each teleport.")
@click.option("--step-size", type=float, default=D.step_size, show_default=True, help="First step length of each teleport.")
@click.option("--step-growth", type=float, default=D.step_growth, show_default=True, help="Step-length factor after a first-try acceptance (1 = fixed).")
@click.option("--device", type=click.Choice(DEVICES), default=D.device, show_default=True, help="auto takes a GPU when present.")
@click.option("--hvp", type=click.Choice(HVP_MODES), default=D.hvp, show_default=True,
              help="Hessian-vector products of the teleport (as in apply; docs/hvp.md).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Folder for bench.json and the PNG curves.")
@click.option("--force", is_flag=True, help="Replace bench.json and the plots in --out (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No table or progress on stderr.")
@weight_options("resume training from")
@model_options
def bench(checkpoint, train_path, holdout, optimizer, lr, k, seeds, batch_size, variants, period, calibration_samples,
          objective, tau, teleport_steps, step_size, step_growth, device, hvp, out_dir, force, as_json, quiet, weights, trust_pickle, model_spec, model_kwargs) -> None:
    """Resume training from CHECKPOINT and from teleported variants; compare losses and wall-clock."""
    from ..bench.resume import run_bench
    from ..data.inputs import checkpoint_data_config
    from ..data.sources import load_data
    from ..models.device import resolve_device
    from ..models.loading import load_model

    try:
        chosen = tuple(v.strip() for v in variants.split(",") if v.strip())
        unknown = [v for v in chosen if v not in VARIANTS]
        if unknown or "original" not in chosen:
            raise click.BadParameter(f"unknown {unknown}" if unknown else "must include 'original'", param_hint="--variants")
        for ok, flag, need in ((k >= 10, "--steps", "at least 10"), (seeds >= 1, "--seeds", "at least 1"),
                               (batch_size >= 1, "--batch-size", "at least 1"), (period >= 1, "--period", "at least 1"),
                               (calibration_samples >= 2, "--calibration-samples", "at least 2"),
                               (teleport_steps >= 1, "--teleport-steps", "at least 1"),
                               (lr is None or (math.isfinite(lr) and lr > 0), "--lr", "a finite number > 0")):
            if not ok:
                raise click.BadParameter(f"must be {need}", param_hint=flag)
        out = _out_folder(out_dir, [checkpoint, train_path, holdout], force)
        config = TeleportConfig(tau=tau, steps=teleport_steps, step_size=step_size, step_growth=step_growth, objective=objective, hvp=hvp,
                                lr=None if optimizer == "adam" else (lr if lr is not None else BenchSettings(optimizer=optimizer).learning_rate), device=device)
        settings = BenchSettings(optimizer, lr, k, batch_size, tuple(range(seeds)), max(1, k // 20), period, calibration_samples, chosen)
        model, ckpt, _, _ = load_model(checkpoint, weights=weights, trust_pickle=trust_pickle, model_spec=model_spec, model_kwargs=model_kwargs)
        model.to(resolve_device(device))
        data_config = checkpoint_data_config(ckpt.metadata, str(checkpoint))  # the data apply reads: tokens, text, images, tensors
        train = load_data(train_path, data_config, model, what="training").data
        hold = load_data(holdout, data_config, model, what="held-out").data
        if ckpt.metadata.get("loss") == "lm":  # a language model's own loss, as apply takes it
            config = config.replace(loss="lm")
        with progress_events(not quiet) as on_event:
            doc = run_bench(model, train, hold, config, settings, on_event)
    except TeleportError as e:
        fail(e, as_json)
    doc["checkpoint"] = str(checkpoint)
    doc["weights"] = weights
    if out is not None:
        from ..bench.plots import plot_curves
        from ..checkpoints.atomic import write_file_atomic

        try:
            doc["plots"] = [str(p) for p in plot_curves(doc, out, title=Path(checkpoint).name, force=force)]
            body = json.dumps(doc, indent=1)
            write_file_atomic(out / RESULT_FILE, lambda tmp: tmp.write_text(body), force=force)
        except TeleportError as e:
            fail(e, as_json)
    if not quiet:
        stderr_console().print(_table(doc))
    if as_json:
        click.echo(json.dumps(doc))
    elif out_dir is not None:
        click.echo(str(Path(out_dir) / "bench.json"))
