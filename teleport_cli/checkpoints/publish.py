"""Moving a finished temporary under its final name, never over an output that appeared meanwhile.

The output path is checked before any work (:func:`teleport_cli.checkpoints.atomic.check_output`),
but a run takes seconds to hours, and another process may create the same path meanwhile (two
``teleport apply`` runs to one new ``-o``). Without ``--force`` the last step therefore fails
instead of replacing what is there:

* a file is published with ``link(tmp, out)`` and then ``unlink(tmp)``: ``link`` fails with
  ``EEXIST`` when anything (a file, a folder, a dangling link) is at ``out``. On a file system
  without hard links (``EPERM``, ``EOPNOTSUPP``) the folder rule below is used instead;
* a folder is published with ``renameat2(AT_FDCWD, tmp, AT_FDCWD, out, RENAME_NOREPLACE)``
  (Linux 3.15+, glibc 2.28+, called through :mod:`ctypes`), which fails with ``EEXIST``.
  Where that call is missing (no such symbol in the C library, ``ENOSYS``, or ``EINVAL`` from a
  file system without the flag), an ``O_EXCL`` lock file ``.NAME.teleport-lock`` beside ``out``
  is taken (and flocked, so that one left by a killed run can be taken over), ``out`` is
  checked to be absent under it and ``tmp`` renamed; this excludes other teleport-cli writers,
  not other programs.

In each case the refusal is an :class:`~teleport_cli.errors.OutputError` (exit 6) and what is
at ``out`` is left untouched. With ``--force`` a file is renamed over ``out`` (``os.replace``)
and a folder is swapped in by :func:`replace_folder`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import OutputError
from .temps import folder_of

AT_FDCWD = -100
RENAME_NOREPLACE = 1
NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV)
_RENAMEAT2: list = []  # [function or None], resolved on first use


def appeared(out: Path) -> OutputError:
    """The error for an output that another process created while this run worked."""
    return OutputError(
        f"{out} was created by another process while this run was working; it was left as it is",
        hint="pass --force to replace it, or choose another output path",
    )


def _renameat2():
    if not _RENAMEAT2:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (AttributeError, OSError):
            fn = None
        _RENAMEAT2.append(fn)
    return _RENAMEAT2[0]


def rename_noreplace(src: Path, out: Path) -> None:
    """Rename ``src`` to ``out`` unless something is at ``out`` (see the module docstring).

    Raises:
        OutputError: ``out`` exists (or another teleport-cli run is publishing it).
        OSError: the rename failed for another reason.
    """
    fn = _renameat2()
    if fn is not None:
        if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(out), RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise appeared(out)
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(out))
    rename_with_lock_file(src, out)


def _take_lock(lock: Path, out: Path) -> int:
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd
        except FileExistsError:
            pass
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # released meanwhile: try to create it again
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd  # left by a run that died: taken over
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"{out} is being written by another teleport-cli run",
                              hint="wait for it, or choose another output path") from None


def rename_with_lock_file(src: Path, out: Path) -> None:
    """The fallback of :func:`rename_noreplace` where ``renameat2`` is missing.

    Raises:
        OutputError: ``out`` exists, or another run holds the lock file.
    """
    lock = folder_of(out) / f".{out.name}.teleport-lock"
    fd = _take_lock(lock, out)
    try:
        if os.path.lexists(out):
            raise appeared(out)
        os.rename(src, out)
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)


def publish_file(tmp: Path, out: Path, force: bool) -> None:
    """Give the finished file ``tmp`` the name ``out``: replace it with ``force``, else never.

    Raises:
        OutputError: without ``force``, something is at ``out``.
        OSError: the link, unlink or rename failed.
    """
    if force:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out, follow_symlinks=False)
    except FileExistsError:
        raise appeared(out) from None
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:
            raise
        rename_noreplace(tmp, out)
        return
    os.unlink(tmp)


def publish_folder(tmp: Path, out: Path, force: bool) -> None:
    """Give the finished folder ``tmp`` the name ``out``: swap it in with ``force``, else never replace.

    Raises:
        OutputError: without ``force``, something is at ``out``.
        OSError: a rename failed.
    """
    if force:
        replace_folder(tmp, out)
    else:
        rename_noreplace(tmp, out)
        fsync_folder(folder_of(out))


def fsync_folder(path: Path) -> None:
    """Flush a folder's entries (or a file) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is moved aside first and removed after.

    If renaming ``new`` in fails, the old folder is renamed back before the error propagates.
    """
    parent = folder_of(out)
    if not out.exists() and not out.is_symlink():
        os.rename(new, out)
        fsync_folder(parent)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
    os.rmdir(aside)
    os.rename(out, aside)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(aside, out)
        raise
    fsync_folder(parent)
    if aside.is_symlink():  # -o was a link: the link is replaced, the folder it named is left alone
        os.unlink(aside)
    else:
        shutil.rmtree(aside, ignore_errors=True)
