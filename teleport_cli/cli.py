"""The ``teleport`` command line: parse, call the library, render. The only importer of click/rich.

stdout carries only the result (one JSON document with ``--json``); tables, progress and errors
go to stderr. User mistakes end in one line and a documented exit code, never a traceback.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .config import DEVICES, LOSSES, TeleportConfig
from .errors import EXIT_INTERNAL, NoStepAccepted, TeleportError, VerificationFailed

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  internal error (a bug; please report it)
  2  usage error (bad flag or value)
  3  bad input (missing/unreadable/malformed checkpoint or data, data that do not fit)
  4  verification failed (loss changed beyond tolerance; nothing written)
  5  no teleport step accepted (nothing written)
  6  output refused (exists without --force, is an input, folder missing or not writable)
"""

D = TeleportConfig()


def _stderr() -> Console:
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = 120  # rich assumes 80 columns when stderr is a file or pipe
    return console


@contextmanager
def _progress(enabled: bool):
    """A rich progress bar on stderr when it is a terminal; yields an on_event callback."""
    console = _stderr()
    if not enabled or not console.is_terminal:
        yield None
        return
    columns = [TextColumn("{task.description:<10}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def on_event(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield on_event


def _fail(err: TeleportError) -> None:
    _stderr().print(f"[bold red]error:[/] {err.one_line()}", highlight=False, soft_wrap=True)
    sys.exit(err.exit_code)


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
    for col, just in [("layer", "left"), ("kind", "left"), ("d_in", "right"), ("rank", "right"), ("null dim", "right"), ("ΔW/W", "right"), ("", "left")]:
        t.add_column(col, justify=just)
    for l in layers:
        note = "" if l["teleported"] else l["reason"]
        t.add_row(l["name"], l["kind"], str(l["d_in"]), str(l["rank"]), str(l["null_dim"]), f"{l['rel_weight_change']:.3g}" if l["rel_weight_change"] is not None else "-", note)
    return t


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="teleport")
def cli() -> None:
    """Null-space teleportation of PyTorch checkpoints (arXiv:2502.11362).

    Moves the weights along the loss level set of a calibration set to a point with a larger
    gradient norm, verifies that the loss is unchanged, and writes a new checkpoint.
    """


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False), help="Calibration set (.safetensors with 'inputs' and 'targets').")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output checkpoint (.safetensors); never an input.")
@click.option("--holdout", type=click.Path(dir_okay=False), default=None, help="Held-out set; default: a seeded 20% of --data.")
@click.option("--tau", type=float, default=D.tau, show_default=True, help="Input energy kept invariant per layer; 1 = exact null space.")
@click.option("--steps", type=int, default=D.steps, show_default=True, help="Maximum accepted ascent steps.")
@click.option("--step-size", type=float, default=D.step_size, show_default=True, help="Step length relative to the norm of the teleported weights.")
@click.option("--max-step", type=float, default=D.max_step, show_default=True, help="Cap on each layer's relative weight change ||W-W0||/||W0||.")
@click.option("--tolerance", type=float, default=D.tolerance, show_default=True, help="Allowed relative calibration-loss drift.")
@click.option("--holdout-tolerance", type=float, default=D.holdout_tolerance, show_default=True, help="Allowed relative held-out-loss drift.")
@click.option("--target-ratio", type=float, default=None, help="Stop once grad-norm after/before reaches this ratio.")
@click.option("--batch-size", type=int, default=D.batch_size, show_default=True, help="Calibration samples per forward pass.")
@click.option("--seed", type=int, default=D.seed, show_default=True, help="Seed for the held-out split.")
@click.option("--device", type=click.Choice(DEVICES), default=D.device, show_default=True, help="auto takes a GPU when present.")
@click.option("--loss", type=click.Choice(LOSSES), default=D.loss, show_default=True, help="Loss that defines the level set.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No table or progress on stderr.")
def apply(checkpoint, data, output, holdout, tau, steps, step_size, max_step, tolerance, holdout_tolerance, target_ratio,
          batch_size, seed, device, loss, force, as_json, quiet) -> None:
    """Teleport CHECKPOINT on the calibration set, verify, and write the result to -o."""
    from .pipeline import apply as run_apply

    try:
        config = TeleportConfig(
            tau=tau, steps=steps, step_size=step_size, max_step=max_step, tolerance=tolerance,
            holdout_tolerance=holdout_tolerance, target_ratio=target_ratio, batch_size=batch_size,
            seed=seed, device=device, loss=loss,
        )
        with _progress(not quiet) as on_event:
            result = run_apply(checkpoint, data, output, config, holdout=holdout, force=force, on_event=on_event)
    except (VerificationFailed, NoStepAccepted) as e:
        if e.result is not None:
            _render(e.result.to_dict(), as_json, quiet)
        _fail(e)
    except TeleportError as e:
        _fail(e)
    _render(result.to_dict(), as_json, quiet)


def _render(doc: dict, as_json: bool, quiet: bool) -> None:
    if not quiet:
        err = _stderr()
        err.print(_layer_table(doc["layers"]))
        err.print(_summary_table(doc))
        err.print(
            f"gradient norm {doc['grad_norm_before']:.4g} → {doc['grad_norm_after']:.4g} "
            f"(×{doc['grad_norm_ratio']:.3g}) in {doc['steps_accepted']} steps ({doc['stop_reason']}), {doc['seconds']:.1f} s",
            highlight=False,
        )
        if doc["output"]:
            err.print(f"wrote {doc['output']}", highlight=False)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    elif doc["output"]:
        click.echo(doc["output"])


def main() -> None:
    """Console-script entry point: map unexpected exceptions to exit code 1 with a short note."""
    try:
        cli(standalone_mode=True)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        _stderr().print("interrupted")
        sys.exit(130)
    except Exception:  # a bug, not a user mistake: keep the traceback
        import traceback

        traceback.print_exc()
        sys.exit(EXIT_INTERNAL)
