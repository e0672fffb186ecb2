"""graphs/genai_model.py: the spliced graph computes what the embedder + decoder pair computes, with
onnxruntime alone (before: two sessions; after: one), and copies no weight."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphs.genai_model import PREFIX, splice
from ple_export.bundle.format import GENAI_MODEL_FILE
from ple_export.bundle.manifest import Manifest
from tests.graphs.helpers import unoptimized_session


def _feeds(manifest: Manifest, ids: np.ndarray, past: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A chunk of `ids` over a random past of `past` positions (capped as the graph caps it)."""
    feeds = {"input_ids": ids, "position_ids": np.arange(past, past + ids.shape[1])[None]}
    for t in manifest.graphs.decoder.kv_inputs():
        kv = next(k for k in manifest.kv_cache.layers if k.layer == t.layer)
        shape = (1, kv.kv_heads, kv.length_after(past), kv.head_dim)
        feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_spliced_graph_equals_the_pair(bundles: dict[str, Path], int4_bundle: Path, kind: str) -> None:
    bundle = bundles["tiny"] if kind == "fp32" else int4_bundle
    manifest = Manifest.read(bundle)
    embedder = unoptimized_session(str(bundle / "embedder.onnx"))
    decoder = unoptimized_session(str(bundle / "decoder.onnx"))
    spliced = unoptimized_session(str(bundle / GENAI_MODEL_FILE))
    assert {i.name for i in spliced.get_inputs()} == {
        i.name for i in decoder.get_inputs() if i.name not in ("per_layer_inputs", "logits_positions")
    }
    rng = np.random.default_rng(0)
    for past, length in ((0, 5), (3, 4), (12, 1), (20, 6)):
        ids = rng.integers(0, manifest.generation.vocab_size, (1, length))
        feeds = _feeds(manifest, ids, past, rng)
        pli = embedder.run(None, {"input_ids": ids})[0]
        before = decoder.run(
            None, feeds | {"per_layer_inputs": pli, "logits_positions": np.array([length - 1])}
        )
        after = spliced.run(None, feeds)
        assert after[0].shape == (1, 1, manifest.generation.vocab_size)
        np.testing.assert_array_equal(before[0], after[0])
        # the decoder's presents are the new positions; the spliced graph's the whole caches
        # (`whole_presents`), a sliding layer's cut to its last max_length
        names = [o.name for o in decoder.get_outputs()]
        for name, new, whole in zip(names[1:], before[1:], after[1:], strict=True):
            t = next(t for t in manifest.graphs.decoder.outputs if t.name == name)
            kv = next(k for k in manifest.kv_cache.layers if k.layer == t.layer)
            past = feeds[name.replace("present_", "past_")]
            expected = np.concatenate([past, new], axis=2)[:, :, -kv.length_after(past.shape[2] + length) :]
            assert new.shape[2] == length
            np.testing.assert_array_equal(whole, expected)


def test_no_weight_is_copied_and_names_stay_unique(int4_bundle: Path) -> None:
    model = onnx.load(str(int4_bundle / GENAI_MODEL_FILE), load_external_data=False)
    inits = list(model.graph.initializer)
    external = {
        next(e.value for e in t.external_data if e.key == "location")
        for t in inits
        if t.data_location == onnx.TensorProto.EXTERNAL
    }
    assert external == {"decoder.data", "ple_table.data"}
    assert all(t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) < 4096 for t in inits)
    names = [n.name for n in model.graph.node]
    assert len(names) == len(set(names))
    values = [o for n in model.graph.node for o in n.output]
    assert len(values) == len(set(values))
    assert any(n.startswith(PREFIX) for n in names)
    assert {o.domain: o.version for o in model.opset_import} == {"": 18, "com.microsoft": 1}


def test_splice_refuses_graphs_without_the_contract_names(int4_bundle: Path) -> None:
    with pytest.raises(ValueError, match="no input 'ids'"):
        splice(
            ir.load(int4_bundle / "embedder.onnx"),
            ir.load(int4_bundle / "decoder.onnx"),
            "ids",
            "per_layer_inputs",
            "logits_positions",
            "logits",
        )
