"""Output paths: the checks made before any work, and atomic file and folder writes.

Guarantees (also in docs/safety.md):

* A file is written beside its target in a hidden temporary folder
  (``.NAME.teleport-XXXXXXXX.tmp/NAME``, flocked while written: :mod:`.temps`), flushed with fsync,
  and only then given its name (:mod:`.publish`): a reader sees the old file or the complete new
  one, never a partial one; on any failure, also Ctrl-C, the temporary file is removed.
* A folder is written completely beside its target (hidden temporary folder, every file
  fsynced) and renamed into place. With ``--force`` over an existing folder the old one is
  first renamed aside (``.NAME.old-*``), the new one renamed in, and only then the old one
  removed; if the second rename fails the old folder is renamed back. Between the two renames
  (microseconds) the target name does not exist; a crash exactly there leaves the complete old
  folder at ``.NAME.old-*`` beside it, never a mixed folder.
* Without ``--force`` nothing is replaced, also not an output that another process created
  after the start-up check (:mod:`.publish`: ``link``/``unlink``, ``renameat2(RENAME_NOREPLACE)``).
* An input is never written over: the output may not be an input, a link to one, another
  path to the same file (hard link, ``..``), a folder holding an input, or a path inside an
  input folder.
* Every failed write is an :class:`~teleport_cli.errors.OutputError` (exit 6): a full disk says
  "no space left on device", also where safetensors or torch report it in their own types.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from ..errors import OutputError
from .publish import fsync_folder, publish_file, publish_folder
from .temps import check_name_length, folder_of, locked_temp_folder, remove_stale

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".tar", ".ckpt")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def check_output(output: str | Path, inputs: list, force: bool, *, is_dir: bool = False, suffixes: tuple[str, ...] = (".safetensors",)) -> Path:
    """Validate an output path before any work is done.

    Args:
        output: the path to write (a file, or a folder when ``is_dir``).
        inputs: every input path (None entries are skipped).
        force: allow replacing an existing output.
        is_dir: the output is a folder (sharded or Hugging Face style checkpoint).
        suffixes: allowed file endings when the output is a file (same container as the input).

    Raises:
        OutputError: the output is or contains an input, exists without ``force``, is of the
            wrong kind (file vs folder) or ending, or its folder is missing or not writable.
    """
    out = Path(output)
    resolved = resolve_output(out, "output")
    for i in (Path(p) for p in inputs if p is not None):
        if _same(out, i) or resolved == i.resolve():
            raise OutputError(f"output {output} is the input {i}", hint="teleport-cli never writes over an input; choose another -o")
        if is_dir and _inside(i, out):
            raise OutputError(f"output folder {output} holds the input {i}", hint="replacing it would delete an input; choose another -o")
        if i.is_dir() and _inside(out, i):
            raise OutputError(f"output {output} is inside the input folder {i}", hint="choose a path outside the input folder")
    if is_dir:
        if out.exists() and not out.is_dir():
            raise OutputError(f"output {output} is a file, but this checkpoint is a folder", hint="choose a folder path for -o")
        if out.name.lower().endswith((".safetensors", *PICKLE_SUFFIXES)):
            raise OutputError(f"output {output} looks like a file name, but this checkpoint is a folder", hint="the output is a folder of the same kind; choose a folder path for -o")
    else:
        if out.is_dir():
            raise OutputError(f"output {output} is a folder, but this checkpoint is a file", hint=f"pass a file path ending in {suffixes[0]}")
        if not str(out).endswith(suffixes):
            raise OutputError(f"output {output} must end in {' or '.join(suffixes)}", hint="the output is written in the same container as the input")
    if (out.exists() or out.is_symlink()) and not force:  # a dangling link is something the user made, too
        what = "is a link to a missing file" if not out.exists() else "already exists"
        raise OutputError(f"output {output} {what}", hint="pass --force to replace it, or choose another -o")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist", hint=f"create it first: mkdir -p {parent}")
    if not writable(parent):
        raise OutputError(f"output folder {parent} is not writable", hint="choose another -o or fix the permissions")
    check_name_length(out)
    return out


def resolve_output(path: Path, what: str) -> Path:
    """``path.resolve()``, with a link loop as an output error instead of a RuntimeError.

    Raises:
        OutputError: the path is (or passes through) a symbolic link loop.
    """
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        raise OutputError(f"{what} {path} is a symbolic link loop", hint="remove the link or choose another path") from None


def writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried, not guessed: os.access says yes to
    root also on read-only file systems)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def fsync_path(path: Path) -> None:
    """Flush a file or folder to disk."""
    fsync_folder(path)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL = 1 << 20  # bytes: a writer's own error type on a file system this full is read as ENOSPC


def _fail(path: Path, e: OSError) -> OutputError:
    if e.errno in NO_SPACE:
        return OutputError(f"could not write {path}: No space left on device",
                           hint="the disk is full, no space left for the output: free some space or write to another disk; nothing was replaced")
    return OutputError(f"could not write {path}: {e.strerror or e}", hint="check free disk space and permissions")


def free_bytes(folder: Path) -> int | None:
    """Bytes this process may still write in ``folder`` (root may use the reserved blocks)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def as_write_error(e: Exception, path: str | Path) -> OSError:
    """A writer's own exception (safetensors' ``SafetensorError``, torch's ``RuntimeError``) as an
    OSError: ``ENOSPC`` when it says so ("os error 28", "No space left") or the file system
    holds less than 1 MiB, else ``EIO`` with its message."""
    text = " ".join(str(e).split())
    free = free_bytes(folder_of(Path(path)))
    if "os error 28" in text or "No space left" in text or (free is not None and free < NEARLY_FULL):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, text or type(e).__name__, str(path))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _default_mode(path: Path, folder: bool) -> None:
    """Give a temporary file or folder (created 0600 / 0700) the mode a plain write would: 0666 or 0777 less the umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _begin(path: str | Path) -> tuple[Path, Path, int, Path]:
    """What every atomic write starts with: check the name, remove stale temporaries beside it,
    create a locked temporary folder. Returns (out, its folder, the lock's fd, the temporary).

    Raises:
        OutputError: the name is too long for its temporary, or the temporary cannot be made.
    """
    out = Path(path)
    parent = folder_of(out)
    check_name_length(out)
    remove_stale(parent)
    try:
        fd, tmp = locked_temp_folder(out)
    except OSError as e:
        raise _fail(out, e) from None
    return out, parent, fd, tmp


def write_file_atomic(path: str | Path, write: Callable[[Path], None], *, force: bool = False) -> None:
    """Call ``write(tmp)`` for a path in a locked temporary folder beside ``path``, fsync, publish.

    Stale temporaries in the folder (their writer is gone) are removed first. Without ``force``
    the file is published only if nothing is at ``path`` by then (:func:`.publish.publish_file`).

    Raises:
        OutputError: the name is too long, something appeared at ``path`` (without ``force``),
            or the write, fsync or rename fails (the temporary file is removed).
    """
    out, parent, fd, box = _begin(path)
    tmp = box / out.name
    try:
        write(tmp)
        _default_mode(tmp, folder=False)
        fsync_path(tmp)
        publish_file(tmp, out, force)
        fsync_folder(parent)
    except OSError as e:
        raise _fail(out, e) from None
    finally:
        try:
            shutil.rmtree(box, ignore_errors=True)
        finally:
            os.close(fd)  # releases the lock after the temporary is gone


@contextlib.contextmanager
def staged_folder(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty locked temporary folder beside ``path``; on success move it into place.

    Everything written into the yielded folder is fsynced, then the folder takes the name
    ``path``: with ``force`` it replaces an existing one (see the module docstring for the
    sequence and its guarantee), without it only if nothing is there. On any failure the
    temporary folder is removed and an existing ``path`` is left as it was.

    Raises:
        OutputError: the name is too long, something appeared at ``path`` (without ``force``),
            or a write or rename fails.
    """
    out, _, fd, tmp = _begin(path)
    try:
        yield tmp
        _default_mode(tmp, folder=True)
        for p in tmp.rglob("*"):
            _default_mode(p, folder=p.is_dir())
            fsync_path(p)
        fsync_path(tmp)
        publish_folder(tmp, out, force)
    except OSError as e:
        raise _fail(out, e) from None
    finally:
        try:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            os.close(fd)
