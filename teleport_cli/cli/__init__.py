"""The ``teleport`` command line. This package is the only importer of click and rich.

One module per command (``apply``, ...); ``common`` holds the console, progress bar and error
rendering they share. stdout carries only the result (one JSON document with ``--json``);
tables, progress and errors go to stderr. User mistakes end in one line and a documented exit
code, never a traceback.
"""

from __future__ import annotations

import sys

import click
from rich.text import Text

from .. import __version__
from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED
from . import interrupts
from .common import EXIT_CODES_HELP, stderr_console


class OneLineErrors(click.Group):
    """A click group whose usage errors end in one stderr line, ``error: <what> (see 'teleport
    CMD --help')``, exit 2, as the project's own errors do (click prints four lines)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C inside a command into Abort
            sys.stderr.write("interrupted\n")
            sys.exit(EXIT_INTERRUPTED)
        except click.exceptions.NoArgsIsHelpError as e:  # bare `teleport`: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            message = " ".join(e.format_message().split())
            stderr_console().print(Text.assemble(("error: ", "bold red"), message + where), soft_wrap=True)
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="teleport")
def cli() -> None:
    """Null-space teleportation of PyTorch checkpoints (arXiv:2502.11362).

    Moves the weights along the loss level set of a calibration set to a point with a larger
    gradient norm, verifies that the loss is unchanged, and writes a new checkpoint.
    """
    from ..parallel.group import env_rank, env_world_size, run_alone

    ctx = click.get_current_context()
    if env_world_size() > 1 and ctx.invoked_subcommand != "apply":  # under torchrun only apply is data parallel:
        if env_rank() > 0:  # rank 0 runs the other commands alone
            ctx.exit(0)
        run_alone()


from .apply import apply  # noqa: E402
from .bench import bench  # noqa: E402
from .inspect import inspect  # noqa: E402
from .report import report  # noqa: E402

cli.add_command(apply)
cli.add_command(inspect)
cli.add_command(report)
cli.add_command(bench)


def main() -> None:
    """Run the command line as a process: Ctrl-C at any moment exits 130 with ``interrupted``;
    unexpected exceptions (bugs) exit 1 with their traceback. Once the command is over, Ctrl-C
    is ignored, so that the interpreter's shutdown prints no traceback. (The console script
    enters through ``teleport_cli.__main__:run``, which also covers a Ctrl-C while this
    module's imports load.)"""
    interrupts.install()
    interrupts.install_torchrun_stop()
    try:
        cli()
    except SystemExit as e:
        interrupts.stop()
        if e.code == EXIT_INTERRUPTED:
            interrupts.exit_interrupted(message=False)  # OneLineErrors printed it
        raise
    except KeyboardInterrupt:
        interrupts.exit_interrupted()
    except Exception:
        if interrupts.seen():  # the failure of a library that swallowed the interrupt
            interrupts.exit_interrupted()
        import traceback

        traceback.print_exc()
        sys.exit(EXIT_INTERNAL)
    finally:
        interrupts.stop()
