"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""

from __future__ import annotations

import errno
import os

# Exit codes of every command (docs/bad-input.md): results first, then what went wrong.
EXIT_OK = 0
EXIT_USER_ERROR = 2  # bad input or environment: a one-line error
EXIT_PARITY_FAILED = 3  # verify / quality measured a bundle below its thresholds
EXIT_REGRESSION = 4  # profile: over the budget, or a regression against the baseline
EXIT_INTERNAL = 70  # a bug of ours (EX_SOFTWARE); PLE_EXPORT_DEBUG=1 shows the traceback
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class UserError(Exception):
    """Bad input or environment: the message says what and where, no traceback is shown."""


class Terminated(BaseException):
    """SIGTERM (CI cancel, `docker stop`, systemd): unwinds like Ctrl-C, so staging folders go."""


_ADVICE = {
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
    errno.ENAMETOOLONG: "use a shorter name",
    errno.EISDIR: "expected a file, found a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EROFS: "the file system is read-only; choose another place",
    errno.ENOSPC: "no space left on the device; free some or choose another place",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another place",
    errno.EIO: "the storage reported an I/O error; check the device",
    errno.ENOENT: "no such file or folder",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EMFILE: "too many open files; raise `ulimit -n`",
    errno.EFBIG: "file too large for this file system or limit",
    errno.EXDEV: "output and its staging folder must be on one file system",
}


def os_error(e: OSError, fallback: object = "") -> UserError:
    """An OSError as a one-line UserError naming the path and what to do."""
    where = e.filename if e.filename is not None else fallback
    what = e.strerror or (os.strerror(e.errno) if e.errno else type(e).__name__)
    advice = _ADVICE.get(e.errno or -1)
    return UserError(f"{where}: {what}" + (f" ({advice})" if advice and advice != what.lower() else ""))


OUT_OF_MEMORY = ("bad_alloc", "Failed to allocate memory", "MemoryError", "Cannot allocate memory")
MEMORY_ADVICE = "use a shorter prompt or fewer tokens, fewer threads, or free memory on this machine"


def out_of_memory(message: str) -> bool:
    """Whether a failure message (onnxruntime's, numpy's, a worker's last line) is the host's memory."""
    return any(sign in message for sign in OUT_OF_MEMORY)


def host_memory(doing: str) -> UserError:
    """The host ran out of memory: a resource limit of this machine, not a bug; say what to change."""
    return UserError(f"the host ran out of memory {doing} ({MEMORY_ADVICE})")
