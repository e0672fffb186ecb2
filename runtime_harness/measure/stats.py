"""Statistics of repeated runs: medians and tails, never single times (this machine is noisy)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Spread:
    """The median of some samples and their tail: for a latency (`tail="high"`) the 90th percentile
    (90% were at most this slow), for a rate (`tail="low"`) the rate 90% reached (the 10th)."""

    median: float | None
    p90: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float], tail: str) -> Spread:
        if not values:
            return cls(None, None, 0)
        q = 90 if tail == "high" else 10
        return cls(float(np.median(values)), float(np.percentile(values, q)), len(values))


def mean_or_none(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def rate(count: int, seconds: float) -> float:
    """Tokens per second of `count` tokens in `seconds` (0 for no time)."""
    return count / seconds if seconds > 0 else 0.0
