"""Manifest helpers that a runtime relies on."""

from __future__ import annotations

import pytest

from exporter.manifest import row_pages


@pytest.mark.parametrize(
    ("row_bytes", "page"),
    [(17920, 16384), (17920, 4096), (192, 16384), (16384, 16384), (9216, 4096), (4096 * 3, 16384)],
)
def test_row_pages_matches_counting_every_row(row_bytes: int, page: int) -> None:
    rows = 2000
    step = 64  # every row_bytes and page here is a multiple of 64: sampling each 64 B block finds every page
    touched = [len({b // page for b in range(r * row_bytes, (r + 1) * row_bytes, step)}) for r in range(rows)]
    got = row_pages(row_bytes, page)
    assert got["min"] == min(touched) and got["max"] == max(touched)
    assert got["mean"] == pytest.approx(sum(touched) / rows, abs=2e-3)
