"""`export` with a recipe and `quantize` of an fp32 bundle: the same passes and layout stage, so the
same bytes; bad input refused with one line and nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from exporter.export import ExportOptions, export_bundle
from exporter.quantize import quantize_bundle
from ple_export.bundle.manifest import Manifest
from ple_export.bundle.recipe import QuantRecipe
from ple_export.errors import UserError
from runtime_harness import loop
from runtime_harness.session import BundleSession
from tests.test_cli import assert_nothing_left, assert_user_error, cli, snapshot

RECIPES = {
    "int4": QuantRecipe(),
    "int8-asym-ple4": QuantRecipe(weights="int8", symmetric=False, ple="int4", block_size=16),
    "keep": QuantRecipe(keep=("ple_gate", "ple_proj")),
}


@pytest.fixture(scope="module")
def fp32_bundle(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("q") / "fp32"
    return export_bundle(checkpoints["tiny"], out, ExportOptions(recipe=QuantRecipe.none())).out_dir


@pytest.mark.parametrize("name", list(RECIPES))
def test_quantize_gives_the_bytes_export_gives(
    name: str, fp32_bundle: Path, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    recipe = RECIPES[name]
    direct = export_bundle(checkpoints["tiny"], tmp_path / "direct", ExportOptions(recipe=recipe))
    requant = quantize_bundle(fp32_bundle, tmp_path / "requant", recipe)
    for f in ("decoder.data", "ple_table.data"):
        assert (direct.out_dir / f).read_bytes() == (requant.out_dir / f).read_bytes(), f
    # the graphs compute the same (node names differ: quantize starts from the fp32 bundle's graph)
    ops = [
        [n.op_type for n in onnx.load(b / "embedder.onnx", load_external_data=False).graph.node]
        for b in (direct.out_dir, requant.out_dir)
    ]
    assert ops[0] == ops[1] and "Cast" not in ops[1]
    assert direct.manifest.quantization == requant.manifest.quantization
    assert direct.manifest.ple == requant.manifest.ple
    for name in ("rms_norm", "skip_rms_norm", "gelu", "matmul_nbits", "sibling_matmul_nbits"):
        assert direct.manifest.passes["decoder"][name] == requant.manifest.passes["decoder"][name], name
    assert direct.manifest.passes["embedder"] == requant.manifest.passes["embedder"]
    prompt = np.random.RandomState(0).randint(3, 512, (1, 12))
    a = loop.generate(BundleSession(direct.out_dir), prompt, 3, stop_at_eos=False, keep_logits=True)
    b = loop.generate(BundleSession(requant.out_dir), prompt, 3, stop_at_eos=False, keep_logits=True)
    for x, y in zip(a.step_logits, b.step_logits, strict=True):
        np.testing.assert_array_equal(x, y)
    assert direct.manifest.quantization is not None
    tensors = direct.manifest.quantization.tensors
    if name == "keep":
        assert tensors["layers.0.ple_gate.weight"].kept_float_because == "kept by --keep"
        assert tensors["layers.0.attn.wq.weight"].precision == "int4"


def test_manifest_reports_precision_and_dram_shrinks(fp32_bundle: Path, tmp_path: Path) -> None:
    q = quantize_bundle(fp32_bundle, tmp_path / "q", QuantRecipe()).manifest
    fp32 = Manifest.read(fp32_bundle)
    assert q.dram_bytes < fp32.dram_bytes / 3
    assert q.quantization is not None
    t = q.quantization.tensors
    assert t["embed.weight"].op == "MatMulNBits+GatherBlockQuantized"  # tied: one copy, two ops
    assert 0 < (t["layers.0.mlp.up.weight"].rel_weight_error or 0) < 0.15
    assert q.ple.dtype == "int8" and q.ple.bytes_per_token < fp32.ple.bytes_per_token


def test_quantize_refuses_bad_input(fp32_bundle: Path, tmp_path: Path) -> None:
    done = quantize_bundle(fp32_bundle, tmp_path / "int4", QuantRecipe()).out_dir
    cases = [
        (["quantize", done, "-o", tmp_path / "again"], ["already quantized"]),
        (["quantize", fp32_bundle, "-o", fp32_bundle], ["would replace or sit inside"]),
        (["quantize", fp32_bundle, "-o", fp32_bundle / "inner"], ["would replace or sit inside"]),
        (["quantize", fp32_bundle, "-o", tmp_path / "x", "--quant", "int3"], ["--quant", "int3"]),
        (["quantize", fp32_bundle, "-o", tmp_path / "x", "--block-size", "48"], ["--block-size", "48"]),
        (["quantize", fp32_bundle, "-o", tmp_path / "x", "--keep", "fp32:nothing"], ["--keep", "nothing"]),
        (
            ["quantize", fp32_bundle, "-o", tmp_path / "x", "--quant", "none", "--ple-quant", "none"],
            ["nothing"],
        ),
    ]
    before = snapshot(fp32_bundle)
    for args, needles in cases:
        assert_user_error(cli(*args, cwd=tmp_path), *needles)
    assert snapshot(fp32_bundle) == before
    assert_nothing_left(tmp_path / "x")
    # a file that does not match its sha256
    damaged = Path(shutil.copytree(fp32_bundle, tmp_path / "damaged"))
    data = bytearray((damaged / "decoder.data").read_bytes())
    data[-1] ^= 1
    (damaged / "decoder.data").write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        quantize_bundle(damaged, tmp_path / "y", QuantRecipe())
    assert not (tmp_path / "y").exists()
