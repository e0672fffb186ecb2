"""MergeSiblingMatMulNBits: onnxruntime before and after (its optimizations off) gives the same
outputs with fewer MatMulNBits; the layout stage writes the merged tensor from the member sources
with the bytes the in-memory plan computes, and reports every member."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from exporter.plan_writer import lay_out
from graphs.counted import Counted
from graphs.matmul_nbits import LinearToMatMulNBits
from graphs.sibling_matmul_nbits import MergeSiblingMatMulNBits
from ple_export.bundle.recipe import QuantRecipe
from tests.graphs.helpers import run_unoptimized

RNG = np.random.default_rng(1)
K = 64


def siblings_model(sizes: dict[str, int], k: int = K) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """x [B, S, K] -> Linear per name (MatMul over Transpose(W), as traced), each a graph output,
    plus one Linear on another input (no sibling: it must stay alone)."""
    x = ir.Value(name="x", shape=ir.Shape(["b", "s", k]), type=ir.TensorType(ir.DataType.FLOAT))
    y = ir.Value(name="y", shape=ir.Shape(["b", "s", k]), type=ir.TensorType(ir.DataType.FLOAT))
    inits, nodes, outputs, weights = [], [], [], {}
    for name, n in [*sizes.items(), ("lonely", 48)]:
        w = RNG.standard_normal((n, k)).astype(np.float32)
        weights[name] = w
        wv = ir.Value(name=name, shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT))
        wv.const_value = ir.tensor(w, name=name)
        inits.append(wv)
        t = ir.node("Transpose", [wv], attributes={"perm": [1, 0]}, outputs=[ir.Value(name=f"{name}_t")])
        mm = ir.node(
            "MatMul", [y if name == "lonely" else x, t.outputs[0]], outputs=[ir.Value(name=f"{name}_out")]
        )
        nodes += [t, mm]
        outputs.append(mm.outputs[0])
    graph = ir.Graph([x, y], outputs, nodes=nodes, initializers=inits, opset_imports={"": 18}, name="g")
    return ir.Model(graph, ir_version=10), weights


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


@pytest.mark.parametrize("symmetric", [True, False])
def test_siblings_become_one_matmul_nbits(symmetric: bool) -> None:
    model, _ = siblings_model({"wq": 128, "wk": 32, "wv": 32})
    LinearToMatMulNBits(QuantRecipe(block_size=32, symmetric=symmetric, accuracy_level=0))(model)
    feeds = {
        "x": RNG.standard_normal((2, 3, K)).astype(np.float32),
        "y": RNG.standard_normal((2, 3, K)).astype(np.float32),
    }
    before = run_unoptimized(model, feeds)
    assert _ops(model).count("MatMulNBits") == 4

    result = MergeSiblingMatMulNBits()(model)
    assert isinstance(result, Counted) and result.modified and result.matches == 1  # one group merged

    assert _ops(model).count("MatMulNBits") == 2  # q/k/v as one, the lonely one untouched
    assert _ops(model).count("Split") == 1
    merged = next(n for n in model.graph if n.op_type == "MatMulNBits" and n.name.endswith("/merged"))
    assert merged.name == "wq/MatMulNBits+wk/MatMulNBits+wv/MatMulNBits/merged"
    node = next(n for n in model.graph if n.op_type == "MatMulNBits" and n.attributes.get_int("N") == 192)
    assert len(node.inputs) == (3 if symmetric else 4)
    after = run_unoptimized(model, feeds)
    assert [o.name for o in model.graph.outputs] == ["wq_out", "wk_out", "wv_out", "lonely_out"]
    for a, b in zip(after, before, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert not [v for v in model.graph.initializers.values() if not v.uses()]  # members' inputs dropped


def test_different_settings_are_not_merged() -> None:
    model, _ = siblings_model({"gate": 64, "up": 64})
    LinearToMatMulNBits(QuantRecipe(block_size=32, keep=("up",)))(model)  # up stays float
    assert not MergeSiblingMatMulNBits()(model).modified
    assert _ops(model).count("MatMulNBits") == 2  # gate, lonely


def test_layout_stage_streams_each_member(tmp_path: Path) -> None:
    """The merged initializers' bytes in the data file equal their in-memory plan, made by streaming
    the member sources in order; the report keeps one entry per member source."""
    model, weights = siblings_model({"gate": 96, "up": 96})
    LinearToMatMulNBits(QuantRecipe(block_size=16, symmetric=False))(model)
    MergeSiblingMatMulNBits()(model)
    expected = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}  # type: ignore[union-attr]
    streamed: list[str] = []

    def rows(name: str):  # type: ignore[no-untyped-def]
        streamed.append(name)
        w = weights[name]
        yield from (w[i : i + 40] for i in range(0, len(w), 40))  # row chunks, as from a checkpoint

    layout = lay_out(model, tmp_path, "d.data", 4096, lambda n: iter([]), rows, lambda *a: None, "t")
    reports = layout.tensors
    assert sorted(streamed) == ["gate", "lonely", "up"]  # each source read once
    assert streamed.index("up") == streamed.index("gate") + 1  # the merged tensor: gate's rows, then up's
    for name, value in model.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), expected[name], err_msg=name)  # type: ignore[union-attr]
    assert {"gate", "up", "lonely"} <= set(reports)
    assert reports["gate"].rel_weight_error is not None and 0 < reports["gate"].rel_weight_error < 0.2
    assert layout.size == (tmp_path / "d.data").stat().st_size
