"""``python -m teleport_cli``, and the ``teleport`` console script (``teleport_cli.__main__:run``).

Ctrl-C at any moment, also while the command line's own imports load, ends in one stderr line
``interrupted`` and exit code 130, never a traceback.
"""

import os
import signal
import sys

EXIT_INTERRUPTED = 130


def run() -> None:
    """Import the command line and run it (:func:`teleport_cli.cli.main`); a KeyboardInterrupt
    while importing exits 130 too."""
    try:
        from .cli import main

        main()  # handles Ctrl-C itself from its first line on
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    run()
