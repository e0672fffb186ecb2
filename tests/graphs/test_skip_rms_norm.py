"""fuse_skip_rms_norm: onnxruntime before and after (its optimizations off), the normed output and
the residual sum both equal, SkipSimplifiedLayerNormalization in, the Add gone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from exporter.gemma4 import RMSNorm
from graphs.cleanup import clean
from graphs.fusions.rms_norm import fuse_rms_norm
from graphs.fusions.skip_rms_norm import fuse_skip_rms_norm
from tests.graphs.helpers import run_unoptimized


class _Residual(torch.nn.Module):
    """x + post_norm(y), then a norm of that sum; the sum is also an output (the residual stream)."""

    def __init__(self) -> None:
        super().__init__()
        self.post_norm, self.next_norm = RMSNorm(16, 1e-6), RMSNorm(16, 1e-6)
        with torch.no_grad():
            self.post_norm.weight.uniform_(0.5, 1.5)
            self.next_norm.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = x + self.post_norm(y)
        return self.next_norm(s), s


def test_residual_add_and_norm_become_one_node() -> None:
    torch.manual_seed(0)
    args = (torch.randn(2, 3, 16), torch.randn(2, 3, 16))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dims = {0: batch, 1: seq}
    program = torch.onnx.export(
        _Residual().eval(), args, dynamo=True, dynamic_shapes=(dims, dims), opset_version=18, optimize=False
    )
    assert program is not None
    model = program.model
    model.ir_version = 10
    model.graph.inputs[0].name, model.graph.inputs[1].name = "x", "y"
    rng = np.random.default_rng(0)
    feeds = {n: rng.normal(size=(2, 3, 16)).astype(np.float32) for n in ("x", "y")}
    clean(model)
    assert fuse_rms_norm(model) == 2
    before = run_unoptimized(model, feeds)

    assert fuse_skip_rms_norm(model) == 1

    ops = [n.op_type for n in model.graph]
    assert ops.count("SkipSimplifiedLayerNormalization") == 1 and "Add" not in ops
    assert ops.count("SimplifiedLayerNormalization") == 1  # post_norm stays
    after = run_unoptimized(model, feeds)
    for a, b in zip(after, before, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_norm_without_residual_add_is_left() -> None:
    x = ir.Value(name="x", shape=ir.Shape([2, 3, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", shape=ir.Shape([4]), type=ir.TensorType(ir.DataType.FLOAT))
    w.const_value = ir.tensor(np.ones(4, np.float32), name="w")
    node = ir.node(
        "SimplifiedLayerNormalization", [x, w], attributes={"axis": -1}, outputs=[ir.Value(name="n")]
    )
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=[w], opset_imports={"": 18})
    assert fuse_skip_rms_norm(ir.Model(graph, ir_version=10)) == 0
