"""TiedLmHeadToGemm: same outputs under onnxruntime before and after; the Transpose is gone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphs.tied_lm_head import TiedLmHeadToGemm
from tests.graphs.helpers import export_module, run_unoptimized


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 50, hidden: int = 16, softcap: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.softcap = softcap

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = F.linear(torch.tanh(self.proj(self.embed(ids))), self.embed.weight)
        return torch.tanh(logits / 30) * 30 if self.softcap else logits


def _export(module: nn.Module) -> ir.Model:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    ids = torch.zeros(2, 3, dtype=torch.int64)
    return export_module(module, (ids,), ({0: batch, 1: seq},), opset_version=None)


def _run(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    return run_unoptimized(model, {model.graph.inputs[0].name: ids})[0]


def _transposed_initializers(model: ir.Model) -> list[str]:
    return [
        n.inputs[0].name
        for n in model.graph
        if n.op_type == "Transpose" and n.inputs[0] is not None and n.inputs[0].is_initializer()
    ]


@pytest.mark.parametrize("softcap", [True, False])  # without softcap the MatMul output is the graph output
def test_rewrite_keeps_outputs_and_drops_transpose(softcap: bool) -> None:
    torch.manual_seed(0)
    module = TiedLM(softcap=softcap).eval()
    model = _export(module)
    assert "embed.weight" in _transposed_initializers(model)  # the pattern the pass exists for
    ids = np.array([[1, 5, 7, 49], [0, 3, 3, 2]], dtype=np.int64)
    before = _run(model, ids)
    output_names = [v.name for v in model.graph.outputs]

    result = TiedLmHeadToGemm()(model)

    assert result.modified
    after = _run(result.model, ids)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(after, module(torch.from_numpy(ids)).numpy(), rtol=1e-4, atol=1e-5)
    assert _transposed_initializers(result.model) == ["proj.weight"]  # untied: left for ORT to fold
    gemms = [n for n in result.model.graph if n.op_type == "Gemm"]
    assert len(gemms) == 1 and gemms[0].inputs[1].name == "embed.weight"
    assert gemms[0].attributes["transB"].as_int() == 1
    assert [v.name for v in result.model.graph.outputs] == output_names


def test_leaves_other_graphs_alone() -> None:
    model = _export(nn.Sequential(nn.Embedding(10, 4)).eval())
    assert not TiedLmHeadToGemm()(model).modified
