"""Output paths: the checks made before any work, and atomic file and folder writes.

Guarantees (also in the README, "Checkpoint formats"):

* A file is written beside its target under a hidden temporary name, flushed with fsync, and
  renamed over the target (``os.replace``, atomic on POSIX): a reader sees the old file or the
  complete new one, never a partial one; on any failure the temporary file is removed.
* A folder is written completely beside its target (hidden temporary folder, every file
  fsynced) and renamed into place. With ``--force`` over an existing folder the old one is
  first renamed aside (``.NAME.old-*``), the new one renamed in, and only then the old one
  removed; if the second rename fails the old folder is renamed back. Between the two renames
  (microseconds) the target name does not exist; a crash exactly there leaves the complete old
  folder at ``.NAME.old-*`` beside it, never a mixed folder.
* An input is never written over: the output may not be an input, a link to one, another
  path to the same file (hard link, ``..``), a folder holding an input, or a path inside an
  input folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from ..errors import OutputError

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
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fail(path: Path, e: OSError) -> OutputError:
    return OutputError(f"could not write {path}: {e.strerror or e}", hint="check free disk space and permissions")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _default_mode(path: Path, folder: bool) -> None:
    """Give a temporary file or folder (created 0600 / 0700) the mode a plain write would: 0666 or 0777 less the umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def write_file_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary path beside ``path``, fsync, rename into place.

    Raises:
        OutputError: the write or the rename fails (the temporary file is removed).
    """
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _default_mode(Path(tmp), folder=False)
        fsync_path(Path(tmp))
        os.replace(tmp, out)
        fsync_path(parent)
    except OSError as e:
        raise _fail(out, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def staged_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success move it into place.

    Everything written into the yielded folder is fsynced, then the folder replaces ``path``
    (see the module docstring for the ``--force`` sequence and its guarantee). On any failure
    the temporary folder is removed and an existing ``path`` is left as it was.

    Raises:
        OutputError: a write or rename fails.
    """
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        _default_mode(tmp, folder=True)
        for p in tmp.rglob("*"):
            _default_mode(p, folder=p.is_dir())
            fsync_path(p)
        fsync_path(tmp)
        replace_folder(tmp, out)
    except OSError as e:
        raise _fail(out, e) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is moved aside first and removed after.

    If renaming ``new`` in fails, the old folder is renamed back before the error propagates.
    """
    parent = out.parent if str(out.parent) else Path(".")
    if not out.exists() and not out.is_symlink():
        os.rename(new, out)
        fsync_path(parent)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
    os.rmdir(aside)
    os.rename(out, aside)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(aside, out)
        raise
    fsync_path(parent)
    if aside.is_symlink():  # -o was a link: the link is replaced, the folder it named is left alone
        os.unlink(aside)
    else:
        shutil.rmtree(aside, ignore_errors=True)
