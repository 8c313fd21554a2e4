"""``teleport apply``: teleport a checkpoint, verify, write."""

from __future__ import annotations

import json

import click
from rich.table import Table

from ..checkpoints.options import FileOptions
from ..config import (
    DEVICES,
    EIGH_DTYPES,
    GUARD_TANGENTS,
    HVP_MODES,
    LOSSES,
    METHODS,
    OBJECTIVES,
    SEED_RANGE,
    TeleportConfig,
)
from ..errors import NoStepAccepted, TeleportError, VerificationFailed
from . import interrupts
from .common import (
    EXIT_CODES_HELP,
    batch_options,
    fail,
    model_options,
    progress_events,
    stderr_console,
    weight_options,
)

D = TeleportConfig()


def _summary_table(doc: dict) -> Table:
    t = Table(title="teleport apply", title_justify="left")
    t.add_column("")
    t.add_column("loss before", justify="right")
    t.add_column("loss after", justify="right")
    t.add_column("drift", justify="right")
    t.add_column("max |Δlogit|", justify="right")
    t.add_column("accuracy", justify="right")
    t.add_column("gate", justify="center")
    for key in ("calibration", "holdout"):
        c = doc[key]
        t.add_row(
            f"{key} ({c['samples']})",
            f"{c['loss_before']:.6f}",
            f"{c['loss_after']:.6f}",
            f"{c['relative_loss_drift']:.2e} ≤ {c['tolerance']:g}",
            f"{c['max_abs_logit_diff']:.3g}",
            f"{c['accuracy_before']:.3f} → {c['accuracy_after']:.3f}",
            "[green]pass[/]" if c["passed"] else "[red]FAIL[/]",
        )
    return t


def _layer_table(layers: list[dict]) -> Table:
    t = Table(title="layers", title_justify="left")
    for col, just in [("layer", "left"), ("kind", "left"), ("d_in", "right"), ("rank", "right"), ("null dim", "right"), ("ΔW/W", "right"), ("not moved because", "left")]:
        t.add_column(col, justify=just)
    previous = None
    for l in layers:
        note = "" if l["teleported"] else l["reason"]
        if l["teleported"] and l["rel_weight_change"] == 0.0:  # design notes, Sec. 3
            note = "did not move: its null directions are exactly null on the calibration set, and no objective there changes along them"
        note, previous = ("same as above" if note and note == previous else note), note  # a run of BatchNorms: one explanation
        t.add_row(l["name"], l["kind"], str(l["d_in"]), str(l["rank"]), str(l["null_dim"]), f"{l['rel_weight_change']:.3g}" if l["rel_weight_change"] is not None else "-", note)
    return t


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("checkpoint", type=click.Path())
@click.option("--data", "data", required=True, type=click.Path(), help="Calibration set: tensor file, token file, text file or image folder (see README).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output checkpoint, same container as the input (file or folder); never an input.")
@click.option("--holdout", type=click.Path(), default=None, help="Held-out set (same kinds as --data); default: a seeded 20% of --data.")
@click.option("--tau", type=float, default=D.tau, show_default=True, help="Input energy kept invariant per layer; 1 = exact null space.")
@click.option("--steps", type=int, default=D.steps, show_default=True, help="Maximum accepted ascent steps.")
@click.option("--step-size", type=float, default=D.step_size, show_default=True, help="Step length relative to the norm of the teleported weights.")
@click.option("--step-growth", type=float, default=D.step_growth, show_default=True, help="Factor on the step length after a step accepted at its first try (1 = fixed).")
@click.option("--max-step", type=float, default=D.max_step, show_default=True, help="Cap on each layer's relative weight change ||W-W0||/||W0||.")
@click.option("--tolerance", type=float, default=D.tolerance, show_default=True, help="Allowed relative calibration-loss drift.")
@click.option("--holdout-tolerance", type=float, default=D.holdout_tolerance, show_default=True, help="Allowed relative held-out-loss drift.")
@click.option("--target-ratio", type=float, default=None, help="Stop once grad-norm after/before reaches this ratio.")
@click.option("--method", type=click.Choice(METHODS), default=D.method, show_default=True,
              help="nullspace: this tool; baselines with the gradient-norm objective: levelset (Mishkin et al. 2024, all parameters, any model), symmetry (Zhao et al. 2022, GL(k) action between layers of the built-in MLP).")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=D.objective, show_default=True,
              help="lookahead: lower the loss after --lookahead-steps virtual SGD steps at --lr; grad-norm: raise 1/2||g||^2 (the paper's); trace: lower Hutchinson's tr(H).")
@click.option("--lr", type=float, default=None, help="SGD learning rate training resumes with: the look-ahead's virtual step (default 1/top Hessian eigenvalue) and the stability check.")
@click.option("--momentum", type=float, default=0.0, show_default=True, help="Heavy-ball momentum training resumes with (stability edge 2(1+momentum)/lr).")
@click.option("--lookahead-steps", type=int, default=D.lookahead_steps, show_default=True, help="Virtual SGD steps of the lookahead objective.")
@click.option("--probes", type=int, default=D.probes, show_default=True, help="Rademacher probes of the trace objective.")
@click.option("--hvp", type=click.Choice(HVP_MODES), default=D.hvp, show_default=True,
              help="Hessian-vector products of grad-norm/lookahead: forward or central finite differences of gradients, exact double backward, "
                   "or auto (forward where eps and eps/4 agree to 1e-2 on the first step, else exact; docs/hvp.md).")
@click.option("--eigh", type=click.Choice(EIGH_DTYPES), default=D.eigh, show_default=True,
              help="dtype of the Gram eigendecompositions at --tau < 1: float32 is faster on large Grams but follows float-order noise more (docs/cost.md).")
@click.option("--guard-fraction", type=float, default=D.guard_fraction, show_default=True,
              help="Share of the calibration set kept out of the Grams as a guard against drift on unseen samples, at every --tau (0: off; see docs/guard.md).")
@click.option("--guard-z", type=float, default=D.guard_z, show_default=True,
              help="One-sided z of the guard's confidence bound on the held-out drift: a step is rejected unless |mean d| + z s/sqrt(n) meets --holdout-tolerance (docs/guard.md).")
@click.option("--guard-tangent", type=click.Choice(GUARD_TANGENTS), default=D.guard_tangent, show_default=True,
              help="Also keep steps tangent to the guard's mean loss (mean), and to the variance of its per-sample changes (bound); one guard gradient pass per step (docs/guard.md).")
@click.option("--layers", "layer_globs", multiple=True, metavar="GLOB",
              help="Move only the layers whose name (as `teleport inspect` lists it) matches this fnmatch glob; repeatable (default: all).")
@click.option("--exclude", "exclude_globs", multiple=True, metavar="GLOB", help="Never move the layers matching this glob; repeatable; wins over --layers.")
@click.option("--tangent/--no-tangent", default=D.tangent, show_default=True, help="Keep steps tangent to the level set (remove the loss-gradient component).")
@batch_options
@click.option("--max-seconds", type=float, default=None,
              help="Stop the ascent at its last accepted step once this many wall-clock seconds have passed since apply started (loading, capture, bases and the look-ahead learning rate count; verification and writing come after); checked between batches; stop reason max_seconds.")
@click.option("--seed", type=click.IntRange(*SEED_RANGE), default=D.seed, show_default=True, help="Seed for the held-out split.")
@click.option("--device", type=click.Choice(DEVICES), default=D.device, show_default=True, help="auto takes a GPU when present.")
@click.option("--loss", type=click.Choice(LOSSES), default=None, help="Loss that defines the level set; default: the checkpoint's 'loss' metadata, else ce.")
@model_options
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Use a seeded (--seed) random choice of this many calibration samples.")
@click.option("--force", is_flag=True, help="Replace an existing output file or folder, and the --report page (atomically).")
@weight_options("teleport")
@click.option("--keep-ema", is_flag=True, help="Leave EMA weights untouched (default: re-seed them with the teleported weights).")
@click.option("--keep-optimizer-state", is_flag=True, help="Keep the optimizer state (default: drop it, it describes the old weights).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No table or progress on stderr.")
@click.option("--report", "report_out", type=click.Path(dir_okay=False), default=None, help="Also write the HTML page of `teleport report` for this teleport.")
def apply(checkpoint, data, output, holdout, tau, steps, step_size, step_growth, max_step, tolerance, holdout_tolerance, target_ratio,
          method, objective, lr, momentum, lookahead_steps, probes, hvp, eigh, guard_fraction, guard_z, guard_tangent, layer_globs, exclude_globs, tangent, batch_size, max_memory, max_seconds, seed, device, loss, model_spec, model_kwargs, samples, force, weights, keep_ema,
          keep_optimizer_state, trust_pickle, as_json, quiet, report_out) -> None:
    """Teleport CHECKPOINT on the calibration set, verify, and write the result to -o."""
    from ..parallel.group import env_rank, env_world_size
    from ..pipeline import apply as run_apply

    worker = env_world_size() > 1 and env_rank() > 0  # torchrun: rank 0 alone prints (and writes)
    quiet = quiet or worker
    try:
        config = TeleportConfig(
            tau=tau, steps=steps, step_size=step_size, step_growth=step_growth, max_step=max_step, tolerance=tolerance,
            holdout_tolerance=holdout_tolerance, target_ratio=target_ratio, method=method, objective=objective, lr=lr, momentum=momentum, lookahead_steps=lookahead_steps, probes=probes, hvp=hvp, eigh=eigh,
            guard_fraction=guard_fraction, guard_z=guard_z, guard_tangent=guard_tangent, tangent=tangent, batch_size=batch_size, max_memory=max_memory, max_seconds=max_seconds,
            seed=seed, device=device, loss=loss or D.loss, layers=layer_globs, exclude=exclude_globs,
        )
        files = FileOptions(weights=weights, keep_ema=keep_ema, keep_optimizer_state=keep_optimizer_state, trust_pickle=trust_pickle)
        inputs = [checkpoint, data, holdout, output]
        if report_out is not None:
            from ..audit.html import (
                check_html_path,  # matplotlib: imported only when a page is asked for
            )

            check_html_path(report_out, inputs, flag="--report", force=force)
        with progress_events(not quiet) as on_event:
            result = run_apply(checkpoint, data, output, config, holdout=holdout, force=force, on_event=on_event, files=files,
                               model_spec=model_spec, model_kwargs=model_kwargs, samples=samples, loss_from_checkpoint=loss is None,
                               on_written=lambda out: interrupts.committed())
    except (VerificationFailed, NoStepAccepted) as e:
        if worker:  # rank 0 reports the outcome
            return
        if e.result is not None:
            doc = {**e.result.to_dict(), "exit_code": e.exit_code}
            try:
                doc["report"] = _write_report(report_out, e.result, data, holdout, config, inputs, force)
            except TeleportError as e2:
                fail(e2, as_json)
            _render(doc, as_json, quiet)
        fail(e, as_json and e.result is None)
    except TeleportError as e:
        fail(e, as_json)
    if worker:
        return
    doc = {**result.to_dict(), "exit_code": 0}  # torchrun turns any worker's exit code into its own 1
    try:
        doc["report"] = _write_report(report_out, result, data, holdout, config, inputs, force)
    except TeleportError as e:
        fail(e, as_json)
    _render(doc, as_json, quiet)


def _write_report(path, result, data, holdout, config, inputs, force) -> str | None:
    """The `teleport report` page of this teleport (source vs teleported model), or None without --report."""
    if path is None:
        return None
    from ..audit.html import render, write_html
    from ..audit.report import report_for_apply

    if config.batch_size == "auto":  # the batch size auto chose for this teleport
        config = config.replace(batch_size=result.batch_size)

    return str(write_html(path, render(report_for_apply(result, data, holdout, config)), inputs, force=force, flag="--report"))


def _render(doc: dict, as_json: bool, quiet: bool) -> None:
    if not quiet:
        err = stderr_console()
        err.print(_layer_table(doc["layers"]))
        err.print(_summary_table(doc))
        err.print(
            f"gradient norm {doc['grad_norm_before']:.4g} → {doc['grad_norm_after']:.4g} "
            f"(×{doc['grad_norm_ratio']:.3g}) in {doc['steps_accepted']} steps ({doc['stop_reason']}); "
            f"{doc['seconds']:.1f} s in all, ascent {doc['ascent_seconds']:.2f} s; batch size {doc['batch_size']}"
            + (f" (auto: estimated peak {doc['memory']['estimate'] / 2**30:.2f} of {doc['memory']['budget'] / 2**30:.2f} GiB)" if doc.get("memory") else "")
            + (f"; {doc['guard_samples']} calibration samples guarded" if doc.get("guard_samples") else ""),
            highlight=False,
        )
        _checkpoint_notes(err, doc.get("checkpoint"))
        st = doc.get("stability")
        if st is not None:
            line = (f"top Hessian eigenvalue {st['top_eigenvalue_before']:.4g} → {st['top_eigenvalue_after']:.4g}; "
                    f"SGD edge 2(1+momentum)/lr = {st['edge']:.4g}")
            if st["unstable_after"]:
                err.print(f"[bold yellow]warning:[/] {line}: SGD at lr {st['lr']:g} is expected to diverge from the teleported weights "
                          "(lower --lr, use --objective lookahead or trace, or fewer --steps)", highlight=False)
            else:
                err.print(line + " (stable)", highlight=False)
        if doc["output"]:
            err.print(f"wrote {doc['output']}", highlight=False)
        if doc.get("report"):
            err.print(f"wrote {doc['report']}", highlight=False)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    elif doc["output"]:
        click.echo(doc["output"])


def _checkpoint_notes(err, info: dict | None) -> None:
    """Which weights moved, what became of EMA and optimizer state, the storage-dtype check."""
    if not info:
        return
    err.print(f"{info['container']} checkpoint: teleported {info['weights_moved']}", highlight=False)
    for key in ("ema", "optimizer"):
        if info[key] != "none":
            err.print(f"  {key}: {info[key]}", highlight=False)
    st = info["storage"]
    if st.get("cast"):
        t = Table(title=f"after casting back to {'/'.join(st['dtypes'])} (as written)", title_justify="left")
        for col in ("", "loss after cast", "drift", "max |Δlogit|", "rounding floor: loss", "rounding floor: |Δlogit|", "gate"):
            t.add_column(col, justify="left" if not col else "right")
        for name in ("calibration", "holdout"):
            c = st[name]
            t.add_row(
                name, f"{c['loss_after_cast']:.6f}", f"{c['relative_loss_drift']:.2e}", f"{c['max_abs_logit_diff']:.3g}",
                f"{c['rounding_floor_loss']:.2e}", f"{c['rounding_floor_max_abs_logit_diff']:.3g}",
                "[green]pass[/]" if c["passed"] else "[red]FAIL[/]",
            )
        err.print(t)
