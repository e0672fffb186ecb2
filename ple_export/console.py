"""What every command shares: the consoles, one-line errors and exit codes, progress bars, the JSON
switch, and reading sizes and fractions typed on the command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ple_export.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USER_ERROR,
    Terminated,
    UserError,
    host_memory,
    os_error,
    out_of_memory,
)

err = Console(stderr=True)
out = Console()
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


def one_line(text: object) -> str:
    """Control characters spelled out (a path with a newline still prints on one line)."""
    return str(text).translate(_CONTROL)


def literal(text: object) -> str:
    """User-controlled text (paths, tensor names, manifest fields) for console markup: one line,
    shown as is (rich markup escaped, control characters spelled out)."""
    return escape(one_line(text))


class _Said:
    error = False  # an error line was printed (a later exit code must not print another)


said = _Said()


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    err.print(f"[bold red]error:[/] {literal(message)}", highlight=False, soft_wrap=True)
    said.error = True
    raise typer.Exit(code)


class NoteHandler(logging.Handler):
    """The library's notices (`ple_export` logger), e.g. a stale staging folder removed."""

    def emit(self, record: logging.LogRecord) -> None:
        err.print(f"[yellow]note:[/] {literal(record.getMessage())}", highlight=False, soft_wrap=True)


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except UserError as e:
        fail(str(e))
    except OSError as e:
        fail(str(os_error(e)))
    except KeyboardInterrupt:
        fail("interrupted; no partial output was left behind", EXIT_INTERRUPTED)
    except Terminated:
        fail("terminated; no partial output was left behind", EXIT_TERMINATED)
    except (typer.Exit, typer.Abort):
        raise
    except MemoryError:
        fail(str(host_memory("(MemoryError)")))
    except Exception as e:
        if out_of_memory(str(e)):  # onnxruntime's std::bad_alloc arrives as its own exception type
            fail(str(host_memory(f"({type(e).__name__})")))
        if os.environ.get("PLE_EXPORT_DEBUG"):
            raise
        first = (str(e).splitlines() or [""])[0]
        fail(
            f"internal error ({type(e).__name__}: {first}); this is a bug in ple-export, "
            "rerun with PLE_EXPORT_DEBUG=1 for the traceback",
            EXIT_INTERNAL,
        )


@contextmanager
def progress_bars(enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar per stage on stderr (bytes, or steps for "tracing"); silent when disabled or
    not a terminal."""
    if not enabled or not err.is_terminal:
        yield lambda stage, n, total: None
        return
    bars = Progress(
        TextColumn("{task.description:>12}"),
        BarColumn(),
        TextColumn("{task.fields[amount]:>22}"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    tasks: dict[str, Any] = {}
    runs = ("warm", "cold", "enforced", "head", "base")  # counted in runs, not bytes
    steps = {"tracing": "graphs", "verify": "prompts", "quality": "windows"} | dict.fromkeys(runs, "runs")

    def update(stage: str, n: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total, amount="")
        bars.advance(tasks[stage], n)
        done = bars.tasks[tasks[stage]].completed
        unit = steps.get(stage, "runs" if stage.startswith("warm@") else None)  # warm@N: a context sweep
        amount = f"{done:.0f}/{total} {unit}" if unit else f"{human(done)}/{human(total)}"
        bars.update(tasks[stage], amount=amount)

    with bars:
        yield update


def emit(payload: dict[str, Any], as_json: bool, show: Callable[[], None]) -> None:
    """The JSON of a result on stdout, or its human rendering."""
    if as_json:
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        show()


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)
