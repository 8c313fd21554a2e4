"""Temporary files and folders beside an output: their names, their locks, and stale ones.

Every output is first written into a hidden temporary folder in the output's own folder,
``.NAME.teleport-XXXXXXXX.tmp`` (``XXXXXXXX``: eight random characters from
:func:`tempfile.mkdtemp`): a folder output is that folder itself, a file output is
``.NAME.teleport-XXXXXXXX.tmp/NAME``. The writing process holds an exclusive ``fcntl.flock`` on
the temporary folder from its creation until it is published or removed. (The lock is on the
folder, not on the file, because safetensors and torch.save replace the file they are given
by a new one, which would drop a lock held on the old one.)
The kernel drops a flock when its holder exits, also by ``kill -9``, so a temporary that can be
locked without blocking (``LOCK_EX | LOCK_NB``) belongs to no live writer: it is stale, and the
next write into the same folder removes it (:func:`remove_stale`). One held by a live writer
is left alone.

The names are checked before any work (:func:`check_name_length`): an output whose temporary
name would exceed the file system's limit on names (``NAME_MAX``, 255 bytes on ext4, xfs,
btrfs, tmpfs) is refused up front instead of after the whole teleport.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from ..errors import OutputError

TAG = ".teleport-"
SUFFIX = ".tmp"
RANDOM_CHARS = 8  # tempfile's random part
STALE = re.compile(r"^\..+\.teleport-[A-Za-z0-9_]{8}\.tmp$")


def folder_of(path: Path) -> Path:
    """The folder a path is created in (``.`` for a bare name)."""
    return path.parent if str(path.parent) else Path(".")


def temp_name_length(name: str) -> int:
    """Bytes of the longest hidden name written beside ``name`` (its temporary name)."""
    return len(os.fsencode(f".{name}{TAG}{'x' * RANDOM_CHARS}{SUFFIX}"))


def name_max(folder: Path) -> int:
    """The file system's limit on the bytes of one name in ``folder`` (255 when unknown)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def check_name_length(path: Path, what: str = "output") -> None:
    """Refuse an output whose temporary name does not fit the file system.

    Raises:
        OutputError: ``.NAME.teleport-XXXXXXXX.tmp`` is longer than ``NAME_MAX`` bytes.
    """
    limit = name_max(folder_of(path)) if folder_of(path).is_dir() else 255
    need = temp_name_length(path.name)
    if need > limit:
        spare = limit - (need - len(os.fsencode(path.name)))
        raise OutputError(
            f"{what} name {_short(path.name)} is too long: its temporary name needs {need} bytes, the file system allows {limit}",
            hint=f"use a name of at most {spare} bytes",
        )


def _short(name: str) -> str:
    return name if len(name) <= 40 else name[:37] + "..."


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _lock_new(fd: int, path: str) -> bool:
    """Lock a just-created temporary; False when a cleaner removed it between creation and lock."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    return _same_file(fd, path)


def locked_temp_folder(out: Path) -> tuple[int, Path]:
    """Create the folder ``.NAME.teleport-*.tmp`` beside ``out`` (mode 0700) and flock it.

    Returns:
        (open descriptor of the folder holding the lock, path). Close the descriptor only
        after the folder is published or removed.
    """
    while True:
        tmp = tempfile.mkdtemp(prefix=f".{out.name}{TAG}", suffix=SUFFIX, dir=folder_of(out))
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        if _lock_new(fd, tmp):
            return fd, Path(tmp)
        os.close(fd)


def remove_stale(folder: Path) -> list[str]:
    """Remove the temporaries in ``folder`` that no live process holds locked.

    Each ``.*.teleport-*.tmp`` entry is opened without following links and locked with
    ``LOCK_EX | LOCK_NB``; only an entry that locks (its writer is gone) and is still the
    entry that was opened is removed, a folder with its contents. Entries of live writers,
    and anything that cannot be opened, are left as they are.

    Returns:
        The names removed.
    """
    removed = []
    try:
        entries = [e for e in os.scandir(folder) if STALE.match(e.name)]
    except OSError:
        return removed
    for entry in entries:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue  # a live writer holds it
                raise
            if not _same_file(fd, entry.path):
                continue
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed
