"""Ctrl-C (SIGINT) for the ``teleport`` process: exit 130 with ``interrupted`` at any moment.

Python's own handler raises KeyboardInterrupt wherever the main thread is. Inside an import that
can go wrong in ways no ``except`` can mend (see :func:`_on_sigint`), so there it is postponed;
and a KeyboardInterrupt that a library swallowed (torch's C++ turns one raised in a Python
callback into its own error) is still reported as an interruption: :func:`seen`.
Installed only by :func:`teleport_cli.cli.main`, the process entry point, never in-process.
"""

from __future__ import annotations

import os
import signal
import sys

from ..errors import EXIT_INTERRUPTED

SEEN: list[int] = []
INSTALLED: list[bool] = []
RECHECK_S = 0.02  # a SIGINT that arrives inside an import is raised this much later, once outside


def _in_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _on_sigint(signum, frame) -> None:
    """Python's SIGINT behaviour (raise KeyboardInterrupt), except inside an import.

    A KeyboardInterrupt raised while a module is being imported can leave it half-imported
    (numpy without ``multiply``: a later AttributeError), be swallowed by a library, or reach
    torch's C++ through a Python callback and abort the process (``torch._C._c10d_init`` while
    ``torch.distributed`` is imported: exit -6). There it is postponed: ``SIGALRM`` looks again
    every ``RECHECK_S`` seconds and raises it once the import is over.
    """
    SEEN.append(signum)
    if _in_import(frame):
        signal.setitimer(signal.ITIMER_REAL, RECHECK_S)
        return
    raise KeyboardInterrupt


def _on_alarm(signum, frame) -> None:
    if SEEN:
        _on_sigint(signal.SIGINT, frame)


def stop() -> None:
    """No SIGINT, and no postponed one, from here on (the command is over). Under torchrun a
    SIGTERM from here on ends the process quietly: its line is printed, and a PeerFailed raised in
    the interpreter's shutdown (CI: inside an atexit hook of torch.library) printed a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def committed() -> None:
    """The command's output is in place: a Ctrl-C from here on is ignored, and the command ends
    with its own exit code and result (exit 130 would tell a pipeline that nothing was written).
    A no-op where :func:`install` did not run (in-process callers keep their own SIGINT)."""
    if INSTALLED:
        stop()


def exit_interrupted(message: bool = True) -> None:
    """Ignore further SIGINTs, print ``interrupted``, and end the process with 130 at once.

    ``os._exit`` skips the interpreter's shutdown: a signal landing in torch's atexit hooks
    would print a traceback or end the process by SIGINT instead of 130. Everything that
    matters has run by then: the ``finally`` blocks that remove temporary files ran while the
    KeyboardInterrupt unwound the stack.
    """
    stop()
    if message:
        sys.stderr.write("interrupted\n")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_INTERRUPTED)


def _on_unraisable(unraisable) -> None:
    """``sys.unraisablehook``: a KeyboardInterrupt raised where Python cannot propagate it (an
    at-fork hook such as logging's ``_releaseLock`` around the memory probe's fork, a ``__del__``,
    a weakref callback) would be printed as "Exception ignored in ..." with a traceback and then
    lost, and the run would go on; instead it is raised again ``RECHECK_S`` later, outside."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and SEEN:
        signal.setitimer(signal.ITIMER_REAL, RECHECK_S)
        return
    _PREVIOUS_UNRAISABLE[0](unraisable)


_PREVIOUS_UNRAISABLE = [sys.unraisablehook]


def install() -> None:
    """Take over SIGINT (and SIGALRM, for postponed interrupts) for this process."""
    INSTALLED.append(True)
    if sys.unraisablehook is not _on_unraisable:  # a second install must not make the hook its own fallback
        _PREVIOUS_UNRAISABLE[0] = sys.unraisablehook
        sys.unraisablehook = _on_unraisable
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGINT, _on_sigint)


def _on_sigterm(signum, frame) -> None:
    from ..errors import PeerFailed

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise PeerFailed("stopped by torchrun (SIGTERM): another rank failed", hint="that rank's own line says why")


def install_torchrun_stop() -> None:
    """Under torchrun (``WORLD_SIZE`` > 1): the SIGTERM torchrun sends every rank once another
    has failed becomes :class:`~teleport_cli.errors.PeerFailed`, so that this rank too ends in one
    line naming it (exit 7), after the ``finally`` blocks that remove temporary files ran."""
    from ..parallel.group import env_world_size

    if env_world_size() > 1:
        signal.signal(signal.SIGTERM, _on_sigterm)


def seen() -> bool:
    """Whether a SIGINT arrived in this process since :func:`install`."""
    return bool(SEEN)
