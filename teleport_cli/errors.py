"""The exception family of teleport-cli and the exit codes the CLI maps them to.

Every error that reaches a user says what is wrong and how to fix it in one line.
Only :mod:`teleport_cli.cli` turns these into exit codes; library code raises them.

Exit codes (also in the README and ``teleport --help``):

====  =====================================================================
code  meaning
====  =====================================================================
0     success: the teleported checkpoint was verified and written
1     internal error (a bug: please report it with the traceback)
2     usage error: a bad flag or option value (click's own code)
3     bad input: a missing, truncated or corrupted checkpoint or data file, a
      shard index that disagrees with its shards, a pickle that needs code
      (``--trust-pickle``), NaN or Inf, keys, shapes or data that do not fit
      the model, an unknown architecture, too few calibration samples
4     verification failed: the loss changed beyond the tolerance (also after
      casting back to the stored float16/bfloat16); nothing written
5     no teleport step was accepted: nothing to write; nothing written
6     output refused: the output exists (use --force) or appeared while the
      run worked, is or holds an input, is another container than the input,
      its folder does not exist or is not writable, its name is too long, or
      the write failed (a full disk: "no space left on device")
130   interrupted (Ctrl-C): nothing written, no temporary file left
====  =====================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_VERIFICATION_FAILED = 4
EXIT_NO_STEP = 5
EXIT_OUTPUT = 6
EXIT_PEER = 7
EXIT_INTERRUPTED = 130


class TeleportError(Exception):
    """Base class: a user-facing error with an exit code and a one-line message."""

    exit_code: int = EXIT_INTERNAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The message and the fix, joined into a single line."""
        text = " ".join(self.message.split())
        if self.hint:
            text += " (" + " ".join(self.hint.split()) + ")"
        return text


class InputError(TeleportError):
    """A checkpoint, data file or model specification that cannot be used (exit code 3)."""

    exit_code = EXIT_BAD_INPUT


class VerificationFailed(TeleportError):
    """The teleported model does not keep the loss within tolerance (exit code 4)."""

    exit_code = EXIT_VERIFICATION_FAILED

    def __init__(self, message: str, *, hint: str | None = None, result: object = None) -> None:
        super().__init__(message, hint=hint)
        self.result = result


class NoStepAccepted(TeleportError):
    """Backtracking rejected every step: the weights did not move (exit code 5)."""

    exit_code = EXIT_NO_STEP

    def __init__(self, message: str, *, hint: str | None = None, result: object = None) -> None:
        super().__init__(message, hint=hint)
        self.result = result


class OutputError(TeleportError):
    """The output path cannot or must not be written (exit code 6)."""

    exit_code = EXIT_OUTPUT


class ConfigError(TeleportError):
    """An option value out of its range (exit code 2, like click's usage errors)."""

    exit_code = EXIT_USAGE


class PeerFailed(TeleportError):
    """A collective with the other ranks of a data-parallel job failed or timed out (exit code 7)."""

    exit_code = EXIT_PEER
