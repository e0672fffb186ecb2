"""Typed command-line values: each non-flag option of the CLI is one of these. A value parses and
checks itself while the command line is read, before the command's body runs, so a value out of its
domain is a one-line usage error (exit 2) and no work starts. Each also names its `edges` (values at
and just past its domain) for the property test that walks every option (tests/test_options.py).

Sizes follow the Hub's convention: KB, MB, GB are powers of 10 (2GB = 2*10^9 bytes, as
`max_shard_size` means it); KiB, MiB, GiB are powers of 2; a bare number is bytes."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from ple_export.errors import os_error


class Param:
    """A parser typer calls with the typed text (`typer.Option(parser=...)`)."""

    metavar = "TEXT"

    def __call__(self, text: str) -> Any:
        try:
            return self.parse(text)
        except OSError as e:  # e.g. a name too long to stat: one line, like every other bad value
            raise typer.BadParameter(str(os_error(e))) from None

    def parse(self, text: str) -> Any:
        raise NotImplementedError

    def domain(self) -> str:
        """The domain, for --help."""
        return ""

    def edges(self) -> tuple[list[str], list[str]]:
        """(accepted, refused): typed values at the edges of the domain and just past them."""
        return [], []


def _bad(text: str, what: str) -> typer.BadParameter:
    return typer.BadParameter(f"{what}, got {text!r}")


@dataclass(frozen=True)
class Int(Param):
    lo: int
    hi: int
    metavar = "INT"

    def parse(self, text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise _bad(text, f"must be a whole number from {self.lo} to {self.hi}") from None
        if not self.lo <= value <= self.hi:
            raise _bad(text, f"must be from {self.lo} to {self.hi}")
        return value

    def domain(self) -> str:
        return f"{self.lo}..{self.hi}"

    def edges(self) -> tuple[list[str], list[str]]:
        return [str(self.lo), str(self.hi)], [str(self.lo - 1), str(self.hi + 1), "1.5", "x", ""]


@dataclass(frozen=True)
class Ints(Param):
    """One whole number or a comma-separated sweep of them (`128,1024,4096`), each in [lo, hi]:
    returned sorted, without repeats."""

    lo: int
    hi: int
    most: int = 16
    metavar = "N[,N...]"

    def parse(self, text: str) -> tuple[int, ...]:
        parts = str(text).replace(" ", "").split(",")
        try:
            values = sorted({int(t) for t in parts})
        except ValueError:
            raise _bad(text, f"must be whole numbers from {self.lo} to {self.hi}, e.g. 128,1024") from None
        if not self.lo <= values[0] or values[-1] > self.hi:
            raise _bad(text, f"each must be from {self.lo} to {self.hi}")
        if len(values) > self.most:
            raise _bad(text, f"at most {self.most} values")
        return tuple(values)

    def domain(self) -> str:
        return f"{self.lo}..{self.hi}, comma-separated"

    def edges(self) -> tuple[list[str], list[str]]:
        inside = [str(self.lo), str(self.hi), f"{self.lo},{self.hi}"]
        return inside, [str(self.lo - 1), str(self.hi + 1), f"{self.lo},{self.hi + 1}", "1,x", "", ","]


@dataclass(frozen=True)
class Float(Param):
    """A finite number in [lo, hi] (or (lo, hi] with `lo_open`)."""

    lo: float
    hi: float
    lo_open: bool = False
    metavar = "NUM"

    def parse(self, text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            value = math.nan
        below = value <= self.lo if self.lo_open else value < self.lo
        if not math.isfinite(value) or below or value > self.hi:
            raise _bad(text, f"must be a number, {self.domain()}")
        return value

    def domain(self) -> str:
        if self.lo_open:
            return f"more than {self.lo:g}, at most {self.hi:g}"
        return f"{self.lo:g}..{self.hi:g}"

    def edges(self) -> tuple[list[str], list[str]]:
        inside = [f"{self.lo + 1e-6:g}" if self.lo_open else f"{self.lo:g}", f"{self.hi:g}"]
        past = f"{self.lo:g}" if self.lo_open else f"{self.lo - max(1e-3, abs(self.lo) * 1e-3):g}"
        return inside, [past, f"{self.hi * 2 + 1:g}", "nan", "inf", "-inf", "x", ""]


@dataclass(frozen=True)
class Choice(Param):
    """One of a few words; `values` may be a function (read when the value is)."""

    values: Sequence[str] | Callable[[], Sequence[str]]
    metavar = "NAME"

    def options(self) -> list[str]:
        return list(self.values() if callable(self.values) else self.values)

    def parse(self, text: str) -> str:
        if text not in self.options():
            raise _bad(text, f"must be one of {', '.join(self.options())}")
        return text

    def domain(self) -> str:
        return " | ".join(self.options())

    def edges(self) -> tuple[list[str], list[str]]:
        return self.options(), ["bogus", "", self.options()[0].upper() + "X"]


@dataclass(frozen=True)
class PowerOfTwo(Param):
    lo: int
    hi: int
    metavar = "INT"

    def parse(self, text: str) -> int:
        value = Int(self.lo, self.hi).parse(text)
        if value & (value - 1):
            raise _bad(text, f"must be a power of two from {self.lo} to {self.hi}")
        return value

    def domain(self) -> str:
        return f"a power of two, {self.lo}..{self.hi}"

    def edges(self) -> tuple[list[str], list[str]]:
        return [str(self.lo), str(self.hi)], [str(self.lo // 2), str(self.hi * 2), str(self.lo + 1), "x"]


_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
}


def size_bytes(text: str) -> int | None:
    """`16KiB` -> 16384, `2GB` -> 2000000000, `4096` -> 4096; None when it is not a size."""
    t = str(text).strip().upper().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if t.endswith(unit):
            t, mult = t[: -len(unit)], _UNITS[unit]
            break
    else:
        mult = 1
    try:
        value = float(t) * mult
    except ValueError:
        return None
    if not math.isfinite(value) or value != int(value):
        return None
    return int(value)


def _size_text(n: int) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if n % _UNITS[unit.upper()] == 0:
            return f"{n // _UNITS[unit.upper()]}{unit}"
    return str(n)


@dataclass(frozen=True)
class Size(Param):
    """Bytes, typed as 16KiB, 500MB, 2GB or 4096."""

    lo: int
    hi: int
    power_of_two: bool = False
    metavar = "SIZE"

    def parse(self, text: str) -> int:
        value = size_bytes(text)
        if value is None:
            raise _bad(text, "is not a size (e.g. 16KiB, 500MB, 2GB, 4096; KB/MB/GB are 10^3/10^6/10^9)")
        if not self.lo <= value <= self.hi:
            raise _bad(text, f"must be from {_size_text(self.lo)} to {_size_text(self.hi)}")
        if self.power_of_two and value & (value - 1):
            hint = ""
            if str(text).strip().upper().endswith(("KB", "MB", "GB")):
                hint = " (KB/MB/GB are powers of 10: did you mean KiB/MiB/GiB?)"
            raise _bad(text, f"must be a power of two{hint}")
        return value

    def domain(self) -> str:
        two = "a power of two, " if self.power_of_two else ""
        return f"{two}{_size_text(self.lo)}..{_size_text(self.hi)}"

    def edges(self) -> tuple[list[str], list[str]]:
        below = self.lo // 2 if self.power_of_two else self.lo - 1
        refused = [str(below), str(self.hi + 1), "0", "-1MB", "2XB"]
        if self.power_of_two:
            refused.append("16KB")
        return [_size_text(self.lo), _size_text(self.hi)], refused


@dataclass(frozen=True)
class Fraction(Param):
    """A share, typed as 10% or 0.1."""

    hi: float = 10.0
    metavar = "SHARE"

    def parse(self, text: str) -> float:
        t = str(text).strip()
        try:
            value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and 0 <= value <= self.hi):
            raise _bad(text, f"must be a share from 0% to {self.hi * 100:g}% (examples: 10%, 0.1)")
        return value

    def domain(self) -> str:
        return f"0%..{self.hi * 100:g}%"

    def edges(self) -> tuple[list[str], list[str]]:
        return ["0%", f"{self.hi * 100:g}%"], ["-1%", f"{self.hi * 100 + 1:g}%", "nan", "x%", ""]


@dataclass(frozen=True)
class Ids(Param):
    """Token ids typed as 2,17,42 (checked against the bundle's vocabulary once it is read)."""

    metavar = "IDS"

    def parse(self, text: str) -> list[int]:
        parts = [t for t in str(text).replace(" ", "").split(",") if t]
        try:
            ids = [int(t) for t in parts]
        except ValueError:
            raise _bad(text, "must be comma-separated token ids, e.g. 2,17,42") from None
        if not ids or min(ids) < 0:
            raise _bad(text, "must be one or more token ids >= 0, e.g. 2,17,42")
        return ids

    def edges(self) -> tuple[list[str], list[str]]:
        return ["0", "2,17,42"], ["", "-1", "1,x", ","]


@dataclass(frozen=True)
class Text(Param):
    """Free text (a prompt)."""

    def parse(self, text: str) -> str:
        return str(text)

    def edges(self) -> tuple[list[str], list[str]]:
        return ["", "If the file"], []


@dataclass(frozen=True)
class Keep(Param):
    """`fp32:ple_gate,ple_proj` or `ple_gate,ple_proj`: tensors kept in fp32 (names or globs)."""

    metavar = "[fp32:]NAMES"

    def parse(self, text: str) -> tuple[str, ...]:
        from ple_export.bundle.recipe import parse_keep
        from ple_export.errors import UserError

        try:
            return parse_keep(text)
        except UserError as e:
            raise typer.BadParameter(str(e).removeprefix("--keep: ")) from None

    def edges(self) -> tuple[list[str], list[str]]:
        return ["fp32:ple_gate", "ple_gate,ple_proj"], ["int8:ple_gate", "fp32:", ","]


# paths: what must already be there, or where something may be written


@dataclass(frozen=True)
class ExistingDir(Param):
    """A folder that exists (what it must hold is checked when it is read)."""

    what: str = "folder"

    @property
    def metavar(self) -> str:  # type: ignore[override]
        return self.what.upper()

    def parse(self, text: str) -> Path:
        path = Path(text)
        if not str(text) or not path.exists():
            raise _bad(text, f"no such {self.what}")
        if not path.is_dir():
            raise _bad(text, f"is a file, not a {self.what}")
        return path

    def edges(self) -> tuple[list[str], list[str]]:
        return [], ["", "{missing}", "{a_file}", LONG]


@dataclass(frozen=True)
class CheckpointSource(Param):
    """A checkpoint folder, or a Hub id (`ORG/NAME[@REVISION]`) when no such folder exists: returned as
    a Path for a folder, as the id (a str) otherwise; the command resolves it (`exporter.hub`)."""

    metavar = "CHECKPOINT"

    def parse(self, text: str) -> Path | str:
        from exporter.hub import is_hub_id

        if str(text) and Path(text).exists():
            return ExistingDir("checkpoint").parse(text)
        if is_hub_id(str(text)):
            return str(text)
        raise _bad(text, "no such checkpoint folder, and not a Hub id (ORG/NAME or ORG/NAME@REVISION)")

    def edges(self) -> tuple[list[str], list[str]]:
        return [], ["", "{missing}", "{a_file}", LONG, "a/b/c", "@x"]


@dataclass(frozen=True)
class ExistingFile(Param):
    what: str = "file"
    suffixes: tuple[str, ...] = ()
    metavar = "FILE"

    def parse(self, text: str) -> Path:
        path = Path(text)
        if not str(text) or not path.exists():
            raise _bad(text, f"no such {self.what}")
        if path.is_dir():
            raise _bad(text, f"is a folder, not a {self.what}")
        if self.suffixes and path.suffix.lower() not in self.suffixes:
            raise _bad(text, f"a {self.what} is a {'/'.join(self.suffixes)} file")
        if not os.access(path, os.R_OK):
            raise _bad(text, "cannot be read by this user")
        return path

    def edges(self) -> tuple[list[str], list[str]]:
        return [], ["", "{missing}", "{a_dir}", LONG]


LONG = "{fresh}/" + "x" * 300  # a name too long for the file system


def _unwritable(path: Path) -> str | None:
    """Why `path` cannot be made (its missing parents with it), or None."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not a folder this user can write to"
    return None


@dataclass(frozen=True)
class OutputDir(Param):
    """A folder to create (missing parents are created): not a file, under a writable folder.
    Whether an existing folder may be replaced is `--overwrite`'s question, asked before any work."""

    metavar = "DIR"

    def parse(self, text: str) -> Path:
        path = Path(text)
        if not str(text):
            raise _bad(text, "is empty")
        if path.exists() and not path.is_dir():
            raise _bad(text, "is a file, not a folder")
        why = _unwritable(path)
        if why is not None:
            raise _bad(text, why)
        return path

    def edges(self) -> tuple[list[str], list[str]]:
        return ["{fresh}/out"], ["", "{a_file}", "{a_file}/sub", LONG]


@dataclass(frozen=True)
class OutputFile(Param):
    """A file to write, its format picked by its suffix; `needs` names an optional dependency
    (a module) the format needs, checked now rather than after the work."""

    suffixes: tuple[str, ...]
    needs: tuple[str, str] | None = None  # (module, pip install hint)
    metavar = "FILE"

    def parse(self, text: str) -> Path:
        path = Path(text)
        if path.suffix.lower() not in self.suffixes:
            raise _bad(text, f"name a {', '.join(self.suffixes)} file (the suffix picks the format)")
        if path.is_dir():
            raise _bad(text, "is a folder")
        if not path.absolute().parent.is_dir():
            raise _bad(text, f"{path.absolute().parent} is not a folder")
        why = _unwritable(path)
        if why is not None:
            raise _bad(text, why)
        if self.needs is not None:
            import importlib.util

            module, hint = self.needs
            if importlib.util.find_spec(module) is None:
                raise _bad(text, f"needs {module}: {hint}")
        return path

    def domain(self) -> str:
        return "/".join(self.suffixes)

    def edges(self) -> tuple[list[str], list[str]]:
        return [f"{{fresh}}/out{self.suffixes[0]}"], [
            "{fresh}/out.txt",
            "{a_file}/x.png",
            "{missing}/x.png",
            LONG + ".png",
        ]


def _help(param: Param, text: str) -> str:
    domain = "" if isinstance(param, Choice) and callable(param.values) else param.domain()
    return f"{text} [{domain}]" if domain else text


def opt(param: Param, help: str, *decls: str) -> Any:
    """A typer option whose value `param` parses and checks."""
    return typer.Option(*decls, parser=param, metavar=param.metavar, help=_help(param, help))


def arg(param: Param, help: str, metavar: str | None = None) -> Any:
    """A typer argument whose value `param` parses and checks (errors name it by its metavar)."""
    return typer.Argument(parser=param, metavar=metavar or param.metavar, help=_help(param, help))
