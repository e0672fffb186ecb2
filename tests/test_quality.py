"""Quantization quality on the trained tiny model's held-out text, with the thresholds each recipe
must meet (runtime_harness/quality.py; docs/quantization.md). A broken quantizer must fail them."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter import assets
from exporter.export import ExportOptions, export_bundle
from exporter.quantize import quantize_bundle
from ple_export.bundle.recipe import QuantRecipe
from runtime_harness.quality import QualityOptions, compare
from tests.conftest import swap_int4_codes

TRAINED = Path(assets.__file__).parent / "tiny_trained"
OPTS = QualityOptions(TRAINED / "heldout.txt", windows=6, window_tokens=128, greedy_steps=16)
RECIPES = {
    "int4": QuantRecipe(),  # the default: int4 block 256 asymmetric + clip search, int8 PLE table
    "int4-b128-rtn": QuantRecipe(block_size=128, clip_search=False),  # the default before clip search
    "int4-b32-sym": QuantRecipe(block_size=32, symmetric=True),  # the peer's recipe
    "int4-b64-asym": QuantRecipe(block_size=64, symmetric=False),  # the higher-quality option
    "int8": QuantRecipe(weights="int8", ple="none"),
    "ple-int4": QuantRecipe(weights="none", ple="int4"),
}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quality") / "fp32"
    return export_bundle(TRAINED, out, ExportOptions(recipe=QuantRecipe.none())).out_dir


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipes_meet_their_thresholds(name: str, fp32: Path, tmp_path: Path) -> None:
    bundle = quantize_bundle(fp32, tmp_path / name, RECIPES[name]).out_dir
    report = compare(bundle, fp32, OPTS)
    assert report.passed, report.failures
    assert report.perplexity_reference < 80  # the trained model, not noise (unigram: ~557)
    assert report.perplexity_ratio >= 1.0 - 1e-3  # quantization does not improve a model


def test_a_broken_quantizer_fails_them(fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Swap the two codes of every byte (a packing bug): the thresholds must catch it."""
    swap_int4_codes(monkeypatch)
    bundle = quantize_bundle(fp32, tmp_path / "broken", QuantRecipe()).out_dir
    report = compare(bundle, fp32, OPTS)
    assert not report.passed and report.perplexity_ratio > 1.06
