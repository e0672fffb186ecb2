"""fuse_gelu: onnxruntime before and after (its optimizations off), outputs equal, FastGelu in."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from graphs.cleanup import clean
from graphs.fusions.gelu import fuse_gelu
from tests.graphs.helpers import run_unoptimized


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(16, 32, bias=False)
        self.up = torch.nn.Linear(16, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.gate(x), approximate="tanh") * self.up(x) + torch.tanh(x).sum(-1, keepdim=True)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return run_unoptimized(model, {"x": x})[0]


def test_tanh_gelu_becomes_fast_gelu() -> None:
    torch.manual_seed(0)
    program = torch.onnx.export(_Mlp().eval(), (torch.randn(2, 3, 16),), dynamo=True, opset_version=18)
    assert program is not None
    model = program.model
    model.graph.inputs[0].name = "x"
    x = np.random.default_rng(0).normal(size=(2, 3, 16)).astype(np.float32)
    before = _run(model, x)
    clean(model)
    assert fuse_gelu(model) == 1
    ops = [n.op_type for n in model.graph]
    assert ops.count("FastGelu") == 1 and ops.count("Tanh") == 1  # the unrelated tanh stays
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-5, atol=1e-6)


def test_no_gelu_no_change() -> None:
    x = ir.Value(name="x", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("Tanh", [x], outputs=[ir.Value(name="y")])
    model = ir.Model(ir.Graph([x], [node.outputs[0]], nodes=[node], opset_imports={"": 18}), ir_version=10)
    assert fuse_gelu(model) == 0
