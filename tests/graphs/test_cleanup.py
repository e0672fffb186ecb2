"""clean: the traced plumbing goes (sequence ops, no-op casts, Identity, most Constants), outputs
stay the same under onnxruntime, and no weight is read, folded, renamed or stripped of its plan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exporter.gemma4 import RMSNorm, rotate_half
from graphs.cleanup import clean, hidden_initializer_values, op_counts
from graphs.counted import QuantizedWeights
from graphs.matmul_nbits import LinearToMatMulNBits, linear_weights
from graphs.weight_plan import PLAN, plan_of
from ple_export.bundle.recipe import QuantRecipe
from tests.conftest import VARIANTS
from tests.graphs.helpers import decoder_feeds, export_module, unoptimized_session


class Attn(nn.Module):
    """A slice of the decoder: Linear (MatMul of a transposed weight), `view`, RoPE's
    `rotate_half` (chunk -> SplitToSequence/SequenceAt), RMSNorm (`type_as` -> CastLike), an
    fp32 `.float()`/`.to()` round trip, softmax, a tied head."""

    def __init__(self, vocab: int = 40, hidden: int = 32, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, hidden)
        self.wq = nn.Linear(hidden, hidden, bias=False)
        self.norm = RMSNorm(hidden // heads, 1e-6)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, s, h = x.shape
        q = self.norm(self.wq(x).view(b, s, self.heads, h // self.heads))
        angle = pos[..., None, None].float() * 0.1
        q = q * angle.cos() + rotate_half(q) * angle.sin()
        probs = F.softmax(q.float(), dim=-1).to(q.dtype)
        return F.linear(probs.reshape(b, s, h), self.embed.weight)


def _export(module: nn.Module) -> ir.Model:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    ids = torch.zeros(2, 3, dtype=torch.int64)
    return export_module(module, (ids, ids.clone()), ({0: batch, 1: seq}, {0: batch, 1: seq}))


IDS = np.array([[1, 5, 7, 39], [0, 3, 3, 2]], dtype=np.int64)
POS = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=np.int64)


def _run(model: ir.Model) -> np.ndarray:
    proto = ir.serde.serialize_model(model).SerializeToString()
    names = [v.name for v in model.graph.inputs]
    return unoptimized_session(proto).run(None, dict(zip(names, (IDS, POS), strict=True)))[0]


def _weight_transposes(model: ir.Model) -> list[str]:
    return sorted(
        n.inputs[0].name
        for n in model.graph
        if n.op_type == "Transpose" and n.inputs[0] is not None and n.inputs[0].is_initializer()
    )


def test_removes_plumbing_and_keeps_outputs() -> None:
    torch.manual_seed(0)
    module = Attn()
    model = _export(module)
    before = _run(model)
    counts = op_counts(model)
    assert counts["SplitToSequence"] and counts["SequenceAt"] and counts["CastLike"]  # what there is to do
    inputs = [v.name for v in model.graph.inputs]
    outputs = [v.name for v in model.graph.outputs]
    initializers = dict(model.graph.initializers)
    transposed = _weight_transposes(model)
    assert transposed == ["embed.weight", "wq.weight"]

    changes = clean(model)

    after = op_counts(model)
    for op in ("SplitToSequence", "SequenceAt", "CastLike", "Identity"):
        assert after[op] == 0, op
    assert after["Constant"] < counts["Constant"]
    assert after["Reshape"] < counts["Reshape"]  # the ReduceMean axes: a Reshape of a Constant, folded
    assert after["Split"] == 1  # chunk(2), as one Split
    assert changes["nodes"] == after.total() - counts.total() < 0
    assert changes["SplitToSequence"] == -counts["SplitToSequence"]
    # the weights: the same Values, still read through their Transpose (not folded into a copy)
    assert dict(model.graph.initializers) == initializers
    assert _weight_transposes(model) == transposed
    assert [v.name for v in model.graph.inputs] == inputs
    assert [v.name for v in model.graph.outputs] == outputs
    np.testing.assert_allclose(_run(model), before, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        ref = module(torch.from_numpy(IDS), torch.from_numpy(POS)).numpy()
    np.testing.assert_allclose(_run(model), ref, rtol=1e-5, atol=1e-5)


def test_is_idempotent() -> None:
    model = _export(Attn())
    clean(model)
    counts = op_counts(model)
    assert clean(model) == {"nodes": 0}
    assert op_counts(model) == counts


def test_never_reads_an_initializer_and_restores_them() -> None:
    """At export time initializers hold fake tensors (or lazy, planned ones): any read raises."""
    torch.manual_seed(0)
    module = Attn()
    model = _export(module)
    before = _run(model)
    real: dict[str, ir.TensorProtocol | None] = {}

    reads: list[str] = []

    def boom() -> ir.TensorProtocol:  # recorded too: a caught exception must not hide the read
        reads.append("read")
        raise AssertionError("clean read an initializer")

    for value in model.graph.initializers.values():
        assert value.name is not None and value.shape is not None and value.dtype is not None
        real[value.name] = value.const_value
        value.const_value = ir.LazyTensor(boom, dtype=value.dtype, shape=value.shape, name=value.name)
    guards = {name: v.const_value for name, v in model.graph.initializers.items()}

    clean(model)

    assert not reads
    assert {name: v.const_value for name, v in model.graph.initializers.items()} == guards  # restored
    for value in model.graph.initializers.values():
        value.const_value = real[value.name]
    np.testing.assert_allclose(_run(model), before, rtol=1e-6, atol=1e-6)


def test_hidden_values_come_back_after_an_error() -> None:
    model = _export(Attn())
    values = {name: v.const_value for name, v in model.graph.initializers.items()}
    with pytest.raises(RuntimeError), hidden_initializer_values(model.graph):
        assert all(v.const_value is None for v in model.graph.initializers.values())
        raise RuntimeError
    assert {name: v.const_value for name, v in model.graph.initializers.items()} == values


def test_keeps_planned_initializers_after_quantization() -> None:
    """Run after LinearToMatMulNBits, clean keeps the planned (lazy) initializers and their plan."""
    torch.manual_seed(0)
    model = _export(Attn(vocab=64, hidden=64))
    float_out = _run(model)
    result = LinearToMatMulNBits(QuantRecipe())(model)
    assert isinstance(result, QuantizedWeights) and result.quantized
    planned = {
        name: (v, v.const_value, plan_of(v)) for name, v in model.graph.initializers.items() if PLAN in v.meta
    }
    assert planned
    quantized_out = _run(model)

    clean(model)

    for name, (value, tensor, plan) in planned.items():
        assert model.graph.initializers[name] is value
        assert value.const_value is tensor and plan_of(value) == plan
    np.testing.assert_allclose(_run(model), quantized_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_run(model), float_out, rtol=0.2, atol=0.2)  # int4 of the same model


def test_quantization_pass_finds_the_same_weights_after_clean() -> None:
    model = _export(Attn())
    expected = sorted(linear_weights(model.graph))
    clean(model)
    assert sorted(linear_weights(model.graph)) == expected


def test_new_constants_are_nodes_not_initializers() -> None:
    """The layout stage streams every initializer from a source tensor: clean adds none."""
    model = _export(Attn())
    names = set(model.graph.initializers)
    clean(model)
    assert set(model.graph.initializers) <= names
    for node in model.graph:
        if node.op_type == "Constant":
            assert not node.outputs[0].is_initializer()


# The exported tiny decoders (fp32 bundles of the parity variants, one re-quantized to int4),
# loaded with their external data, cleaned, saved elsewhere: same logits and KV under onnxruntime.


@pytest.mark.parametrize("variant", [*VARIANTS, "tiny_int4"])
def test_bundle_decoder_same_outputs(
    variant: str, bundles: dict[str, Path], int4_bundle: Path, tmp_path: Path
) -> None:
    bundle = int4_bundle if variant == "tiny_int4" else bundles[variant]
    session = unoptimized_session(str(bundle / "decoder.onnx"))
    feeds = decoder_feeds(session)
    before = session.run(None, feeds)
    model = ir.load(bundle / "decoder.onnx")
    weights = {name: v.const_value for name, v in model.graph.initializers.items()}
    outputs = [v.name for v in model.graph.outputs]
    linears = sorted(linear_weights(model.graph))  # fp32: what LinearToMatMulNBits would quantize

    clean(model)

    assert sorted(linear_weights(model.graph)) == linears

    counts = op_counts(model)
    for op in ("SplitToSequence", "SequenceAt", "CastLike", "Identity"):
        assert counts[op] == 0, op
    # one Cast to float: the position ids' int64 -> float (one per graph); the others are integer
    # index plumbing (the attention masks' positions, the logits positions)
    to_float = [
        n for n in model.graph if n.op_type == "Cast" and n.attributes.get_int("to") == ir.DataType.FLOAT
    ]
    assert len(to_float) <= 1
    assert {name: v.const_value for name, v in model.graph.initializers.items()} == weights
    assert [v.name for v in model.graph.outputs] == outputs
    out = tmp_path / "cleaned"
    out.mkdir()
    ir.save(model, out / "decoder.onnx", external_data="decoder.data")
    after = unoptimized_session(str(out / "decoder.onnx")).run(None, feeds)
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)  # the same kernels on the same numbers
