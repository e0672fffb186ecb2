"""`export --kv-dtype fp16`: the KV cache in half precision (half its DRAM), attention still in fp32.
Checked on the shipped trained model: the cache really is float16 end to end (graph I/O, manifest,
runtime arrays), its bytes halve in the budget arithmetic, logits stay within the kv-fp16 thresholds of
the fp32 bundle past the window, `quantize` keeps it, and `verify`/`quality` judge it by its class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from exporter.export import ExportOptions, export_bundle
from exporter.quantize import quantize_bundle
from ple_export.bundle.manifest import Manifest
from ple_export.bundle.recipe import QuantRecipe
from runtime_harness import loop
from runtime_harness.compare.thresholds import PARITY, QUALITY, recipe_class
from runtime_harness.generate import bundle_tokenizer
from runtime_harness.profile.analysis import floor_bytes
from runtime_harness.session import BundleSession


@pytest.fixture(scope="module")
def half(trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kv16")
    opts = ExportOptions(recipe=QuantRecipe.none(), kv_dtype="float16")
    fp32 = export_bundle(trained["checkpoint"], root / "fp32-kv16", opts).out_dir
    int4 = quantize_bundle(fp32, root / "int4-kv16", QuantRecipe()).out_dir
    return {"fp32": fp32, "int4": int4}


def _ids(trained: dict[str, Path], n: int) -> np.ndarray:
    ref = Manifest.read(trained["fp32"])
    tok = bundle_tokenizer(trained["fp32"], ref)
    assert tok is not None
    text = (trained["checkpoint"] / "heldout.txt").read_text(encoding="utf-8")
    return np.array([tok.encode(text)[:n]])


def test_the_cache_is_half_precision_end_to_end(half: dict[str, Path], trained: dict[str, Path]) -> None:
    for name in ("fp32", "int4"):  # quantize keeps the cache's dtype
        manifest = Manifest.read(half[name])
        assert manifest.kv_cache.dtype == "float16"
        assert recipe_class(manifest.recipe, manifest.kv_cache.dtype) == (
            "kv-fp16" if name == "fp32" else "int4"
        )
        graph = onnx.load(str(half[name] / manifest.graphs.decoder.file), load_external_data=False).graph
        kv = [v for v in [*graph.input, *graph.output] if v.name.startswith(("past_", "present_"))]
        assert kv and all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in kv)
        session = BundleSession(half[name])
        cache = session.new_cache(1)
        session.forward(_ids(trained, 20), cache)
        assert all(a.dtype == np.float16 and a.shape[2] > 0 for a in cache.tensors.values())
    full, halved = Manifest.read(trained["fp32"]), Manifest.read(half["fp32"])
    positions = 4096
    assert halved.kv_cache.bytes_after(positions) * 2 == full.kv_cache.bytes_after(positions)
    # the budget arithmetic follows the dtype: the floor drops by half the cache, less the Casts the
    # half-precision graph adds to decoder.onnx (a few KiB)
    saved = floor_bytes(full, positions) - floor_bytes(halved, positions)
    assert (
        full.kv_cache.bytes_after(positions) // 2 - (16 << 10)
        < saved
        <= full.kv_cache.bytes_after(positions) // 2
    )


def test_logits_stay_within_the_kv_fp16_class(half: dict[str, Path], trained: dict[str, Path]) -> None:
    """A prompt past the window, then greedy steps: fp16 KV against the fp32 bundle."""
    ids = _ids(trained, 120)
    ref, ours = BundleSession(trained["fp32"]), BundleSession(half["fp32"])
    expected = loop.score(ref, ids, ref.new_cache(1))[0]
    got = loop.score(ours, ids, ours.new_cache(1))[0]
    err = float((np.abs(got - expected).max(-1) / np.abs(expected).max(-1)).max())
    limit = PARITY["kv-fp16"].max_rel_error
    assert 0 < err <= limit, f"max relative error {err:.3g} (limit {limit})"  # > 0: really rounded
    a = loop.generate(ref, ids[0].tolist(), 32, stop_at_eos=False)
    b = loop.generate(ours, ids[0].tolist(), 32, stop_at_eos=False)
    assert a.tokens == b.tokens


def test_verify_and_quality_judge_it_by_its_class(half: dict[str, Path], trained: dict[str, Path]) -> None:
    from tests.test_cli import cli

    proc = cli("verify", half["fp32"], "--reference", trained["checkpoint"], "--json", cwd=half["fp32"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = trained["checkpoint"] / "heldout.txt"
    proc = cli(
        "quality", half["fp32"], "--reference", trained["fp32"], "--text", text, "--json", cwd=half["fp32"]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    report = json.loads(proc.stdout)
    assert report["thresholds_for"] == "kv-fp16" and "float16 KV" in report["quantized_label"]
    assert report["perplexity_ratio"] <= QUALITY["kv-fp16"].max_perplexity_ratio
    # and a half-cache bundle is no fp32 reference
    proc = cli("quality", half["int4"], "--reference", half["fp32"], "--text", text, cwd=half["fp32"])
    assert proc.returncode == 2 and "KV cache fp32" in proc.stderr
