"""Small graph patterns more than one pass matches."""

from __future__ import annotations

import onnx_ir as ir


def transposed_initializer(node: ir.Node) -> ir.Value | None:
    """The initializer `W` if `node` is `Transpose(W, perm=[1, 0])` (how torch traces a Linear's
    weight), else None."""
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    weight = node.inputs[0]
    perm = node.attributes.get("perm")
    if weight is None or not weight.is_initializer() or perm is None or list(perm.as_ints()) != [1, 0]:
        return None
    return weight
