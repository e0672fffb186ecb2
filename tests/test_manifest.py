"""Manifest helpers that a runtime relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.errors import UserError
from exporter.manifest import load, row_pages


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


@pytest.mark.parametrize("version", [1, 2, 3, 0, "2", 2.0, True, None])
def test_format_versions_this_runtime_reads(version: object, tmp_path: Path) -> None:
    """Format 1 bundles (no logits_positions input) still load; anything else is refused in one line."""
    from tests.test_cli import earlier_manifest

    (tmp_path / "notes.txt").write_bytes(b"x")
    manifest = earlier_manifest({"notes.txt": b"x"}) | {"format_version": version}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    if version in (1, 2) and type(version) is int:
        assert load(tmp_path)["format_version"] == version
    else:
        with pytest.raises(UserError, match="format_version .* is not supported"):
            load(tmp_path)
