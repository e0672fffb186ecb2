"""One judge for every threshold table: each threshold field names the metric it bounds and how.

    @dataclass(frozen=True)
    class Parity:
        min_cosine: float = bound("min_cosine", ">=")

`judge(thresholds, measured)` compares each bounded field with the attribute of `measured` that it
names and returns the failures as one-line strings (empty: passed).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge}


def bound(metric: str, op: str) -> Any:
    """A threshold field: the measured `metric` must be `op` (<= or >=) the field's value."""
    assert op in _OPS, op
    return dataclasses.field(metadata={"metric": metric, "op": op})


def checks(thresholds: Any) -> list[tuple[str, str, float]]:
    """(metric, op, limit) of every bounded field of a thresholds dataclass."""
    return [
        (f.metadata["metric"], f.metadata["op"], getattr(thresholds, f.name))
        for f in dataclasses.fields(thresholds)
        if "metric" in f.metadata
    ]


def judge(thresholds: Any, measured: Any, digits: int = 6) -> list[str]:
    """The bounds `measured` misses, e.g. `min_cosine 0.97 (must be >= 0.98)`."""
    failures = []
    for metric, op, limit in checks(thresholds):
        value = getattr(measured, metric)
        if not _OPS[op](value, limit):
            failures.append(f"{metric} {value:.{digits}g} (must be {op} {limit:g})")
    return failures


def overridden(thresholds: Any, **overrides: float | None) -> Any:
    """`thresholds` with the given fields replaced (None: keep)."""
    return dataclasses.replace(thresholds, **{k: v for k, v in overrides.items() if v is not None})
