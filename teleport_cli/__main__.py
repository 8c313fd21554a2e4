"""``python -m teleport_cli``, and the ``teleport`` console script (``teleport_cli.__main__:run``).

Ctrl-C at any moment, also while the command line's own imports load, ends in one stderr line
``interrupted`` and exit code 130, never a traceback.
"""

import signal
import sys

EXIT_INTERRUPTED = 130


def run() -> None:
    """Import the command line and run it; a KeyboardInterrupt while importing exits 130 too.
    Once it is over, SIGINT is ignored for the interpreter's shutdown."""
    try:
        from .cli import main

        main()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    run()
