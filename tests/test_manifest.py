"""The manifest as typed values: one strict parse, a writer whose output reads back the same, and
the one PLE page model the manifest and `profile` share."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from exporter.export import ExportOptions, export_bundle
from ple_export.bundle.manifest import Manifest
from ple_export.bundle.ple_layout import Region, manifest_regions, pages_per_token
from ple_export.bundle.recipe import QuantRecipe
from ple_export.errors import UserError


@pytest.mark.parametrize(
    ("row_bytes", "page"),
    [(17920, 16384), (17920, 4096), (192, 16384), (16384, 16384), (9216, 4096), (4096 * 3, 16384)],
)
def test_pages_per_token_matches_counting_every_row(row_bytes: int, page: int) -> None:
    rows = 2000
    step = 64  # every row_bytes and page here is a multiple of 64: sampling each 64 B block finds every page
    touched = [len({b // page for b in range(r * row_bytes, (r + 1) * row_bytes, step)}) for r in range(rows)]
    got = pages_per_token([Region("codes", 0, row_bytes)], page)
    assert got.min == min(touched) and got.max == max(touched)
    assert got.mean == pytest.approx(sum(touched) / rows, abs=2e-3)


def test_pages_per_token_counts_codes_and_scales_row_by_row() -> None:
    """A row's codes and scales straddle page boundaries on different rows: min and max are per row,
    not the sum of each region's min and max (which the manifest once wrote)."""
    page, rows = 4096, 4096
    codes, scales = Region("codes", 0, 96), Region("scales", rows * 96, 160)
    per_row = [
        len({b // page for b in range(r * 96, (r + 1) * 96, 8)})
        + len({b // page for b in range(rows * 96 + r * 160, rows * 96 + (r + 1) * 160, 8)})
        for r in range(rows)
    ]
    got = pages_per_token([codes, scales], page)
    assert (got.min, got.max) == (min(per_row), max(per_row)) == (2, 3)
    assert got.mean == pytest.approx(sum(per_row) / rows, abs=1e-4)
    each = [pages_per_token([r], page) for r in (codes, scales)]
    assert sum(c.max for c in each) == 4  # the two never straddle on the same row


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 0, "2", 2.0, True, None])
def test_format_versions_this_runtime_reads(version: object, tmp_path: Path) -> None:
    """Format 1 (no logits_positions input), 2 (no onnxruntime-genai files) and 3 (whole-cache
    presents) bundles still load; anything else is refused in one line."""
    from tests.test_cli import earlier_manifest

    (tmp_path / "notes.txt").write_bytes(b"x")
    manifest = earlier_manifest({"notes.txt": b"x"}) | {"format_version": version}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    if version in (1, 2, 3, 4) and type(version) is int:
        assert Manifest.read(tmp_path).format_version == version
    else:
        with pytest.raises(UserError, match="format_version .* is not supported"):
            Manifest.read(tmp_path)


RECIPES = {
    "default": QuantRecipe(),
    "fp32": QuantRecipe.none(),
    "ple-asymmetric-int4": QuantRecipe(weights="int8", ple="int4", ple_symmetric=False),
}


@pytest.fixture(scope="module")
def exported(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("manifests")
    return {
        name: export_bundle(checkpoints["tiny"], root / name, ExportOptions(recipe=recipe)).out_dir
        for name, recipe in RECIPES.items()
    }


@pytest.mark.parametrize("name", list(RECIPES))
def test_written_manifests_read_back_to_their_bytes(name: str, exported: dict[str, Path]) -> None:
    """read(write(m)) == m, and writing what was read gives the file's bytes back."""
    path = exported[name] / "manifest.json"
    manifest = Manifest.read(exported[name])
    assert manifest.text() == path.read_text()
    assert Manifest.from_json(json.loads(manifest.text())) == manifest


@pytest.mark.parametrize("name", list(RECIPES))
def test_the_page_model_matches_the_embedder_graph(name: str, exported: dict[str, Path]) -> None:
    """The regions the manifest implies (codes, scales, zero points, laid out by the format's alignment
    rule) are where the embedder graph's external data really is."""
    bundle = exported[name]
    manifest = Manifest.read(bundle)
    graph = onnx.load(str(bundle / "embedder.onnx"), load_external_data=False).graph
    actual = sorted(
        (int(ext.get("offset", 0)), int(ext["length"]) // manifest.ple.rows)
        for ext in ({e.key: e.value for e in t.external_data} for t in graph.initializer)
    )
    assert [(r.offset, r.row_bytes) for r in manifest_regions(manifest)] == actual
    assert len(actual) == {"default": 2, "fp32": 1, "ple-asymmetric-int4": 3}[name]
    assert manifest.ple.bytes_per_token == sum(rb for _, rb in actual)
    page = manifest.ple.page_size
    assert manifest.ple.pages_per_token == pages_per_token(manifest_regions(manifest), page)


def test_every_pass_is_counted(exported: dict[str, Path]) -> None:
    """The manifest records what each pass matched, a pass that matched nothing as 0."""
    passes = Manifest.read(exported["default"]).passes
    assert list(passes["decoder"]) == [
        "cleanup",
        "rms_norm",
        "skip_rms_norm",
        "gelu",
        "matmul_nbits",
        "sibling_matmul_nbits",
        "tied_lm_head",
    ]
    tiny = 6  # layers of the tiny preset
    assert passes["decoder"]["gelu"] == 2 * tiny  # the MLP's and the PLE gate's
    assert passes["decoder"]["skip_rms_norm"] == tiny
    assert passes["decoder"]["tied_lm_head"] == 0  # the quantized head needs no Gemm
    assert passes["embedder"] == {"ple_table_quant": 1}
    fp32 = Manifest.read(exported["fp32"]).passes
    assert fp32["decoder"]["matmul_nbits"] == 0 and fp32["decoder"]["tied_lm_head"] == 1
    assert fp32["embedder"] == {"ple_table_quant": 0}
