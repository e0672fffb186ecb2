"""Reading the small JSON files a user hands us (config.json, index, manifest) with one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ple_export.errors import UserError

# No real config, index or manifest nests deeper than a handful of levels; a deeper document is refused
# before json's recursive parser can hit Python's recursion limit.
MAX_NESTING = 64


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def max_nesting(text: str) -> int:
    """Deepest bracket nesting of a JSON text, ignoring brackets inside strings (regex passes in C,
    then one step per bracket)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def loads_bounded(text: str, where: str, **kwargs: Any) -> Any:
    """json.loads with a nesting bound and one-line errors naming `where`."""
    if max_nesting(text) > MAX_NESTING:
        raise UserError(f"{where}: JSON nested deeper than {MAX_NESTING} levels; refusing to read it")
    try:
        return json.loads(text, **kwargs)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{where}: not valid JSON ({e})") from None


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    doc = loads_bounded(text, str(path))
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a JSON object")
    return doc
