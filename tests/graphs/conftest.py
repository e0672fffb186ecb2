"""Fixtures the graph-pass tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.quantize import quantize_bundle
from ple_export.bundle.recipe import QuantRecipe


@pytest.fixture(scope="session")
def int4_bundle(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny fp32 bundle re-quantized with the default recipe (made once for every test here)."""
    out = tmp_path_factory.mktemp("graphs") / "tiny_int4"
    return quantize_bundle(bundles["tiny"], out, QuantRecipe()).out_dir
