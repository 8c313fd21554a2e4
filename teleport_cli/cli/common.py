"""What the commands share: the stderr console, the progress bar, one-line errors, exit codes."""

from __future__ import annotations

import json
import sys
import threading
import time
from contextlib import contextmanager

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
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
  7  another rank of a torchrun job failed or timed out (its own line says why)
130  interrupted (Ctrl-C; nothing written)
"""


def stderr_console() -> Console:
    """A rich console on stderr (120 columns when stderr is not a terminal)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = 120  # rich assumes 80 columns when stderr is a file or pipe
    return console


PLAIN_INTERVAL = 10.0  # seconds between two plain progress lines of the ascent


def _ascent_counts(info: dict) -> str:
    return (f"{info.get('accepted', 0)} accepted, {info.get('rejected', 0)} rejected, "
            f"grad-norm {info.get('grad_norm_ratio', 1.0):.3g}x, {info.get('seconds', 0.0):.0f} s")


class PlainProgress:
    """Progress as plain stderr lines (stderr not a terminal: CI logs, nohup): one line when a
    phase starts and one when its last part is done (with its seconds), and during the ascent one
    every ``PLAIN_INTERVAL`` seconds and one at its end.

    ``[teleport] ascent: step 12/30, 9 accepted, 3 rejected, grad-norm 1.23x, 41 s``
    """

    def __init__(self, stream=None, clock=time.monotonic) -> None:
        self.stream, self.clock = stream or sys.stderr, clock
        self.stage: str | None = None
        self.last = self.t0 = 0.0
        self.ascent: tuple[int, dict] | None = None  # (total, info) of the last ascent event
        self.finished: set[str] = set()  # the phases whose last part has been reported
        self.lock = threading.Lock()

    def beat(self) -> None:
        """The 10 s line also while one ascent step takes longer than that (called by a timer)."""
        with self.lock:
            if self.stage == "ascent" and self.ascent is not None and self.clock() - self.last >= PLAIN_INTERVAL:
                total, info = self.ascent
                self.last = self.clock()
                info = {**info, "seconds": self.last - self.t0}
                self._line(f"ascent: step {info.get('accepted', 0) + info.get('rejected', 0)}/{total}, {_ascent_counts(info)}")

    def _line(self, text: str) -> None:
        self.stream.write(f"[teleport] {text}\n")
        self.stream.flush()

    def __call__(self, stage: str, done: int, total: int, info: dict | None = None) -> None:
        with self.lock:
            self._event(stage, done, total, info or {})

    def _event(self, stage: str, done: int, total: int, info: dict) -> None:
        if stage == "ascent":
            self.ascent = (total, info)
        if stage != self.stage:
            self.stage, self.last = stage, self.clock()
            self.t0 = self.last
            self._line(f"{stage}: {done}/{total}" if stage not in ("ascent", "batch-size") else
                       f"ascent: up to {total} accepted steps" if stage == "ascent" else "batch-size: measuring --batch-size auto")
        if stage not in ("ascent", "batch-size") and 0 < total <= done and stage not in self.finished:
            self.finished.add(stage)
            self._line(f"{stage}: {done}/{total} done, {self.clock() - self.t0:.1f} s")
        if stage == "batch-size" and "batch_size" in info:
            self._line(f"batch-size: auto chose {info['batch_size']}")
        elif stage == "ascent" and "stop_reason" in info:
            self._line(f"ascent: done ({info['stop_reason']}), {_ascent_counts(info)}")
            self.ascent = None
        elif stage == "ascent" and self.clock() - self.last >= PLAIN_INTERVAL:
            self.last = self.clock()
            self._line(f"ascent: step {info.get('accepted', 0) + info.get('rejected', 0)}/{total}, {_ascent_counts(info)}")


def _real_stream(stream) -> bool:
    """Whether ``stream`` is backed by a file descriptor (a file, pipe or terminal)."""
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


@contextmanager
def progress_events(enabled: bool):
    """Progress on stderr; yields an ``on_event(stage, done, total, info=None)`` callback, or None
    when not ``enabled`` (``-q``). With stderr a terminal: one rich bar per phase with an ETA
    (the ascent's with its accepted/rejected counts); on a file or pipe :class:`PlainProgress`
    lines; none on a stream without a file descriptor (click's in-process test runner)."""
    console = stderr_console()
    if not enabled:
        yield None
        return
    if not console.is_terminal:
        if not _real_stream(sys.stderr):  # captured in-process (click's test runner): no log lines
            yield None
            return
        plain, stop = PlainProgress(), threading.Event()

        def heartbeat() -> None:
            while not stop.wait(1.0):
                plain.beat()

        timer = threading.Thread(target=heartbeat, daemon=True)
        timer.start()
        try:
            yield plain
        finally:
            stop.set()
            timer.join()
        return
    columns = [TextColumn("{task.description:<12}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def on_event(stage: str, done: int, total: int, info: dict | None = None) -> None:
            info = info or {}
            text = _ascent_counts(info) if stage == "ascent" else (f"batch {info['batch_size']}" if "batch_size" in info else "")
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, info=text)
            bar.update(tasks[stage], completed=done, total=total, info=text)

        yield on_event


class BatchSize(click.ParamType):
    """``auto`` or a positive integer."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int):
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'auto' nor an integer", param, ctx)


class MemorySize(click.ParamType):
    """A size such as ``4GB`` or ``512MB`` (binary units), as bytes."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        from ..config import parse_bytes
        from ..errors import ConfigError

        try:
            return value if isinstance(value, int) else parse_bytes(value)
        except ConfigError as e:
            self.fail(e.one_line(), param, ctx)


def batch_options(f):
    """``--batch-size auto|N`` and ``--max-memory SIZE``."""
    f = click.option("--max-memory", type=MemorySize(), default=None,
                     help="Memory budget of --batch-size auto, e.g. 4GB or 512MB; default: half of the free RAM (MemAvailable), or of the free GPU memory.")(f)
    return click.option("--batch-size", type=BatchSize(), default="auto", show_default=True,
                        help="Calibration samples per forward pass, or auto: the largest power of two <= 256 whose gradient and HVP fit --max-memory (measured). Changes only the order of float sums, never the result.")(f)


def fail(err: TeleportError, as_json: bool = False) -> None:
    """Print the error's one line on stderr and exit with its code; after a Ctrl-C that a
    library swallowed (the error is its consequence), ``interrupted`` and 130 instead.

    With ``as_json`` (``--json``, where no result document was printed) stdout also gets one JSON
    document ``{"exit_code", "error", "hint"}`` (rank 0 alone under torchrun,
    which replaces every failing exit code by its own 1)."""
    from . import interrupts

    if interrupts.seen():
        interrupts.exit_interrupted()
    from ..parallel.group import env_rank, env_world_size

    where = f"rank {env_rank()}: " if env_world_size() > 1 else ""  # torchrun: each rank's own line says which
    stderr_console().print(Text.assemble((f"{where}error: ", "bold red"), err.one_line()), soft_wrap=True)
    if as_json and (env_world_size() <= 1 or env_rank() == 0):
        hint = " ".join(err.hint.split()) if err.hint else None
        click.echo(json.dumps({"exit_code": err.exit_code, "error": " ".join(err.message.split()), "hint": hint}))
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
