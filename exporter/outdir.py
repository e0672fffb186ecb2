"""Output folders that are either complete or absent.

Work happens in a hidden sibling temp folder; only a finished result is renamed into place. An
existing non-empty folder is refused unless `overwrite`, and even then replaced only after the new
one is complete. A failure, a full disk or Ctrl-C leaves the old folder (if any) untouched.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from exporter.errors import UserError

Replaceable = Callable[[Path], bool]


def check_output(
    out_dir: Path, overwrite: bool, replaceable: Replaceable | None = None, what: str = ""
) -> None:
    """Refuse an output that exists and is not empty, unless `overwrite`; even then, refuse to
    replace a folder that `replaceable` does not recognise as one of ours (e.g. a bundle)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
        if replaceable is not None and not replaceable(out_dir):
            raise UserError(
                f"{out_dir}: not {what or 'an earlier output'}; refusing to replace it even with "
                "--overwrite (remove it yourself, or choose another folder)"
            )
    parent = out_dir.absolute().parent
    if not parent.is_dir():
        raise UserError(f"{parent}: parent folder of the output does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{parent}: not writable")


@contextmanager
def staged_output(
    out_dir: Path, overwrite: bool, replaceable: Replaceable | None = None, what: str = ""
) -> Iterator[Path]:
    """Yield a temp folder beside `out_dir`; on success it becomes `out_dir`."""
    check_output(out_dir, overwrite, replaceable, what)
    out_dir = out_dir.absolute()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _commit(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise UserError(f"{out_dir.parent}: no space left on device; nothing was written") from None
        raise UserError(f"{e.filename or out_dir}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Everything on disk before the rename makes it visible (a power loss must not leave a
    manifest beside truncated files)."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _commit(tmp: Path, out_dir: Path) -> None:
    """Swap the finished folder in with Ctrl-C held back: the renames and the old folder's removal
    happen all or not at all from the user's point of view (a held SIGINT fires right after)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        _swap(tmp, out_dir)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _swap(tmp: Path, out_dir: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / "previous")
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old / "previous", out_dir)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
