"""Real processes for the safety tests: the ``teleport`` command line in a subprocess, and a
small real tmpfs (full disk, read-only file system) to run it against."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
TELEPORT = [sys.executable, "-m", "teleport_cli"]


def teleport(*args, **kw) -> subprocess.Popen:
    """Start ``python -m teleport_cli ARGS`` (stdout and stderr piped, text)."""
    return subprocess.Popen([*TELEPORT, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT, **kw)


@dataclass
class Finished:
    rc: int
    stdout: str
    stderr: str
    listing: list[str]  # the tmpfs's entries after the command, sorted


MOUNT_FAILED = 97
SCRIPT = r"""
mount -t tmpfs -o "size=$SIZE$OPTS" tmpfs "$DIR" || exit 97
if [ "$FILL" -gt 0 ]; then head -c "$FILL" /dev/zero > "$DIR/filler" 2>/dev/null; fi
if [ -n "$RO" ]; then mount -o remount,ro "$DIR" || { umount "$DIR"; exit 97; }; fi
"$@" > "$LOG.out" 2> "$LOG.err"; rc=$?
ls -A "$DIR" > "$LOG.ls"
umount "$DIR" 2>/dev/null
exit $rc
"""


def on_tmpfs(folder: Path, argv: list, *, size: str = "1M", fill: int = 0, read_only: bool = False) -> Finished:
    """Mount a fresh tmpfs of ``size`` on ``folder`` (``fill`` bytes already taken by a file
    ``filler``; remounted read-only with ``read_only``), run ``argv`` with the mount in place,
    list the tmpfs, unmount.

    As root (CI) the mount is made directly; otherwise in a user and mount namespace
    (``unshare -Urm``). Skips when neither works, but fails when the environment variable CI
    is set: there the real full disk must be tested.
    """
    folder.mkdir(parents=True, exist_ok=True)
    log = folder.parent / f"{folder.name}.log"
    env = {**ENV, "DIR": str(folder), "SIZE": size, "OPTS": "", "FILL": str(fill), "RO": "1" if read_only else "", "LOG": str(log)}
    prefix = [] if os.geteuid() == 0 else ["unshare", "-Urm"]
    if prefix and shutil.which("unshare") is None:
        rc = MOUNT_FAILED
    else:
        rc = subprocess.run([*prefix, "sh", "-c", SCRIPT, "sh", *map(str, argv)], env=env, cwd=ROOT).returncode
    if rc == MOUNT_FAILED:
        if os.environ.get("CI"):
            pytest.fail("CI must test a real full disk: cannot mount a tmpfs (neither as root nor under unshare -Urm)")
        pytest.skip("cannot mount a tmpfs here (not root, and unshare -Urm is not allowed)")
    read = lambda ext: (log.parent / f"{log.name}.{ext}").read_text()  # noqa: E731
    return Finished(rc, read("out"), read("err"), sorted(read("ls").split()))


def one_line(stderr: str) -> str:
    """The single stderr line of a refused run (asserting there is one and no traceback)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]
