"""Small graph patterns and edits more than one pass uses."""

from __future__ import annotations

import onnx_ir as ir

from ple_export.bundle.format import MS_DOMAIN

__all__ = ["MS_DOMAIN", "replace_node", "take_over", "transposed_initializer"]


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


def take_over(old: ir.Value, new: ir.Value) -> None:
    """`new` replaces `old` everywhere: its uses, its shape and type, and its public name if `old`
    was a graph output (the graph's I/O names are the bundle's contract)."""
    new.shape, new.type = old.shape, old.type
    was_output, name = old.is_graph_output(), old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if was_output:
        old.name = f"{name}.replaced"
        new.name = name


def replace_node(graph: ir.Graph, old_node: ir.Node, new_node: ir.Node) -> None:
    """Put `new_node` where `old_node` was; its single output takes over the old one's."""
    graph.insert_before(old_node, new_node)
    take_over(old_node.outputs[0], new_node.outputs[0])
    graph.remove(old_node, safe=True)
