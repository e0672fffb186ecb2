"""The one page model of the PLE table: what a token reads of the flash file, in pages.

The table's file holds, one after another as the layout stage writes them (`format.aligned`), the
codes (or float rows) at offset 0, then for a quantized table its scales and, when asymmetric, its
zero points: each a per-row tensor. A token reads its row of each. The manifest's
`ple.pages_per_token` and `profile`'s logical figures are both computed here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ple_export.bundle.format import aligned
from ple_export.bundle.manifest import Manifest, PageCounts, PleQuant

MAX_PERIOD = 1 << 16  # rows counted for min/mean/max: the page pattern repeats before this in practice


@dataclass(frozen=True)
class Region:
    """A per-row tensor inside the PLE file: row r occupies [offset + r*row_bytes, +row_bytes)."""

    name: str
    offset: int
    row_bytes: int

    def pages(self, row: int, page: int) -> range:
        first = (self.offset + row * self.row_bytes) // page
        last = (self.offset + (row + 1) * self.row_bytes - 1) // page
        return range(first, last + 1)


def regions(rows: int, row_bytes: Iterable[tuple[str, int]], page_size: int) -> list[Region]:
    """The per-row tensors `(name, bytes per row)` laid out in order in one data file whose large
    tensors are aligned to `page_size` (the first at offset 0)."""
    out, position = [], 0
    for name, per_row in row_bytes:
        if not per_row:
            continue
        offset = aligned(position, rows * per_row, page_size)
        out.append(Region(name, offset, per_row))
        position = offset + rows * per_row
    return out


def zero_points_row_bytes(quant: PleQuant | None, symmetric: bool) -> int:
    """Bytes of one row of the PLE table's zero points (0: symmetric, or a float table)."""
    if quant is None or symmetric:
        return 0
    blocks = quant.row_bytes * 8 // quant.bits // quant.block_size
    return -(-blocks * quant.bits // 8)


def table_regions(
    rows: int, row_bytes: int, scales_row_bytes: int, zero_points: int, page_size: int
) -> list[Region]:
    """The table's per-row tensors as the layout stage writes them: codes, scales, zero points."""
    parts = [("codes", row_bytes), ("scales", scales_row_bytes), ("zero_points", zero_points)]
    return regions(rows, parts, page_size)


def manifest_regions(manifest: Manifest) -> list[Region]:
    ple, q = manifest.ple, manifest.quantization
    zero_points = zero_points_row_bytes(q.ple, q.recipe.ple_symmetric) if q else 0
    return table_regions(ple.rows, ple.row_bytes, ple.scales_row_bytes, zero_points, ple.page_size)


def pages_per_token(table: list[Region], page: int) -> PageCounts:
    """Pages of `page` bytes one row touches (its row of every region), min/mean/max over rows.
    Row offsets repeat their alignment every page / gcd(row_bytes, page) rows."""
    period = 1
    for r in table:
        period = math.lcm(period, page // math.gcd(r.row_bytes, page))
    period = min(period, MAX_PERIOD)
    counts = [sum(len(r.pages(row, page)) for r in table) for row in range(period)]
    return PageCounts(min(counts), round(sum(counts) / len(counts), 4), max(counts))


def distinct_pages(table: list[Region], rows: set[int], page: int) -> int:
    """Pages of the file that reading `rows` touches (rows sharing a page share it)."""
    pages: set[int] = set()
    for r in table:
        for row in rows:
            pages.update(r.pages(row, page))
    return len(pages)


def lookup_rows(ids: Iterable[int], table_rows: int) -> set[int]:
    """The distinct rows a lookup of `ids` reads (ids outside the table read row 0)."""
    return {t if 0 <= t < table_rows else 0 for t in ids}
