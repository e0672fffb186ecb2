"""The `ple-export` console entry: signals first, then the CLI.

Only the standard library is imported before the handlers are in place. Ctrl-C (SIGINT) and SIGTERM
(CI cancel, `docker stop`, systemd) unwind as exceptions (KeyboardInterrupt, `Terminated`), so a
staging folder is removed and the CLI prints one line (exit 130 / 143). A signal that arrives while
a module is being imported is held until the outermost import returns: raised inside an import,
numpy and torch turn it into a printed traceback and an ImportError.
"""

from __future__ import annotations

import builtins
import os
import signal
import sys

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

_real_import = builtins.__import__
_importing = 0
_pending: int | None = None


def _raise_for(signum: int) -> None:
    if signum == signal.SIGTERM:
        from ple_export.errors import Terminated

        raise Terminated
    raise KeyboardInterrupt


def _on_signal(signum: int, frame: object) -> None:
    global _pending
    if _importing:
        _pending = signum
        return
    _raise_for(signum)


def _import(*args: object, **kwargs: object) -> object:
    global _importing, _pending
    _importing += 1
    try:
        return _real_import(*args, **kwargs)  # type: ignore[arg-type]
    finally:
        _importing -= 1
        if _importing == 0 and _pending is not None:
            signum, _pending = _pending, None
            _raise_for(signum)


def main() -> None:
    builtins.__import__ = _import  # type: ignore[assignment]
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        from ple_export.cli import main as cli_main
    except KeyboardInterrupt:
        _exit(EXIT_INTERRUPTED, "interrupted")
    except BaseException as e:
        if type(e).__name__ != "Terminated":
            raise
        _exit(EXIT_TERMINATED, "terminated")
    try:
        cli_main()
    except SystemExit as e:
        # After a handled Ctrl-C, CPython may re-raise SIGINT at exit (exit -2 instead of 130).
        if e.code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
            _exit(e.code)
        raise
    except KeyboardInterrupt:  # one that landed where no handler of the CLI's was active
        _exit(EXIT_INTERRUPTED, "interrupted")
    except BaseException as e:
        if type(e).__name__ != "Terminated":
            raise
        _exit(EXIT_TERMINATED, "terminated")


def _exit(code: int, message: str | None = None) -> None:
    if message:
        sys.stderr.write(f"error: {message}; no partial output was left behind\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
