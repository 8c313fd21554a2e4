"""What the commands share: the stderr console, the progress bar, one-line errors, exit codes."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from ..errors import TeleportError

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  internal error (a bug; please report it)
  2  usage error (bad flag or value, malformed --model-kwargs JSON, --device cuda without a GPU)
  3  bad input (missing/truncated/corrupted checkpoint or data, shard index and shards disagree,
     pickle needing code (see --trust-pickle), NaN/Inf, keys/shapes/data that do not fit,
     targets outside [0, classes), unknown architecture, too few calibration samples)
  4  verification failed (loss changed beyond tolerance, also after casting back to
     float16/bfloat16; nothing written)
  5  no teleport step accepted (nothing written)
  6  output refused (exists without --force or appeared meanwhile, is or holds an input,
     another container, folder missing or not writable, name too long, write failed,
     no space left on device)
130  interrupted (Ctrl-C; nothing written)
"""


def stderr_console() -> Console:
    """A rich console on stderr (120 columns when stderr is not a terminal)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = 120  # rich assumes 80 columns when stderr is a file or pipe
    return console


@contextmanager
def progress_events(enabled: bool):
    """A rich progress bar on stderr when it is a terminal; yields an ``on_event`` callback or None."""
    console = stderr_console()
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


def fail(err: TeleportError) -> None:
    """Print the error's one line on stderr and exit with its code; after a Ctrl-C that a
    library swallowed (the error is its consequence), ``interrupted`` and 130 instead."""
    from . import interrupts

    if interrupts.seen():
        interrupts.exit_interrupted()
    stderr_console().print(Text.assemble(("error: ", "bold red"), err.one_line()), soft_wrap=True)
    sys.exit(err.exit_code)


def model_options(f):
    """``--model`` and ``--model-kwargs``: the architecture when the checkpoint does not name it."""
    f = click.option("--model-kwargs", default=None, help="JSON object of keyword arguments for the architecture; replaces the metadata's.")(f)
    return click.option("--model", "model_spec", default=None,
                        help="Architecture: a timm or built-in name, or package.module:factory (imports it); default: the checkpoint's metadata.")(f)


def weight_options(verb: str):
    """``--weights`` and ``--trust-pickle``: which weight set of a checkpoint a command reads."""
    from ..checkpoints.options import WEIGHT_CHOICES

    def decorate(f):
        f = click.option("--trust-pickle", is_flag=True, help="Unpickle a torch.save file that needs code beyond plain tensors (runs code from the file).")(f)
        return click.option("--weights", type=click.Choice(WEIGHT_CHOICES), default="state_dict", show_default=True,
                            help=f"Which weights of a training checkpoint to {verb}.")(f)

    return decorate
