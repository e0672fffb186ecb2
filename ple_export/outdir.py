"""Output folders that are either complete or absent, and never replace what is not ours.

Work happens in a hidden sibling staging folder; only a finished result is renamed into place. An
existing non-empty folder is refused unless `overwrite`, and even then replaced only when
`replaceable` recognises it as an earlier output of ours (a bundle whose files are all listed in
its manifest; a synthetic checkpoint) and nothing reachable from the command's inputs (through a
symlink or a hard link) lies inside it. A failure, a full disk, Ctrl-C or SIGTERM leaves the old
folder (if any) untouched and removes the staging folder. A staging folder left by a killed run
(SIGKILL, power loss) records its owner process; the next run to the same place removes it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ple_export.errors import UserError, os_error

Replaceable = Callable[[Path], bool]
log = logging.getLogger("ple_export")

OWNER_FILE = ".ple-export-owner"
_STAGING_KINDS = ("partial", "old")


def check_output(
    out_dir: Path,
    overwrite: bool,
    replaceable: Replaceable | None = None,
    what: str = "",
    inputs: Iterable[Path] = (),
) -> None:
    """Refuse an output that exists and is not empty, unless `overwrite`; even then, refuse to
    replace a folder `replaceable` does not recognise as ours, or one that holds (or is) any file
    reachable from `inputs`."""
    try:
        if out_dir.is_symlink():
            raise UserError(f"{out_dir}: is a symlink; give the real folder as the output")
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"{out_dir}: exists and is not a directory")
        if out_dir.is_dir() and any(out_dir.iterdir()):
            if not overwrite:
                raise UserError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
            if replaceable is None or not replaceable(out_dir):
                raise UserError(
                    f"{out_dir}: not {what or 'an earlier output'}; refusing to replace it even with "
                    "--overwrite (remove it yourself, or choose another folder)"
                )
            held = _inputs_inside(out_dir, inputs)
            if held:
                raise UserError(f"{out_dir}: holds {held}, which the input needs; refusing to replace it")
    except OSError as e:
        raise os_error(e, out_dir) from None
    parent = _existing_ancestor(out_dir.absolute().parent)
    if not parent.is_dir():
        raise UserError(f"{parent}: in the output's path, and not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{parent}: not writable (choose an output folder you can write to)")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _inputs_inside(out_dir: Path, inputs: Iterable[Path]) -> str | None:
    """The first input file that lives inside `out_dir`: by resolved path (symlinks followed) or by
    identity (a hard link to a file in the folder)."""
    out_real = out_dir.resolve()
    inside = {(st.st_dev, st.st_ino) for st in _stats_below(out_dir)}
    for root in inputs:
        root = Path(root)
        candidates = [root]
        if root.is_dir():
            candidates += list(root.iterdir())
        for path in candidates:
            real = path.resolve()
            if real == out_real or real.is_relative_to(out_real):
                return str(path)
            try:
                st = path.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in inside:
                return str(path)
    return None


def _stats_below(folder: Path) -> Iterator[os.stat_result]:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                yield os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue


@contextmanager
def staged_output(
    out_dir: Path,
    overwrite: bool,
    replaceable: Replaceable | None = None,
    what: str = "",
    inputs: Iterable[Path] = (),
) -> Iterator[Path]:
    """Yield a staging folder beside `out_dir` (missing parents are created, as `mkdir -p`); on
    success it becomes `out_dir`."""
    inputs = list(inputs)
    check_output(out_dir, overwrite, replaceable, what, inputs)
    out_dir = out_dir.absolute()
    created = _make_parents(out_dir.parent)
    remove_stale(out_dir)
    tmp = _new_staging(out_dir, "partial")
    try:
        yield tmp
        (tmp / OWNER_FILE).unlink()
        _fsync_tree(tmp)
        # check again: the folder may have changed while we worked
        check_output(out_dir, overwrite, replaceable, what, inputs)
        _commit(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if e.errno == errno.ENOSPC:
            raise UserError(f"{out_dir.parent}: no space left on device; nothing was written") from None
        raise os_error(e, out_dir) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _make_parents(parent: Path) -> list[Path]:
    missing = []
    p = parent
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, parent) from None
    return missing  # deepest first


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _new_staging(out_dir: Path, kind: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{kind}-", dir=out_dir.parent))
    (folder / OWNER_FILE).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    return folder


def _start_time(pid: int) -> str:
    """The process' start time in clock ticks since boot (tells a live owner from a reused pid)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        return stat_line.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _owner_alive(folder: Path) -> bool:
    try:
        pid_text, start = (folder / OWNER_FILE).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False  # no owner file: finished staging being swapped in, or not ours to keep alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _start_time(pid) == start


def remove_stale(out_dir: Path) -> list[Path]:
    """Remove staging folders for `out_dir` whose owner process is gone (killed with SIGKILL, or a
    power loss). An interrupted swap's `.old-` folder is put back if `out_dir` is missing."""
    removed = []
    for kind in _STAGING_KINDS:
        for folder in sorted(out_dir.parent.glob(f".{out_dir.name}.{kind}-*")):
            if not folder.is_dir() or folder.is_symlink() or not (folder / OWNER_FILE).is_file():
                continue  # not one of ours
            if _owner_alive(folder):
                log.warning("%s: another ple-export run is writing here (left alone)", folder)
                continue
            previous = folder / "previous"
            if kind == "old" and previous.is_dir() and not out_dir.exists():
                os.rename(previous, out_dir)
                log.warning("%s: restored from an interrupted replace", out_dir)
            shutil.rmtree(folder, ignore_errors=True)
            log.warning("%s: removed a stale staging folder left by a killed run", folder)
            removed.append(folder)
    return removed


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
    """Swap the finished folder in with Ctrl-C and SIGTERM held back: the renames and the old
    folder's removal happen all or not at all from the user's point of view (a held signal fires
    right after)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
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
        old = _new_staging(out_dir, "old")
        os.rename(out_dir, old / "previous")
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old / "previous", out_dir)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
