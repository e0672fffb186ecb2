"""The regression gate: a report's headline figures against a baseline's."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ple_export.errors import UserError
from ple_export.jsonfile import read_json_object
from runtime_harness.profile.report import SCHEMA, Headline

MIB = 1 << 20
READABLE = (SCHEMA, "ple-export-profile/1")


def load_headline(path: Path) -> Headline:
    """The headline of a saved `profile --json` report (e.g. a baseline); UserError if it is not one."""
    doc = read_json_object(Path(path))
    if doc.get("schema") not in READABLE:
        raise UserError(f"{path}: not a ple-export profile report (schema {SCHEMA})")
    decode = _number(doc, "results", "warm", "decode_tok_s", "median")
    dram = _number(doc, "verdict", "dram_resident_bytes")
    if decode is None or dram is None:
        raise UserError(f"{path}: the report has no warm decode tok/s or DRAM-resident bytes to compare")
    return Headline(decode, dram)


def _number(doc: Any, *keys: str) -> float | None:
    for key in keys:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return float(doc) if isinstance(doc, int | float) and not isinstance(doc, bool) else None


def compare_baseline(new: Headline, old: Headline, max_regression: float = 0.10) -> list[str]:
    """Regressions of `new` against `old` beyond `max_regression` (a fraction): warm decode tok/s
    (lower is worse) and DRAM-resident bytes (higher is worse). Empty: no regression."""
    if not (0 <= max_regression < 10 and math.isfinite(max_regression)):
        raise UserError(f"--max-regression must be a fraction >= 0 (0.10 = 10%), got {max_regression}")
    regressions = []
    if old.decode_tok_s > 0 and new.decode_tok_s < old.decode_tok_s * (1 - max_regression):
        regressions.append(
            f"decode tok/s {old.decode_tok_s:.2f} -> {new.decode_tok_s:.2f} "
            f"({new.decode_tok_s / old.decode_tok_s - 1:+.1%}, tolerance -{max_regression:.0%})"
        )
    if old.dram_resident_bytes > 0 and new.dram_resident_bytes > old.dram_resident_bytes * (
        1 + max_regression
    ):
        regressions.append(
            f"DRAM-resident {old.dram_resident_bytes / MIB:.2f} -> {new.dram_resident_bytes / MIB:.2f} MiB "
            f"({new.dram_resident_bytes / old.dram_resident_bytes - 1:+.1%}, tolerance +{max_regression:.0%})"
        )
    return regressions
