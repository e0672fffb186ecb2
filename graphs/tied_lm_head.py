"""Rewrite `MatMul(x, Transpose(W))` over a tied initializer `W` into `Gemm(x, W, transB=1)`.

The tied LM head reuses the token embedding `[V, H]`. Traced, it becomes a Transpose of that
initializer feeding a MatMul; onnxruntime constant-folds the Transpose at load, which puts a
second, transposed copy of the largest decoder tensor in DRAM (the Gather still needs the
original). Gemm reads `W` as stored. Untied weights (W used by the Transpose only) are left alone.

    x [.., H] -> Reshape [-1, H] -> Gemm(transB=1) with W [V, H] -> [-1, V] -> Reshape [.., V]
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass

from graphs.counted import Counted
from graphs.patterns import take_over, transposed_initializer


def _const(name: str, values: list[int]) -> ir.Node:
    return ir.node(
        "Constant",
        [],
        attributes={"value": ir.tensor(np.array(values, dtype=np.int64), name=name)},
        outputs=[ir.Value(name=name)],
    )


class TiedLmHeadToGemm(InPlacePass):
    def call(self, model: ir.Model) -> Counted:
        graph = model.graph
        rewritten = 0
        for transpose in list(graph):
            weight = transposed_initializer(transpose)
            if weight is None:
                continue
            if all(use.node is transpose for use in weight.uses()):
                continue  # not tied: folding this Transpose at load costs time, not a second copy
            transposed = transpose.outputs[0]
            uses = list(transposed.uses())
            if not uses or any(u.node.op_type != "MatMul" or u.idx != 1 for u in uses):
                continue
            assert weight.shape is not None
            vocab, hidden = weight.shape.numpy()
            for k, use in enumerate(uses):
                matmul = use.node
                x = matmul.inputs[0]
                assert x is not None
                base = f"{weight.name}.lm_head{k if k else ''}"
                flat_shape = _const(f"{base}/flat_shape", [-1, hidden])
                vocab_dim = _const(f"{base}/vocab_dim", [vocab])
                lead = ir.node(
                    "Shape", [x], attributes={"end": -1}, outputs=[ir.Value(name=f"{base}/lead_dims")]
                )
                out_shape = ir.node(
                    "Concat",
                    [lead.outputs[0], vocab_dim.outputs[0]],
                    attributes={"axis": 0},
                    outputs=[ir.Value(name=f"{base}/out_shape")],
                )
                flat = ir.node(
                    "Reshape", [x, flat_shape.outputs[0]], outputs=[ir.Value(name=f"{base}/x_flat")]
                )
                gemm = ir.node(
                    "Gemm",
                    [flat.outputs[0], weight],
                    attributes={"transB": 1},
                    outputs=[ir.Value(name=f"{base}/logits_flat")],
                    name=f"{base}/Gemm",
                )
                out = ir.node(
                    "Reshape",
                    [gemm.outputs[0], out_shape.outputs[0]],
                    outputs=[ir.Value(name=f"{base}/logits")],
                )
                new_nodes = [flat_shape, vocab_dim, lead, out_shape, flat, gemm, out]
                graph.insert_before(matmul, new_nodes)
                take_over(matmul.outputs[0], out.outputs[0])  # the graph's output keeps its name
                graph.remove(matmul, safe=True)
            graph.remove(transpose, safe=True)
            rewritten += 1
        return Counted.of(model, rewritten)
